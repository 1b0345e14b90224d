"""The invariant checker finds each kind of damage (a checker that cannot fail proves nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import create_engine, text

from actors import INVARIANTS, Runtime
from persistence._engine import parse_url
from tests.agents import user

Damage = Callable[[dict[str, str]], str]

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
]


@pytest.mark.parametrize(("check", "statement", "says"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_each_kind_of_damage_is_found(db_url: str, check: str, statement: str, says: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"},
            sleeptime=[{"kind": "memory"}, {"kind": "memory"}],
            frequency=2,
        )
        run_ids = [r for n in range(5) for r in rt.step(group.id, [user(f"hi {n}")]).run_ids]
        rt.wait_for_runs(run_ids, timeout=30)
        healthy = rt.check_invariants()
        assert healthy.ok and healthy.runs == 6 and set(healthy.checks) == set(INVARIANTS)
    engine = create_engine(parse_url(db_url))
    with engine.begin() as connection:
        connection.execute(text(statement), {"run": run_ids[-1], "group": group.id})
    engine.dispose()
    with Runtime.start(db_url, read_only=True) as rt:
        report = rt.check_invariants([group.id])
    assert not report.ok
    assert report.checks[check] is False
    assert any(v.startswith(check) and says in v for v in report.violations), report.violations
