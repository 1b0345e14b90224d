"""The invariant checker finds each kind of damage (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from actors import INVARIANTS, Runtime
from actors._invariants import (
    Event,
    attempts_decrease,
    overlapping_runs,
    request_problems,
    runs_out_of_order,
    stale_writes,
)
from messages import Run, RunStatus
from persistence._engine import parse_url
from tests.agents import user

Damage = Callable[[dict[str, str]], str]

# Each damage is one or more statements (split at ";"), with :run the group's last run
# (its second agent's), :first its first run (the first agent's) and :group the group.
DAMAGE: list[tuple[str, str, str]] = [
    ("runs_terminal", "UPDATE runs SET status = 'running' WHERE id = :run", "is running"),
    (
        "histories_legal",
        "DELETE FROM run_events WHERE run_id = :run AND status = 'running'",
        "created -> completed",
    ),
    ("turns_counted", "UPDATE groups SET turns = turns + 1 WHERE id = :group", "turns counted"),
    ("counters_consistent", "UPDATE groups SET counter = 7 WHERE id = :group", "counter 7"),
    ("one_run_per_agent_per_fire", "DELETE FROM runs WHERE id = :run", "1 run(s)"),
    (
        "windows_contiguous_disjoint_covering",
        "UPDATE runs SET window_first_seq = window_first_seq + 1 WHERE id = :run",
        "window",
    ),
    (
        "attempts_monotonic",
        "UPDATE run_events SET attempt = 2 WHERE run_id = :run AND status = 'created'",
        "attempts 2 -> 1 -> 1",
    ),
    (
        "agent_runs_disjoint",  # the last run started before the agent's earlier ones ended
        "UPDATE runs SET started_at = (SELECT created_at FROM runs WHERE id = :first) "
        "WHERE id = :run",
        "started",
    ),
    (
        "agent_runs_disjoint",  # the same, seen in the events of runs without timestamps
        "UPDATE runs SET started_at = NULL, completed_at = NULL WHERE group_id = :group;"
        "UPDATE run_events SET at = (SELECT min(e.at) FROM run_events e) "
        "WHERE run_id = :run AND status = 'running'",
        "started",
    ),
    (
        "agent_runs_disjoint",  # a run that started and never ended, with later runs
        "UPDATE runs SET completed_at = NULL WHERE id = :first;"
        "DELETE FROM run_events WHERE run_id = :first AND status = 'completed'",
        "never ended",
    ),
    (
        "agent_runs_in_order",  # the last run started (and ended) before the earlier ones
        "UPDATE runs SET started_at = (SELECT created_at FROM runs WHERE id = :first), "
        "completed_at = (SELECT created_at FROM runs WHERE id = :first) WHERE id = :run",
        "created earlier",
    ),
    (
        "request_ids_unique",  # the primary key gone, a request recorded twice
        "CREATE TABLE loose AS SELECT * FROM turn_requests;"
        "DROP TABLE turn_requests;"
        "ALTER TABLE loose RENAME TO turn_requests;"
        "INSERT INTO turn_requests SELECT * FROM turn_requests WHERE request_id = 'req-0'",
        "'req-0' recorded more than once",
    ),
    (
        "request_ids_unique",
        "UPDATE turn_requests SET turn = 1 WHERE group_id = :group AND request_id = 'req-4'",
        "both name turn 1",
    ),
    (
        "request_ids_unique",
        "UPDATE turn_requests SET turn = 9 WHERE group_id = :group AND request_id = 'req-4'",
        "names turn 9 of 5",
    ),
    (
        "epochs_monotonic",  # an event accepted from a lease older than one before it
        "UPDATE run_events SET epoch = epoch + 5 WHERE id = (SELECT min(id) FROM run_events)",
        "written under epoch",
    ),
]


DAMAGE_IDS = [
    check if [d[0] for d in DAMAGE[:i]].count(check) == 0 else f"{check}-{i}"
    for i, (check, _, _) in enumerate(DAMAGE)
]


@pytest.mark.parametrize(("check", "statement", "says"), DAMAGE, ids=DAMAGE_IDS)
def test_each_kind_of_damage_is_found(db_url: str, check: str, statement: str, says: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"},
            sleeptime=[{"kind": "memory"}, {"kind": "memory"}],
            frequency=2,
        )
        run_ids = [
            r
            for n in range(5)
            for r in rt.step(group.id, [user(f"hi {n}")], request_id=f"req-{n}").run_ids
        ]
        rt.wait_for_runs(run_ids, timeout=30)
        healthy = rt.check_invariants()
        assert healthy.ok and healthy.runs == 6 and set(healthy.checks) == set(INVARIANTS)
    engine = create_engine(parse_url(db_url))
    with engine.begin() as connection:
        for part in statement.split(";"):
            names = {"run": run_ids[-1], "first": run_ids[0], "group": group.id}
            connection.execute(text(part), {k: v for k, v in names.items() if f":{k}" in part})
    engine.dispose()
    with Runtime.start(db_url, read_only=True) as rt:
        report = rt.check_invariants([group.id])
    assert not report.ok
    assert report.checks[check] is False
    assert any(v.startswith(check) and says in v for v in report.violations), report.violations


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_runs_of_one_agent_start_in_the_order_they_were_created() -> None:
    def run(turn: int, started: float | None, position: int = 0) -> Run:
        return Run(
            id=f"run-{turn}-{position}",
            group_id="group-1",
            agent_id="agent-1",
            status=RunStatus.COMPLETED,
            turn=turn,
            window_first_seq=1,
            window_last_seq=2,
            created_at=at(turn),
            started_at=None if started is None else at(started),
            metadata={"position": position} if position else {},
        )

    requeued: dict[str, list[Event]] = {  # first started at 1, interrupted, again at 3
        "run-1-0": [("created", 1, at(0)), ("running", 1, at(1)), ("created", 2, at(2))]
    }
    assert runs_out_of_order([run(1, 3), run(2, None), run(3, 5)], requeued) == []
    backfill = [run(4, 9, position=1), run(4, 8, position=0), run(5, 10)]  # (any order given)
    assert runs_out_of_order(backfill, {}) == []
    found = runs_out_of_order([run(1, 6), run(3, 5)], {})
    assert len(found) == 1 and "run-3-0" in found[0] and "run-1-0" in found[0]


def test_attempts_may_only_grow_along_the_events() -> None:
    assert not attempts_decrease([])
    assert not attempts_decrease([("created", 1, T0), ("running", 1, T0), ("created", 2, T0)])
    assert attempts_decrease([("created", 2, T0), ("running", 1, T0)])


def ran(run_id: str, started: float | None, ended: float | None) -> Run:
    return Run(
        id=run_id,
        group_id="group-g",
        agent_id="agent-a",
        status=RunStatus.COMPLETED,
        turn=1,
        window_first_seq=1,
        window_last_seq=1,
        created_at=T0,
        started_at=None if started is None else at(started),
        completed_at=None if ended is None else at(ended),
    )


OVERLAPS = [
    ([ran("a", 0, 1), ran("b", 1, 2), ran("c", 5, 6)], []),  # back to back is fine
    ([ran("a", 0, 3), ran("b", 2, 4)], ["run a ended"]),
    ([ran("b", 2, 4), ran("a", 0, 3)], ["run a ended"]),  # sorted by start, not by id
    ([ran("a", 0, None), ran("b", 2, 4)], ["run a never ended"]),
    ([ran("a", None, 9), ran("b", 2, 4)], []),  # a never started (cancelled while created)
]


@pytest.mark.parametrize(("runs", "found"), OVERLAPS)
def test_runs_of_one_agent_must_not_overlap(runs: list[Run], found: list[str]) -> None:
    problems = overlapping_runs(runs, {})
    assert len(problems) == len(found)
    assert all(p.startswith(f) for p, f in zip(problems, found, strict=True)), problems


def test_overlaps_fall_back_to_the_events_times() -> None:
    events: dict[str, list[Event]] = {
        "a": [("created", 1, at(0)), ("running", 1, at(1)), ("completed", 1, at(5))],
        "b": [("created", 1, at(0)), ("running", 1, at(3)), ("completed", 1, at(6))],
    }
    problems = overlapping_runs([ran("a", None, None), ran("b", None, None)], events)
    assert len(problems) == 1 and problems[0].startswith("run a ended")


REQUESTS = [
    ([("r1", 1), ("r2", 2)], 2, []),
    ([("r1", 1), ("r1", 2)], 2, ["request 'r1' recorded more than once (turns 1, 2)"]),
    ([("r1", 1), ("r2", 1)], 2, ["requests 'r1' and 'r2' both name turn 1"]),
    ([("r1", 3)], 2, ["request 'r1' names turn 3 of 2"]),
]


@pytest.mark.parametrize(("requests", "turns", "found"), REQUESTS)
def test_each_request_id_is_recorded_once_with_a_turn_of_its_own(
    requests: list[tuple[str, int]], turns: int, found: list[str]
) -> None:
    assert request_problems(requests, turns) == found


@pytest.mark.parametrize(
    ("epochs", "found"),
    [
        ([], []),
        ([(1, 0), (2, 0), (3, 0)], []),  # SQLite: one process, epoch 0 throughout
        ([(1, None), (2, 3), (3, 3), (4, 4)], []),  # older rows without an epoch, a takeover
        ([(1, 3), (2, 4), (3, 3)], ["event 3 written under epoch 3 after event 2 under epoch 4"]),
        (
            [(1, 4), (2, None), (3, 2), (4, 5)],
            ["event 3 written under epoch 2 after event 1 under epoch 4"],
        ),
    ],
)
def test_no_write_is_accepted_from_a_stale_epoch(
    epochs: list[tuple[int, int | None]], found: list[str]
) -> None:
    assert stale_writes(epochs) == found


def test_a_check_made_while_the_runtime_works_sees_one_moment(db_url: str) -> None:
    """Checks made while turns and runs are being committed read one snapshot: open runs
    fail `runs_terminal`, and nothing else ever fails (a run read as `running` next to a
    `completed` event committed a moment later would read as an illegal history)."""
    with Runtime.start(db_url, workers=8) as rt:
        group_ids = [
            rt.create_group(
                primary={"kind": "simulated"},
                sleeptime=[{"kind": "simulated", "config": {"latency_ms": 1}}] * 2,
                frequency=1,
            ).id
            for _ in range(8)
        ]
        for group_id in group_ids:  # every check finds runs
            rt.step(group_id, [user("my name is Ada")])
        stop = threading.Event()

        def drive(group_id: str) -> None:
            while not stop.is_set():
                rt.step(group_id, [user("my favorite color is coral")])

        drivers = [threading.Thread(target=drive, args=(g,)) for g in group_ids]
        for driver in drivers:
            driver.start()
        try:
            reports = [rt.check_invariants(group_ids) for _ in range(25)]
        finally:
            stop.set()
            for driver in drivers:
                driver.join(timeout=30)
        assert all(r.runs > 0 for r in reports)
        for report in reports:
            failed = [name for name, ok in report.checks.items() if not ok]
            assert failed in ([], ["runs_terminal"]), report.violations[:5]
        open_runs = rt.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
        rt.wait_for_runs([r.id for r in open_runs], timeout=60)
        assert rt.check_invariants(group_ids).ok
