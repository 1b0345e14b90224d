"""Groups over their life: deleting a group, adding and removing sleeptime agents of a live
group (with backfill over its earlier history), on both backends."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from actors import (
    AgentContext,
    AgentNotFound,
    AgentNotInGroup,
    AsyncRuntime,
    GroupNotFound,
    RunNotFound,
    Runtime,
    UnknownAgentKind,
)
from messages import Message, MessageCreate, RunStatus
from tests.agents import Gated, Recorder, user, wait_until
from tests.tables import TableDump

CHILD = Path(__file__).resolve().parent / "lifecycle_kill9_child.py"
LEASE_S = 3.0  # the kill -9 test's (on PostgreSQL a restart waits for the dead one's leases)
MEMORY = {"kind": "memory"}
SCRIPTED = {"kind": "scripted"}


class Waiter:
    """A sleeptime agent that steps until its run is cancelled (or its gate opens)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.cancelled = threading.Semaphore(0)

    def factory(self, config: dict[str, Any]) -> Waiter:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        self.started.release()
        while not self.gate.is_set():
            if context.wait(0.01):  # the run was cancelled
                self.cancelled.release()
                return [MessageCreate(role="assistant", content="stopped")]
        return [MessageCreate(role="assistant", content="done")]


def turn(text: str) -> list[dict[str, Any]]:
    """One recorded turn: the user's input and an answer (so a firing turn makes runs)."""
    return [{"role": "user", "content": text}, {"role": "assistant", "content": f"re: {text}"}]


def queued(rt: Runtime, group_id: str) -> int:
    """Messages told to the group's running actor and not handled yet: waiting in its
    inbox, or taken from it by its thread (its address counts them, see `serve_here`)."""
    address = rt._running_group(group_id)
    return 0 if address is None else address._owed


def names(row: tuple[Any, ...], ids: set[str]) -> bool:
    """Whether the row holds one of `ids` in a column."""
    return any(isinstance(c, str) and c in ids for c in row)


def rows_naming(dump: dict[str, list[tuple[Any, ...]]], ids: set[str]) -> dict[str, int]:
    """How many rows of each table hold one of `ids` in a column."""
    return {table: sum(1 for row in rows if names(row, ids)) for table, rows in dump.items()}


def ids_of(rt: Runtime, group_id: str) -> set[str]:
    """The group's id and the ids of its agents, runs and blocks."""
    group = rt.get_group(group_id)
    agents = [group.primary_agent_id, *group.sleeptime_agent_ids]
    found = {group_id, *agents}
    found |= {r.id for r in rt.list_runs(group_id=group_id)}
    found |= {b.id for a in agents for b in rt.get_blocks(a)}
    found |= {m.id for a in agents for m in rt.list_messages(a)}
    return found


def run_in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `call` in a thread; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


# -- deleting a group ---------------------------------------------------------------------


def test_a_group_deleted_with_runs_in_flight_is_gone_from_every_table(db_url: str) -> None:
    waiter, gated = Waiter(), Gated()
    with Runtime.start(db_url, kinds={"waiter": waiter.factory, "gated": gated.factory}) as rt:
        doomed = rt.create_group(
            primary={"kind": "gated"}, sleeptime=[{"kind": "waiter"}] * 2, frequency=1
        )
        other = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
        first = rt.step(doomed.id, [user("hello")])
        rt.step(doomed.id, [user("again")])  # queued behind the running ones
        waiter.started.acquire(timeout=10)
        waiter.started.acquire(timeout=10)
        done = [rt.step(other.id, [user(f"my name is Ada {i}")]) for i in range(3)]
        rt.wait_for_runs([i for r in done for i in r.run_ids], timeout=30)
        tables = TableDump(db_url)
        try:
            before = tables.read()
            doomed_ids = ids_of(rt, doomed.id)
            other_ids = ids_of(rt, other.id)
            assert all(rows_naming(before, doomed_ids)[t] for t in ("runs", "messages", "blocks"))

            waiting, waited = run_in_thread(lambda: rt.wait_for_runs(first.run_ids, timeout=30))
            gated.gate.clear()
            ahead, answered = run_in_thread(lambda: rt.step(doomed.id, [user("last words")]))
            gated.wait_entered()
            deleting, deleted = run_in_thread(lambda: rt.delete_group(doomed.id))
            assert wait_until(lambda: queued(rt, doomed.id) >= 1)
            behind, refused = run_in_thread(lambda: rt.step(doomed.id, [user("too late")]))
            assert wait_until(lambda: queued(rt, doomed.id) >= 2)
            gated.gate.set()
            for thread in (ahead, deleting, behind, waiting):
                thread.join(30)
            assert answered[0].turn == 3  # sent before the delete: taken
            assert deleted == [None]
            assert isinstance(refused[0], GroupNotFound)  # queued behind it
            assert isinstance(waited[0], RunNotFound)
            waiter.cancelled.acquire(timeout=10)  # the steps under way were asked to stop
            waiter.cancelled.acquire(timeout=10)

            rt.step(other.id, [user("still here")])  # (its commit follows any late write)
            after = tables.read()
            assert not any(rows_naming(after, doomed_ids).values()), rows_naming(after, doomed_ids)
            kept = {t: [r for r in rows if names(r, other_ids)] for t, rows in before.items()}
            now = {t: [r for r in rows if names(r, other_ids)] for t, rows in after.items()}
            for table in ("agents", "blocks", "block_versions"):
                assert now[table] == kept[table]
            for table in ("messages", "runs", "run_events"):  # the same, and the new turn's
                assert all(row in now[table] for row in kept[table])
        finally:
            tables.close()

        run_id, agent_id = first.run_ids[0], doomed.sleeptime_agent_ids[0]
        gone: list[Callable[[], Any]] = [
            lambda: rt.get_group(doomed.id),
            lambda: rt.step(doomed.id, [user("hi")]),
            lambda: rt.record_turn(doomed.id, [user("hi")]),
            lambda: rt.update_group(doomed.id, frequency=2),
            lambda: rt.delete_group(doomed.id),
            lambda: rt.add_sleeptime_agent(doomed.id, MEMORY),
            lambda: rt.remove_sleeptime_agent(doomed.id, agent_id),
        ]
        for call in gone:
            with pytest.raises(GroupNotFound):
                call()
        for call in (
            lambda: rt.get_run(run_id),
            lambda: rt.run_events(run_id),
            lambda: rt.cancel_run(run_id),
            lambda: rt.wait_for_runs([run_id], timeout=1),
        ):
            with pytest.raises(RunNotFound):
                call()
        for call in (
            lambda: rt.get_agent(agent_id),
            lambda: rt.get_blocks(agent_id),
            lambda: rt.list_messages(doomed.primary_agent_id),
        ):
            with pytest.raises(AgentNotFound):
                call()
        assert rt.list_runs(group_id=doomed.id) == []
        assert [g.id for g in rt.list_groups()] == [other.id]
        rt.wait_for_runs(rt.step(other.id, [user("and again")]).run_ids, timeout=30)
        report = rt.check_invariants()
        assert report.ok and report.groups == 1, report.violations
        assert rt.stats()["groups"] == 1  # its actors are gone


def test_a_failed_group_can_be_deleted(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    rt.step(group.id, [user("hi")])
    rt._directory._escalate(group.id, "crashed too often (on purpose)")
    rt.delete_group(group.id)
    with pytest.raises(GroupNotFound):
        rt.get_group(group.id)
    with pytest.raises(GroupNotFound):
        rt.step(group.id, [user("hi")])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_a_delete_leaves_each_group_whole_or_gone(db_url: str, seed: int) -> None:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), db_url, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLEEPTIME_LOG_LEVEL": "critical"},
    )
    groups: dict[str, set[str]] = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            word, *rest = line.split()
            if word == "group":
                groups[rest[0]] = set(rest)
            elif word == "ready":
                break
        deletes = random.Random(seed).randint(1, len(groups) - 1)  # a seeded moment to die
        started = 0
        while started < deletes:  # right after the child began its `deletes`-th delete
            line = child.stdout.readline()
            assert line, "the child ended before its deletes"
            started += line.startswith("deleting")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    tables = TableDump(db_url)
    try:
        dump = tables.read()
    finally:
        tables.close()
    whole = 0
    for group_id, ids in groups.items():
        found = rows_naming(dump, ids)
        if found["groups"]:  # as before: every part of it is there
            whole += 1
            assert found["agents"] == 3 and found["blocks"] == 4, found
        else:  # as after: nothing of it is left
            assert not any(found.values()), (group_id, found)
    assert len(groups) - deletes <= whole <= len(groups) - deletes + 1  # the last one: either
    # Recovery finishes what the dead process left open (once its short leases expired).
    with Runtime.start(db_url, lease_s=LEASE_S) as rt:
        open_runs = rt.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
        rt.wait_for_runs([r.id for r in open_runs], timeout=60)
        report = rt.check_invariants()
        assert report.ok and report.groups == whole, report.violations


# -- adding and removing sleeptime agents -------------------------------------------------


def test_agents_added_and_removed_while_turns_run(db_url: str) -> None:
    recorder = Recorder()
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY, MEMORY], frequency=1)
        founder, other = group.sleeptime_agent_ids
        stop = threading.Event()
        errors: list[BaseException] = []

        def drive(name: str) -> None:
            n = 0
            try:
                while not stop.is_set():
                    rt.record_turn(group.id, turn(f"{name} says my name is Ada {n}"))
                    n += 1
            except BaseException as error:
                errors.append(error)

        drivers = [threading.Thread(target=drive, args=(f"d{i}",)) for i in range(2)]
        for thread in drivers:
            thread.start()
        try:
            assert wait_until(lambda: rt.get_group(group.id).turns >= 5)
            joined = rt.add_sleeptime_agent(
                group.id, {"kind": "recorder", "config": {"memory_persona": "Note names."}}
            )
            assert wait_until(lambda: rt.get_group(group.id).turns >= joined.added_turn + 5)
            removed = rt.remove_sleeptime_agent(group.id, founder)
            left = removed.removed_turn or 0
            assert wait_until(lambda: rt.get_group(group.id).turns >= left + 5)
            late = rt.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=4)
            assert wait_until(lambda: rt.get_group(group.id).turns >= late.added_turn + 3)
        finally:
            stop.set()
            for thread in drivers:
                thread.join(30)
        assert not errors, errors
        runs = rt.list_runs(group_id=group.id)
        rt.wait_for_runs([r.id for r in runs], timeout=60)
        report = rt.check_invariants([group.id])
        assert report.ok, report.violations
        assert report.coverage[joined.id] == joined.coverage_from_seq > 1
        assert report.coverage[late.id] == 1 and report.coverage[founder] == 1

        stored = rt.get_group(group.id)
        assert stored.sleeptime_agent_ids == [other, joined.id, late.id]
        # The added agent's first window starts right after the cursor at its join, where
        # the founders' run of that turn ended.
        mine = rt.list_runs(agent_id=joined.id)
        assert mine[0].window_first_seq == joined.coverage_from_seq
        at_join = [r for r in rt.list_runs(agent_id=other) if r.turn == joined.added_turn]
        assert at_join[0].window_last_seq == joined.coverage_from_seq - 1
        assert min(r.turn for r in mine) == joined.added_turn + 1
        assert rt.get_blocks(joined.id)["memory_persona"].value == "Note names."
        assert recorder.transcripts[0].startswith("<system-reminder>")
        # The removed agent's history stays readable; it took no part after it left.
        agent = rt.get_agent(founder)
        assert agent.removed_at is not None and agent.removed_turn == removed.removed_turn
        theirs = rt.list_runs(agent_id=founder)
        assert theirs and max(r.turn for r in theirs) <= left
        assert rt.list_messages(founder) and rt.get_blocks(founder).get("memory_persona")
        assert rt.stats()["active_agents"] <= 3  # its actor was stopped


def test_a_removed_agents_open_runs_are_cancelled_and_it_never_restarts(db_url: str) -> None:
    waiter = Waiter()
    with Runtime.start(db_url, kinds={"waiter": waiter.factory}) as rt:
        group = rt.create_group(
            primary=SCRIPTED, sleeptime=[{"kind": "waiter"}, MEMORY], frequency=1
        )
        slow, quick = group.sleeptime_agent_ids
        run_ids = [rt.step(group.id, [user(f"hi {i}")]).run_ids[0] for i in range(3)]
        assert waiter.started.acquire(timeout=10)
        removed = rt.remove_sleeptime_agent(group.id, slow)
        assert removed.removed_turn == 3
        runs = rt.wait_for_runs(run_ids, timeout=10)
        assert [r.status for r in runs] == [RunStatus.CANCELLED] * 3
        assert [e.status for e in rt.run_events(run_ids[1])] == [
            RunStatus.CREATED,
            RunStatus.CANCELLED,
        ]
        assert wait_until(lambda: any(m.text() == "stopped" for m in rt.list_messages(slow)))
        assert rt.remove_sleeptime_agent(group.id, slow) == removed  # as it is
        result = rt.step(group.id, [user("later")])
        assert len(result.run_ids) == 1 and rt.get_run(result.run_ids[0]).agent_id == quick
        rt.wait_for_runs(result.run_ids, timeout=30)
    with Runtime.start(db_url, kinds={"waiter": waiter.factory}) as rt:
        rt.wait_for_runs(rt.step(group.id, [user("after a restart")]).run_ids, timeout=30)
        assert not any(i == f"agent:{slow}" for i in rt._parts.supervisor.identities())
        report = rt.check_invariants()
        assert report.ok, report.violations


def test_a_group_with_every_agent_removed_keeps_taking_turns(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=2)
    rt.wait_for_runs(rt.step(group.id, [user("one")]).run_ids, timeout=30)
    rt.remove_sleeptime_agent(group.id, group.sleeptime_agent_ids[0])
    results = [rt.step(group.id, [user(f"turn {i}")]) for i in range(2, 5)]
    # As in Letta: the counter still moves, a firing turn consumes its fire and moves the
    # cursor, with no run.
    assert [(r.fired, r.run_ids) for r in results] == [(False, []), (True, []), (False, [])]
    stored = rt.get_group(group.id)
    assert (stored.turns, stored.counter, stored.sleeptime_agent_ids) == (4, 1, [])
    history = rt.list_messages(group.primary_agent_id)
    assert stored.cursor == history[5].id  # the end of turn 3
    added = rt.add_sleeptime_agent(group.id, MEMORY)
    assert (added.added_turn, added.coverage_from_seq) == (4, 7)
    fired = rt.step(group.id, [user("my name is Bo")])
    run = rt.wait_for_runs(fired.run_ids, timeout=30)[0]
    assert (run.window_first_seq, run.window_last_seq) == (7, 10)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


def test_bad_calls_get_typed_errors(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    stranger = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    with pytest.raises(ValidationError):
        rt.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=0)
    with pytest.raises(ValidationError):
        rt.add_sleeptime_agent(group.id, {"kind": "memory", "config": {"memory_persona": 3}})
    with pytest.raises(ValidationError):
        rt.add_sleeptime_agent(group.id, {"kind": "memory", "oops": 1})
    with pytest.raises(UnknownAgentKind):
        rt.add_sleeptime_agent(group.id, {"kind": "nobody-registered-it"})
    with pytest.raises(GroupNotFound):
        rt.add_sleeptime_agent("group-nobody-made", MEMORY)
    with pytest.raises(AgentNotInGroup, match="primary"):
        rt.remove_sleeptime_agent(group.id, group.primary_agent_id)
    with pytest.raises(AgentNotInGroup, match=stranger.id):
        rt.remove_sleeptime_agent(group.id, stranger.sleeptime_agent_ids[0])
    with pytest.raises(AgentNotFound):
        rt.remove_sleeptime_agent(group.id, "agent-nobody-made")
    with pytest.raises(GroupNotFound):
        rt.delete_group("group-nobody-made")
    assert rt.get_group(group.id).sleeptime_agent_ids == group.sleeptime_agent_ids


# -- backfill -----------------------------------------------------------------------------


@pytest.fixture
def backfilling(db_url: str) -> Iterator[tuple[Runtime, Recorder]]:
    recorder = Recorder()
    runtime = Runtime.start(db_url, kinds={"recorder": recorder.factory})
    try:
        yield runtime, recorder
    finally:
        runtime.stop(drain_timeout=5)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    frequency=st.sampled_from([None, 1, 2, 3]),
    before=st.integers(0, 9),
    window=st.integers(1, 7),
    after=st.integers(0, 4),
)
def test_backfill_covers_the_earlier_history_once_in_bounded_windows_then_goes_on(
    backfilling: tuple[Runtime, Recorder],
    frequency: int | None,
    before: int,
    window: int,
    after: int,
) -> None:
    rt, recorder = backfilling
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=frequency)
    tag = group.id[-8:]
    for i in range(before):
        rt.record_turn(group.id, turn(f"{tag} said {i}"))
    at_join = rt.get_group(group.id)
    history = rt.list_messages(group.primary_agent_id)
    cursor_seq = next((m.sequence for m in history if m.id == at_join.cursor), 0)
    agent = rt.add_sleeptime_agent(
        group.id, {"kind": "recorder"}, backfill=True, backfill_window=window
    )
    assert (agent.added_turn, agent.coverage_from_seq) == (before, 1)
    for i in range(before, before + after):
        rt.record_turn(group.id, turn(f"{tag} said {i}"))
    runs = rt.wait_for_runs([r.id for r in rt.list_runs(agent_id=agent.id)], timeout=30)
    backfill = [r for r in runs if r.metadata.get("backfill")]
    later = [r for r in runs if not r.metadata.get("backfill")]
    assert runs == backfill + later  # created first
    spans = [(r.window_first_seq, r.window_last_seq) for r in backfill]
    assert spans == [(s, min(s + window - 1, cursor_seq)) for s in range(1, cursor_seq + 1, window)]
    assert all(r.turn == before and r.status is RunStatus.COMPLETED for r in backfill)
    if later:  # then the normal windows, from the cursor at the join on
        assert later[0].window_first_seq == cursor_seq + 1 and later[0].turn > before
    lives = [(r.started_at, r.completed_at) for r in runs]
    times = [t for life in lives for t in life if t is not None]
    assert len(times) == 2 * len(runs) and times == sorted(times)  # one at a time, in order
    mine = [t for t in recorder.transcripts if tag in t]
    assert len(mine) == len(runs)
    covered = [
        i for i in range(before + after) if any(f"{tag} said {i}\n" in t + "\n" for t in mine)
    ]
    assert covered == [i for i in range(before + after) if _claimed(rt, group.id, i)]
    assert all(
        sum(f"user: {tag} said {i}\n" in t + "\n" for t in mine) <= 1 for i in range(before + after)
    )
    # The group's first agent may still be stepping its last run: the check needs all ended.
    rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group.id)], timeout=30)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


def _claimed(rt: Runtime, group_id: str, index: int) -> bool:
    """Whether the index-th turn's input is at or before the group's cursor."""
    group = rt.get_group(group_id)
    history = rt.list_messages(group.primary_agent_id)
    cursor_seq = next((m.sequence for m in history if m.id == group.cursor), 0)
    return 2 * index + 1 <= cursor_seq


def test_backfill_runs_left_open_by_a_stop_resume_in_order(db_url: str) -> None:
    slow = {"kind": "simulated", "config": {"latency_ms": 40, "seed": 3}}
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
        for i in range(12):
            rt.record_turn(group.id, turn(f"said {i}"))
        agent = rt.add_sleeptime_agent(group.id, slow, backfill=True, backfill_window=2)
        rt.record_turn(group.id, turn("after the join"))
        rt.stop(drain_timeout=0)
    with Runtime.start(db_url) as rt:
        runs = rt.wait_for_runs([r.id for r in rt.list_runs(agent_id=agent.id)], timeout=60)
        assert len(runs) == 13 and all(r.status.terminal for r in runs)
        ordered = sorted(runs, key=lambda r: r.started_at or r.completed_at or r.created_at)
        assert [r.id for r in ordered] == [r.id for r in runs]
        report = rt.check_invariants([group.id])
        assert report.ok, report.violations


# -- the asyncio API ----------------------------------------------------------------------


def test_the_async_api_has_the_calls(db_url: str) -> None:
    async def main() -> None:
        async with await AsyncRuntime.start(db_url) as rt:
            group = await rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
            await rt.record_turn(group.id, turn("my name is Ada"))
            added = await rt.add_sleeptime_agent(group.id, MEMORY, backfill=True)
            assert added.coverage_from_seq == 1 and added.added_turn == 1
            removed = await rt.remove_sleeptime_agent(group.id, group.sleeptime_agent_ids[0])
            assert removed.removed_turn == 1
            with pytest.raises(AgentNotInGroup):
                await rt.remove_sleeptime_agent(group.id, group.primary_agent_id)
            runs = await rt.list_runs(group_id=group.id)
            await rt.wait_for_runs([r.id for r in runs], timeout=30)
            assert (await rt.check_invariants([group.id])).ok
            await rt.delete_group(group.id)
            with pytest.raises(GroupNotFound):
                await rt.get_group(group.id)
            with pytest.raises(GroupNotFound):
                await rt.delete_group(group.id)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_readme_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "backfill=" in b]
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("3 1\n")
