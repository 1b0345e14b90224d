"""Retention (`prune`): what it removes is gone, what it must keep stays, and the
invariants hold on what remains, under a live workload, across a restart and a kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from pydantic import ValidationError
from sqlalchemy import text

import run
from actors import (
    AsyncRuntime,
    GroupNotFound,
    PruneReport,
    ReadOnlyRuntime,
    Runtime,
    render_transcript,
)
from messages import PRUNE_KINDS, BlockNotFound, TurnResult
from persistence import _retention as retention
from persistence import parse_url
from tests.agents import Recorder, user, wait_until

MEMORY = {"kind": "memory"}
SCRIPTED = {"kind": "scripted"}
CHILD = Path(__file__).resolve().parent / "prune_kill9_child.py"


def later() -> datetime:
    """A `before` every row so far is older than."""
    return datetime.now(UTC) + timedelta(hours=1)


def count_rows(url: str) -> dict[str, int]:
    """The rows of each kind prune removes, counted in the database itself."""
    queries = {
        "runs": "SELECT COUNT(*) FROM runs",
        "run_events": "SELECT COUNT(*) FROM run_events",
        "agent_messages": "SELECT COUNT(*) FROM messages m JOIN agents a ON a.id = m.agent_id"
        " WHERE a.role = 'sleeptime'",
        "messages": "SELECT COUNT(*) FROM messages m JOIN agents a ON a.id = m.agent_id"
        " WHERE a.role = 'primary'",
        "block_versions": "SELECT COUNT(*) FROM block_versions",
        "turn_requests": "SELECT COUNT(*) FROM turn_requests",
    }
    engine = sqlalchemy.create_engine(parse_url(url))
    try:
        with engine.connect() as connection:
            return {k: connection.execute(text(q)).scalar_one() for k, q in queries.items()}
    finally:
        engine.dispose()


def column(url: str, query: str) -> list[Any]:
    """The first column of a query's rows, read in the database itself."""
    engine = sqlalchemy.create_engine(parse_url(url))
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(query)).scalars())
    finally:
        engine.dispose()


def recorded_prunes(url: str) -> dict[str, int]:
    """What the `prunes` table says was removed, added up."""
    rows = column(url, "SELECT removed FROM prunes")
    total = dict.fromkeys(PRUNE_KINDS, 0)
    for row in rows:
        removed = row if isinstance(row, dict) else json.loads(row)
        for kind, count in removed.items():
            total[kind] += count
    return total


def added_up(reports: list[PruneReport]) -> dict[str, int]:
    return PruneReport.merged(reports).removed


def assert_transcripts_match_windows(rt: Runtime, run_ids: list[str]) -> None:
    """Each run's transcript (the first message of its history) is its window, rendered."""
    for run_id in run_ids:
        found = rt.get_run(run_id)
        group = rt.get_group(found.group_id)
        primary = {m.sequence: m for m in rt.list_messages(group.primary_agent_id)}
        window = [primary[s] for s in range(found.window_first_seq, found.window_last_seq + 1)]
        given = next(m for m in rt.list_messages(found.agent_id) if m.run_id == run_id)
        expected = render_transcript(window, group.preamble, group.transcript_max_messages)
        assert given.text() == expected


def test_prune_under_a_live_workload_keeps_the_invariants(rt: Runtime, db_url: str) -> None:
    groups = [
        rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY, MEMORY], frequency=frequency)
        for frequency in (1, 2, None)
    ]
    results: list[TurnResult] = []
    lock = threading.Lock()

    def drive(index: int) -> None:
        for turn in range(12):
            said = [user(f"my favorite color is c{turn}")]
            result = rt.step(groups[index].id, said, request_id=f"g{index}-t{turn}")
            with lock:
                results.append(result)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(groups))]
    for thread in threads:
        thread.start()
    options = {
        "keep_runs": 1,
        "messages": True,
        "keep_messages": 2,
        "batch_size": 3,
        "before": later(),
    }
    reports = [rt.prune(**options)]  # type: ignore[arg-type]
    while any(thread.is_alive() for thread in threads):
        reports.append(rt.prune(**options))  # type: ignore[arg-type]
    for thread in threads:
        thread.join()
    run_ids = [run_id for result in results for run_id in result.run_ids]
    still_open = rt.list_runs(statuses=["created", "running"])  # the others may be gone
    rt.wait_for_runs([r.id for r in still_open], timeout=60)
    reports.append(rt.prune(**options))  # type: ignore[arg-type]

    report = rt.check_invariants()
    assert report.ok, report.violations
    removed = added_up(reports)
    assert removed == recorded_prunes(db_url)  # each batch added its counts to `prunes`
    counts = count_rows(db_url)
    assert counts["runs"] + removed["runs"] == len(run_ids)
    assert counts["run_events"] + removed["run_events"] == 3 * len(run_ids)
    assert counts["turn_requests"] + removed["turn_requests"] == len(results) == 36
    marks = [rt._store.retention_marks(g.id) for g in groups]
    assert removed["messages"] == sum(m.messages_pruned_through for m in marks) > 0
    assert counts["messages"] + removed["messages"] == 2 * len(results)  # input + answer
    for group in groups:  # the newest run of each agent stays
        assert len(rt.list_runs(group_id=group.id)) == 2
        assert len(rt.list_messages(group.primary_agent_id)) >= 2

    later_runs: list[str] = []
    for group in groups:
        for turn in range(3):
            later_runs += rt.step(group.id, [user(f"my name is Ada {turn}")]).run_ids
    finished = rt.wait_for_runs(later_runs, timeout=60)
    assert later_runs and all(r.status.value == "completed" for r in finished)
    assert_transcripts_match_windows(rt, later_runs)
    report = rt.check_invariants()
    assert report.ok, report.violations
    assert "Ada 2" in rt.get_blocks(groups[0].primary_agent_id)["human"].value


def test_the_window_of_a_run_not_yet_terminal_is_never_removed(db_url: str) -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "recorder"}], frequency=1)
        run_ids = rt.step(group.id, [user("one")]).run_ids
        recorder.wait_started()  # running, and the next two wait behind it
        run_ids += rt.step(group.id, [user("two")]).run_ids
        run_ids += rt.step(group.id, [user("three")]).run_ids
        everything = {"keep_runs": 0, "messages": True, "keep_messages": 0, "before": later()}
        held = rt.prune(**everything)  # type: ignore[arg-type]
        assert held.removed["runs"] == held.removed["messages"] == 0
        assert len(rt.list_messages(group.primary_agent_id)) == 6
        gate.set()
        rt.wait_for_runs(run_ids, timeout=30)
        assert_transcripts_match_windows(rt, run_ids)
        gone = rt.prune(**everything)  # type: ignore[arg-type]
        assert (gone.removed["runs"], gone.removed["messages"]) == (3, 6)
        run_ids = rt.step(group.id, [user("four")]).run_ids
        rt.wait_for_runs(run_ids, timeout=30)
        assert_transcripts_match_windows(rt, run_ids)
        assert recorder.transcripts[-1].endswith("user: four\nassistant: I'll remember that.") or (
            "user: four" in recorder.transcripts[-1]
        )
        report = rt.check_invariants()
        assert report.ok, report.violations


def test_a_runtime_started_after_everything_was_pruned_goes_on(db_url: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
        run_ids = [i for n in range(3) for i in rt.step(group.id, [user(f"hi {n}")]).run_ids]
        rt.wait_for_runs(run_ids, timeout=30)
        rt.prune(keep_runs=0, messages=True, keep_messages=0, before=later())
        assert rt.list_messages(group.primary_agent_id) == []
        assert rt.list_runs(group_id=group.id) == []
        assert rt.list_messages(group.sleeptime_agent_ids[0]) == []
    with Runtime.start(db_url) as rt:  # every history goes on after what was removed
        run_ids = rt.step(group.id, [user("my name is Ada")]).run_ids
        rt.wait_for_runs(run_ids, timeout=30)
        assert [m.sequence for m in rt.list_messages(group.primary_agent_id)] == [7, 8]
        (run_,) = rt.list_runs(group_id=group.id)
        assert (run_.window_first_seq, run_.window_last_seq) == (7, 8)
        own = rt.list_messages(group.sleeptime_agent_ids[0])
        assert own and own[0].sequence > 3  # after the three runs' messages removed
        assert_transcripts_match_windows(rt, run_ids)
        assert rt.get_group(group.id).turns == 4
        report = rt.check_invariants()
        assert report.ok, report.violations


def test_a_retry_after_a_prune_answers_as_before_until_its_request_goes(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    first = rt.step(group.id, [user("hi")], request_id="order-1")
    more = [i for n in range(2) for i in rt.step(group.id, [user(f"and {n}")]).run_ids]
    rt.wait_for_runs(first.run_ids + more, timeout=30)
    rt.prune(keep_runs=0, messages=True, keep_messages=0)  # no `before`: requests stay
    again = rt.step(group.id, [user("hi")], request_id="order-1")
    assert (again.turn, again.fired, again.run_ids) == (first.turn, first.fired, first.run_ids)
    assert again.messages == []  # its messages were removed: the answer lists what remains
    assert rt.prune(before=later()).removed["turn_requests"] == 1
    fresh = rt.step(group.id, [user("hi")], request_id="order-1")
    assert fresh.turn == 4  # a retry with a removed request id takes a new turn
    rt.wait_for_runs(fresh.run_ids, timeout=30)
    report = rt.check_invariants()
    assert report.ok, report.violations


def test_a_dry_run_counts_what_a_prune_then_removes(rt: Runtime, db_url: str) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY, MEMORY], frequency=2)
    run_ids = [
        i
        for n in range(7)
        for i in rt.step(group.id, [user(f"hi {n}")], request_id=f"r{n}").run_ids
    ]
    rt.wait_for_runs(run_ids, timeout=30)
    options = {"before": later(), "keep_runs": 1, "messages": True, "keep_messages": 3}
    before = count_rows(db_url)
    counted = rt.prune(dry_run=True, **options)  # type: ignore[arg-type]
    assert count_rows(db_url) == before and counted.batches == 0
    done = rt.prune(batch_size=2, **options)  # type: ignore[arg-type]
    assert done.removed == counted.removed and done.by_group == counted.by_group
    after = count_rows(db_url)
    assert {kind: before[kind] - after[kind] for kind in PRUNE_KINDS} == done.removed
    assert done.removed["runs"] == 6 and done.batches >= 3
    assert rt.prune(dry_run=True, **options).removed == dict.fromkeys(PRUNE_KINDS, 0)  # type: ignore[arg-type]


def test_before_keeps_what_is_newer(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    run_ids = []
    for n in range(4):  # one after the other: each run completes before the next turn
        run_ids += rt.step(group.id, [user(f"hi {n}")]).run_ids
        rt.wait_for_runs(run_ids, timeout=30)
    runs = rt.list_runs(group_id=group.id)
    history = rt.list_messages(group.primary_agent_id)
    report = rt.prune(before=runs[2].completed_at)
    assert report.removed["runs"] == 2
    assert [r.id for r in rt.list_runs(group_id=group.id)] == [r.id for r in runs[2:]]
    report = rt.prune(messages=True, before=history[4].created_at)
    assert report.removed["messages"] == 4  # turns 1 and 2: created before the 5th message
    assert rt.list_messages(group.primary_agent_id) == history[4:]
    checked = rt.check_invariants()
    assert checked.ok, checked.violations


def test_old_block_versions_go_but_never_the_current_one(rt: Runtime, db_url: str) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    for n in range(2, 6):  # versions 1 (created) to 5
        rt.set_block(group.id, "human", f"v{n}")
    human = rt.get_block(group.id, "human")
    assert human.version == 5
    report = rt.prune(keep_block_versions=2, batch_size=2)
    assert report.removed["block_versions"] == 3  # the other blocks have one version each
    kept = [v.version for v in rt.block_history(group.id, "human")]
    assert kept == [4, 5]
    assert rt.get_block(group.id, "human").value == "v5"
    assert rt.check_invariants([group.id]).ok
    # The current version stays whatever is asked: here the only one of each other block.
    assert rt.prune(keep_block_versions=1).removed["block_versions"] == 1
    assert [v.version for v in rt.block_history(group.id, "human")] == [5]


def test_a_deleted_blocks_versions_go_once_it_was_deleted_before_before(
    rt: Runtime, db_url: str
) -> None:
    """Per block its newest versions stay, but a block deleted before `before` goes whole:
    a service that creates and deletes blocks would otherwise keep rows of each for ever."""
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    for n in range(3):
        rt.create_block(group.id, "scratch", f"draft {n}")
        rt.set_block(group.id, "scratch", f"draft {n}, again")
        rt.delete_block(group.id, "scratch")
    assert len(rt.block_history(group.id, "scratch")) == 9
    # Without `before`: each deleted block keeps its newest version (its deletion).
    assert rt.prune(keep_block_versions=1).removed["block_versions"] == 6
    assert len(rt.block_history(group.id, "scratch")) == 3
    report = rt.prune(keep_block_versions=1, before=later())
    assert report.removed["block_versions"] == 3
    with pytest.raises(BlockNotFound):  # nothing of it is left
        rt.block_history(group.id, "scratch")
    assert [v.version for v in rt.block_history(group.id, "human")] == [1]  # current: stays
    assert rt.check_invariants([group.id]).ok


def test_a_groups_prune_records_are_kept_to_its_newest_calls(
    rt: Runtime, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning on a schedule must not grow a table of its own: each group keeps the
    records of its newest KEEP_PRUNE_RECORDS calls that removed something."""
    monkeypatch.setattr(retention, "KEEP_PRUNE_RECORDS", 3)
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    for n in range(5):
        rt.set_block(group.id, "human", f"v{n}")
        rt.set_block(group.id, "human", f"v{n}, again")
        assert rt.prune(keep_block_versions=1).removed["block_versions"] >= 1
    assert len(column(db_url, "SELECT id FROM prunes")) == 3


def test_bad_options_and_read_only_runtimes(rt: Runtime, db_url: str) -> None:
    for bad in (
        {},  # nothing to prune
        {"before": datetime(2025, 1, 1)},  # naive: ambiguous
        {"keep_runs": -1},
        {"keep_messages": 3},  # without messages=True
        {"keep_block_versions": 0},
        {"messages": True, "batch_size": 0},
        {"messages": "yes"},
        {"messages": True, "group_ids": [""]},
        {"messages": True, "dry_run": "no"},
        # Aware, but out of range once in UTC (the time rows are stored in).
        {"before": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))},
        {"before": datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))},
    ):
        with pytest.raises(ValidationError):
            rt.prune(**bad)
    with pytest.raises(GroupNotFound):
        rt.prune(messages=True, group_ids=["group-nobody-made"])
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    rt.stop()
    with Runtime.start(db_url, read_only=True) as viewer:
        with pytest.raises(ReadOnlyRuntime):
            viewer.prune(keep_runs=0)
        assert viewer.prune(keep_runs=0, dry_run=True).removed["runs"] == 1


def test_the_async_api_prunes(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    run_ids = [i for n in range(3) for i in rt.step(group.id, [user(f"hi {n}")]).run_ids]
    rt.wait_for_runs(run_ids, timeout=30)

    async def main() -> PruneReport:
        art = AsyncRuntime.wrap(rt)
        counted = await art.prune(keep_runs=1, dry_run=True)
        assert counted.removed["runs"] == 2
        return await art.prune(keep_runs=1, group_ids=[group.id])

    report = asyncio.run(asyncio.wait_for(main(), 30))
    assert report.removed["runs"] == 2 and list(report.by_group) == [group.id]


def test_groups_another_process_serves_are_skipped(db_url: str, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("one process owns a SQLite file whole")
    # 2 s leases: at 1 s a busy machine (two test processes on two cores) may let the first
    # process's leases lapse, and the second take its groups, before the prune looks.
    first = Runtime.start(db_url, lease_s=2.0, shards=8)
    try:
        second = Runtime.start(db_url, lease_s=2.0, shards=8)
        try:
            mine = [first.create_group(primary=SCRIPTED, sleeptime=[MEMORY]) for _ in range(3)]
            theirs = [second.create_group(primary=SCRIPTED, sleeptime=[MEMORY]) for _ in range(3)]
            for rt, groups in ((first, mine), (second, theirs)):
                rt.wait_for_runs([rt.step(g.id, [user("hi")]).run_ids[0] for g in groups], 30)
            report = first.prune(keep_runs=0, before=later())
            assert sorted(report.skipped) == sorted(g.id for g in theirs)
            assert sorted(report.by_group) == sorted(g.id for g in mine)
            assert report.removed["runs"] == 3 and report.groups == 6
        finally:
            second.stop(drain_timeout=5)
    finally:
        first.stop(drain_timeout=5)


def test_a_prune_killed_with_sigkill_leaves_each_batch_whole_or_absent(db_url: str) -> None:
    with Runtime.start(db_url) as rt:
        groups = [
            rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY, MEMORY], frequency=1)
            for _ in range(2)
        ]
        run_ids = []
        for turn in range(25):
            for group in groups:
                said: list[Any] = [user(f"q{turn}"), {"role": "assistant", "content": f"a{turn}"}]
                run_ids += rt.record_turn(group.id, said, request_id=f"t{turn}").run_ids
        rt.wait_for_runs(run_ids, timeout=60)
    before = count_rows(db_url)
    child = subprocess.Popen(
        [sys.executable, str(CHILD), db_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLEEPTIME_LOG_LEVEL": "critical"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "pruning"
        # Some batches done (about a hundred are to come), then a kill in the middle.
        assert wait_until(lambda: sum(recorded_prunes(db_url).values()) >= 25, timeout=60)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    after = count_rows(db_url)
    removed = recorded_prunes(db_url)
    assert {kind: before[kind] - after[kind] for kind in PRUNE_KINDS} == removed
    with Runtime.start(db_url, lease_s=1.0) as rt:  # the dead one's leases lapse soon
        report = rt.check_invariants()
        assert report.ok, report.violations
        finish = rt.prune(before=later(), keep_runs=1, messages=True, keep_messages=2)
        report = rt.check_invariants()
        assert report.ok, report.violations
        assert finish.removed["runs"] + removed["runs"] == len(run_ids) - 4
        run_ids = [i for g in groups for i in rt.step(g.id, [user("my name is Ada")]).run_ids]
        rt.wait_for_runs(run_ids, timeout=30)
        assert_transcripts_match_windows(rt, run_ids)
        assert rt.check_invariants().ok


def test_run_py_prune_counts_then_removes(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
        run_ids = [i for n in range(4) for i in rt.step(group.id, [user(f"hi {n}")]).run_ids]
        rt.wait_for_runs(run_ids, timeout=30)
    options = ["--older-than", "0s", "--keep-runs", "1", "--messages", "--keep-messages", "2"]
    assert run.main(["prune", "--db", db_url, "--dry-run", *options]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Would remove from 1 group(s)")
    assert [line.split() for line in out.splitlines() if line.startswith("runs ")] == [
        ["runs", "3"]
    ]
    assert "without --dry-run" in out
    assert run.main(["prune", "--db", db_url, *options, "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Removed from 1 group(s)") and "1 group(s) pruned in" in out
    assert run.main(["check", "--db", db_url]) == 0
    capsys.readouterr()
    assert run.main(["runs", "--db", db_url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 run(s), newest first"
    assert run.main(["prune", "--db", db_url]) == 2
    assert "nothing to prune" in capsys.readouterr().err
    assert run.main(["prune", "--db", db_url, "--older-than", "soon"]) == 2
    assert "is not an age" in capsys.readouterr().err


def test_a_run_gone_between_its_end_and_its_read_back_is_not_found(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait_for_runs` reads the runs back once they ended; one a prune (or its group's
    deletion) removed in between raises RunNotFound, as the README says (a bare KeyError
    before)."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with Runtime.start(db_url, kinds={"rec": recorder.factory}) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "rec"}])
        (run_id,) = rt.step(group.id, [user("hi")]).run_ids
        recorder.started.acquire(timeout=30)
        outcome: list[BaseException | None] = []

        def wait() -> None:
            try:
                rt.wait_for_runs([run_id], timeout=30)
            except BaseException as error:
                outcome.append(error)
            else:
                outcome.append(None)

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert wait_until(lambda: run_id in rt._parts.waiters.run_ids())  # it waits
        monkeypatch.setattr("persistence.Store.get_runs", lambda self, ids: {})  # it was pruned
        gate.set()
        waiter.join(30)
        monkeypatch.undo()
        assert len(outcome) == 1
        assert type(outcome[0]).__name__ == "RunNotFound", outcome


@pytest.mark.parametrize(
    "options",
    [
        ["--older-than", "999999d"],
        ["--older-than", "99999999999d"],
        ["--before", "0001-01-01T00:00:00+05:00"],
    ],
)
def test_cli_refuses_times_out_of_range_plainly(
    db_url: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    Runtime.start(db_url).stop()
    code = run.main(["prune", "--db", db_url, *options])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert "before year 1" in error or "out of range once in UTC" in error
