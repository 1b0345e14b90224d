"""A PostgreSQL server restarted under a live runtime: clear errors, then business as usual."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from actors import Runtime, StoreUnavailable
from messages import RunStatus
from tests.agents import user
from tests.invariants import check_group
from tests.logs import Records
from tests.postgres import PostgresCluster

SLOW = {"kind": "simulated", "config": {"latency_ms": 30, "seed": 3}}


def test_server_restart_fails_calls_clearly_and_loses_nothing(
    backend: str, rt: Runtime, request: pytest.FixtureRequest
) -> None:
    if backend != "postgresql":
        pytest.skip("a server restart is a PostgreSQL matter")
    postgres_cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    records = Records()
    runtime_logger = logging.getLogger("sleeptime")
    runtime_logger.addHandler(records)
    request.addfinalizer(lambda: runtime_logger.removeHandler(records))
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}, SLOW], frequency=1
    )
    before = []
    for n in range(6):
        before += rt.step(group.id, [user(f"my lucky number is {n}")]).run_ids
    committed = rt.get_group(group.id)

    postgres_cluster.stop("fast")
    try:
        calls: list[Callable[[], object]] = [
            lambda: rt.step(group.id, [user("during the outage")]),
            lambda: rt.get_group(group.id),
            lambda: rt.list_runs(group_id=group.id),
            lambda: rt.wait_for_runs(["run-unknown"], timeout=1),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
            assert time.monotonic() - started < 10
    finally:
        postgres_cluster.start()

    after = []
    for n in range(4):  # the runtime reconnects by itself
        after += rt.step(group.id, [user(f"my other number is {n}")]).run_ids
    # The writer logged the outage as it began, and its end with how long it lasted.
    unavailable, recovered = (
        records.events("store_unavailable")[0],
        records.events("store_recovered")[-1],
    )
    assert unavailable.level == recovered.level == logging.WARNING
    assert unavailable.record.created <= recovered.record.created
    assert "unavailable" in unavailable["error"] and recovered["outage_s"] > 0
    runs = rt.wait_for_runs(before + after, timeout=60)
    assert all(r.status.terminal for r in runs)
    assert all(r.status is RunStatus.COMPLETED for r in runs[len(before) :])
    for failed in (r for r in runs if r.status is RunStatus.FAILED):
        assert "unavailable" in (failed.error or "")
    stored = rt.get_group(group.id)
    assert stored.turns == committed.turns + 4  # the failed turn was not counted
    history = rt.list_messages(group.primary_agent_id)
    assert sum(m.role == "user" for m in history) == stored.turns
    assert "during the outage" not in [m.text() for m in history]
    check_group(rt, group.id)
