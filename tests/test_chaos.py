"""Chaos: actors crash and agents fail at random; afterwards every invariant holds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from actors import Chaos, RestartPolicy, Runtime
from messages import RunStatus, StopReason
from tests.agents import user

SIMULATED = {"kind": "simulated", "config": {"latency_ms": 1, "jitter_ms": 1, "seed": 5}}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crashes_and_failures_cost_nothing_but_time(db_url: str, seed: int) -> None:
    chaos = Chaos(crash_rate=0.05, failure_rate=0.1, seed=seed)
    policy = RestartPolicy(
        max_restarts=100, within_seconds=10, backoff_base=0.001, backoff_max=0.02
    )
    with Runtime.start(db_url, chaos=chaos, restart_policy=policy) as rt:
        groups = [
            rt.create_group(
                primary={"kind": "scripted"},
                sleeptime=[{"kind": "memory"}, SIMULATED],
                frequency=frequency,
                max_attempts=20,
            ).id
            for frequency in (None, 1, 2, 3, 1, 2)
        ]

        def drive(group_id: str) -> list[str]:
            run_ids = []
            for n in range(12):  # a turn that raised would fail the test, as it should
                run_ids += rt.step(group_id, [user(f"my number is {n}")]).run_ids
            return run_ids

        with ThreadPoolExecutor(len(groups)) as pool:
            run_ids = [r for ids in pool.map(drive, groups) for r in ids]
        runs = rt.wait_for_runs(run_ids, timeout=120)
        stats = rt.stats()
        report = rt.check_invariants()
    assert report.ok, report.violations
    assert stats["injected_crashes"] > 0 and stats["restarts"] > 0
    assert stats["escalations"] == 0
    failed = [r for r in runs if r.status is RunStatus.FAILED]
    assert failed, "some agent steps failed on purpose"
    assert all(r.stop_reason is StopReason.ERROR and "chaos" in (r.error or "") for r in failed)
    assert {r.status for r in runs} <= {RunStatus.COMPLETED, RunStatus.FAILED}
