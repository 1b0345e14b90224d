"""Stored data over time, the parts together (SPEC 18): blocks, agents joining and leaving
with backfill, retention and paging on one group, in the orders a long-lived service
meets them. Each part has its own tests (test_blocks, test_group_lifecycle, test_prune,
test_paging); these check that they agree with each other."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors import (
    AgentNotFound,
    AgentNotInGroup,
    BlockExists,
    BlockNotFound,
    GroupNotFound,
    RunNotFound,
    Runtime,
)
from messages import RunStatus
from tests.agents import user

MEMORY = {"kind": "memory"}
SCRIPTED = {"kind": "scripted"}
TIMEOUT = 30


def _turns(rt: Runtime, group_id: str, count: int, start: int = 0) -> list[str]:
    run_ids: list[str] = []
    for n in range(start, start + count):
        run_ids += rt.step(group_id, [user(f"my favorite number is {n}")]).run_ids
    return run_ids


def test_backfill_after_a_prune_starts_at_the_first_message_still_stored(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=2)
    rt.wait_for_runs(_turns(rt, group.id, 8), timeout=TIMEOUT)
    report = rt.prune(messages=True, keep_messages=4)
    pruned = report.removed["messages"]
    assert pruned > 0 and pruned % 2 == 0  # whole turns: an input and an output each
    assert rt.list_messages(group.primary_agent_id)[0].turn == pruned // 2 + 1

    late = rt.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=3)
    assert late.coverage_from_seq == pruned + 1
    backfill = rt.list_runs(agent_id=late.id)
    assert backfill and all(r.metadata.get("backfill") for r in backfill)
    assert backfill[0].window_first_seq == pruned + 1
    assert backfill[-1].window_last_seq == 14  # turns 1, 3, 5, 7 fired: the cursor
    assert all(r.window_last_seq - r.window_first_seq < 3 for r in backfill)
    done = rt.wait_for_runs([r.id for r in backfill], timeout=TIMEOUT)
    assert all(r.status is RunStatus.COMPLETED for r in done)

    rt.wait_for_runs(_turns(rt, group.id, 4, start=8), timeout=TIMEOUT)
    report_after = rt.check_invariants([group.id])
    assert report_after.ok, report_after.violations
    assert report_after.coverage[late.id] == pruned + 1


def test_prune_keeps_what_an_unfinished_backfill_still_has_to_read(db_url: str) -> None:
    # A slow agent joins with backfill: its queued runs' windows must survive a prune.
    slow = {"kind": "simulated", "config": {"latency_ms": 200, "seed": 3}}
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
        rt.wait_for_runs(_turns(rt, group.id, 6), timeout=TIMEOUT)
        late = rt.add_sleeptime_agent(group.id, slow, backfill=True, backfill_window=2)
        first_window = rt.list_runs(agent_id=late.id)[0].window_first_seq
        rt.prune(messages=True)
        kept = [m.sequence for m in rt.list_messages(group.primary_agent_id)]
        assert kept and kept[0] <= first_window
        runs = rt.wait_for_runs([r.id for r in rt.list_runs(agent_id=late.id)], timeout=TIMEOUT)
        assert all(r.status is RunStatus.COMPLETED for r in runs)
        rt.prune(messages=True)  # now every agent is past them
        assert rt.list_messages(group.primary_agent_id) == []
        report = rt.check_invariants([group.id])
        assert report.ok, report.violations


def test_block_history_pages_survive_pruning_and_the_group_deletes_whole(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    agent_id = group.sleeptime_agent_ids[0]
    rt.create_block(group.id, "plans", "none yet")
    for n in range(6):
        rt.set_block(group.id, "plans", f"plan {n}")
    rt.wait_for_runs(_turns(rt, group.id, 3), timeout=TIMEOUT)  # memory runs edit `human`
    pages, after = [], None
    while page := rt.block_history(agent_id, "plans", limit=2, after=after):
        pages.append([v.version for v in page])
        after = page[-1].id
    assert [v for p in pages for v in p] == list(range(1, 8))

    rt.prune(keep_block_versions=2, before=datetime.now(UTC) + timedelta(hours=1))
    assert [v.version for v in rt.block_history(agent_id, "plans")] == [6, 7]
    assert rt.get_block(agent_id, "plans").value == "plan 5"
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations

    rt.delete_group(group.id)
    for call in (
        lambda: rt.get_group(group.id),
        lambda: rt.get_block(group.id, "plans"),
        lambda: rt.block_history(group.id, "plans"),
        lambda: rt.list_runs(group_id=group.id, after="run-gone"),
    ):
        try:
            call()
        except GroupNotFound:
            continue
        except Exception as error:  # another typed NotFound is fine for a cursor
            assert type(error).__name__.endswith("NotFound"), error
            continue
        raise AssertionError("a call on a deleted group did not fail")
    assert rt.list_runs(group_id=group.id) == []
    assert rt.check_invariants().ok


def test_agents_join_with_backfill_while_prunes_run(rt: Runtime) -> None:
    # Prunes move the first stored message while agents join: each join lands (planned
    # again if a prune moved it between its plan and its commit), covering from there.
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    rt.wait_for_runs(_turns(rt, group.id, 4), timeout=TIMEOUT)
    done = threading.Event()
    errors: list[BaseException] = []

    def turns_and_prunes() -> None:
        n = 4
        try:
            while not done.is_set():
                rt.wait_for_runs(_turns(rt, group.id, 1, start=n), timeout=TIMEOUT)
                rt.prune(messages=True, keep_messages=2, batch_size=1)
                n += 1
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=turns_and_prunes)
    worker.start()
    try:
        joined = [
            rt.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=2)
            for _ in range(6)
        ]
    finally:
        done.set()
        worker.join(timeout=TIMEOUT)
    assert not errors, errors
    open_runs = [r.id for a in joined for r in rt.list_runs(agent_id=a.id)]
    rt.wait_for_runs(open_runs, timeout=TIMEOUT)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


def test_a_join_plans_its_backfill_from_where_history_starts_in_its_own_transaction(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministic: a prune lands after the join was asked for and before its transaction.
    # The join reads where the stored history starts inside that transaction, so its
    # coverage and backfill start after the prune (it was once planned from an earlier
    # read, refused, and planned again a few times; a busy prune could exhaust them).
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    rt.wait_for_runs(_turns(rt, group.id, 6), timeout=TIMEOUT)
    store = rt._store
    join = store.join_agent
    overtaken: list[int] = []

    def prune_then_join(joining: Any) -> Any:
        overtaken.append(store.messages_pruned_through(group.id))
        rt.prune(messages=True, keep_messages=4)  # straight through the writer
        return join(joining)

    monkeypatch.setattr(store, "join_agent", prune_then_join)
    late = rt.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=2)
    assert overtaken == [0]
    pruned = store.messages_pruned_through(group.id)
    assert pruned > 0
    assert late.coverage_from_seq == pruned + 1
    backfill = rt.list_runs(agent_id=late.id)
    assert backfill[0].window_first_seq == pruned + 1
    assert rt.get_agent(late.id).coverage_from_seq == pruned + 1  # as stored
    rt.wait_for_runs([r.id for r in backfill], timeout=TIMEOUT)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


STORM_ERRORS = (
    GroupNotFound,
    BlockNotFound,
    BlockExists,
    AgentNotInGroup,
    AgentNotFound,
    RunNotFound,
)


def test_a_storm_of_every_call_leaves_the_invariants_holding(db_url: str) -> None:
    # Threads call everything SPEC 18 adds, at random, beside turns on the same groups:
    # only typed refusals come back, and what is stored holds, before and after a restart.
    slow: dict[str, Any] = {"kind": "simulated", "config": {"latency_ms": 5, "seed": 1}}
    untyped: list[str] = []
    with Runtime.start(db_url, workers=8) as rt:
        groups = [
            rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY, slow], frequency=n % 3 + 1).id
            for n in range(4)
        ]
        lock = threading.Lock()

        def one(r: random.Random) -> None:
            with lock:
                g = r.choice(groups)
            kind = r.choices(
                ["step", "set", "create", "drop", "add", "remove", "prune", "delete", "page"],
                [30, 8, 4, 4, 3, 2, 3, 1, 3],
            )[0]
            if kind == "step":
                rt.step(g, [user(f"my favorite color is c{r.randint(0, 9)}")])
            elif kind == "set":
                rt.set_block(g, "human", f"set {r.randint(0, 999)}")
            elif kind == "create":
                rt.create_block(g, f"l{r.randint(0, 2)}", "x")
            elif kind == "drop":
                rt.delete_block(g, f"l{r.randint(0, 2)}")
            elif kind == "add":
                rt.add_sleeptime_agent(
                    g, r.choice([MEMORY, slow]), backfill=r.random() < 0.5, backfill_window=3
                )
            elif kind == "remove":
                members = rt.get_group(g).sleeptime_agent_ids
                if members:
                    rt.remove_sleeptime_agent(g, r.choice(members))
            elif kind == "prune":
                rt.prune(
                    before=datetime.now(UTC) + timedelta(hours=1),
                    keep_runs=r.randint(0, 2),
                    messages=True,
                    keep_messages=r.randint(0, 4),
                    keep_block_versions=r.randint(1, 2),
                    batch_size=r.randint(1, 10),
                )
            elif kind == "delete":
                rt.delete_group(g)
                fresh = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=2).id
                with lock:
                    groups[groups.index(g)] = fresh
            else:
                seen: set[str] = set()
                after: str | None = None
                while page := rt.list_runs(group_id=g, limit=4, after=after):
                    assert not seen & {run.id for run in page}, "a run listed twice"
                    seen |= {run.id for run in page}
                    after = page[-1].id

        def worker(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(60):
                try:
                    one(r)
                except STORM_ERRORS:
                    pass
                except BaseException as error:  # anything else is a bug
                    untyped.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not untyped, untyped[:5]
        still_open = [r.id for r in rt.list_runs(statuses=["created", "running"])]
        rt.wait_for_runs(still_open, timeout=TIMEOUT)
        report = rt.check_invariants()
        assert report.ok, report.violations
    with Runtime.start(db_url) as again:
        report = again.check_invariants()
        assert report.ok, report.violations
