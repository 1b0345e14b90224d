"""kill -9 at a random moment: the next runtime finishes or fails every run, nothing breaks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from actors import Runtime
from messages import RunStatus

CHILD = Path(__file__).resolve().parent / "kill9_child.py"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_runtime_killed_with_sigkill_recovers_every_run(db_url: str, seed: int) -> None:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), db_url, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLEEPTIME_LOG_LEVEL": "critical"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for _ in range(random.Random(seed).randint(8, 60)):  # a seeded moment to die
            assert child.stdout.readline().strip() == "turn"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    with Runtime.start(db_url) as rt:  # recovery re-queues what the dead process left open
        open_runs = rt.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
        assert open_runs  # 15 ms agents behind ms-long turns: the kill always leaves some
        runs = rt.wait_for_runs([r.id for r in open_runs], timeout=60)
        assert all(r.status.terminal for r in runs)
        for run in runs:
            if run.status is RunStatus.FAILED:  # failed on purpose, or past max_attempts
                assert run.stop_reason is not None
        report = rt.check_invariants()
        assert report.ok, report.violations
        assert report.runs > 0
        for group in rt.list_groups():  # every stored input is a counted turn
            inputs = [m for m in rt.list_messages(group.primary_agent_id) if m.role == "user"]
            assert len(inputs) == group.turns
