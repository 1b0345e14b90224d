"""A crash-looping run tracker fails the runtime, loudly, and the next start recovers.

The tracker records every run change, so without it the runtime can take no work: once it
crash-loops past its policy, every call that would take work raises RuntimeFailed with
the reason, and nothing stored is changed, so a new start recovers the open runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from actors import Chaos, Runtime, RuntimeFailed
from messages import RunStatus
from tests.agents import Echo, user

KINDS: dict[str, Any] = {"echo": Echo}


class _Records(logging.Handler):
    """Keeps what reaches the `sleeptime` logger itself, whether or not an earlier test gave
    it an output of its own (which stops its records from reaching the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_crash_looping_tracker_fails_the_runtime_and_a_new_start_recovers(
    db_url: str,
) -> None:
    records = _Records()
    logger = logging.getLogger("sleeptime")
    logger.addHandler(records)
    try:
        _crash_loop_then_recover(db_url, records)
    finally:
        logger.removeHandler(records)


def _crash_loop_then_recover(db_url: str, records: _Records) -> None:
    with Runtime.start(db_url, kinds=KINDS) as rt:
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        first = rt.step(group.id, [user("my name is Ada")])
        rt.wait_for_runs(first.run_ids, timeout=30)

    rt = Runtime.start(db_url, kinds=KINDS, chaos=Chaos(crash_rate=1.0, only="tracker"))
    try:
        began = time.monotonic()
        turn = rt.step(group.id, [user("my favorite color is coral")])  # committed
        (run_id,) = turn.run_ids
        # The tracker crashes on every message: the wait ends with the reason, soon.
        with pytest.raises(RuntimeFailed, match="crashes within 10s") as failed:
            rt.wait_for_runs([run_id], timeout=60)
        assert time.monotonic() - began < 20
        reason = failed.value.reason
        assert "InjectedCrash" in reason

        refused_calls: list[Callable[[], Any]] = [
            lambda: rt.step(group.id, [user("hello?")]),
            lambda: rt.record_turn(group.id, [user("q"), {"role": "assistant", "content": "a"}]),
            lambda: rt.stream(group.id, [user("hello?")]),
            lambda: rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}]),
            lambda: rt.update_group(group.id, frequency=2),
            lambda: rt.cancel_run(run_id),
            lambda: rt.wait_for_runs([run_id], timeout=5),
        ]
        for call in refused_calls:
            with pytest.raises(RuntimeFailed) as refused:
                call()
            assert refused.value.reason == reason
            assert "start a new process" in str(refused.value)

        # What is stored is intact, and can still be read.
        run = rt.get_run(run_id)
        assert (run.status, run.attempt) == (RunStatus.CREATED, 1)
        stored = rt.get_group(group.id)
        assert stored.turns == 2 and stored.status != "failed"
        assert rt.stats()["escalations"] == 1
    finally:
        rt.stop(drain_timeout=1)
    # The record reaches the standard logging, at critical.
    assert any(
        r.levelno == logging.CRITICAL and r.getMessage().startswith("tracker_escalated")
        for r in records.records
    )

    with Runtime.start(db_url, kinds=KINDS) as rt:
        (run,) = rt.wait_for_runs([run_id], timeout=30)
        assert run.status is RunStatus.COMPLETED and run.attempt == 1
        assert "coral" in rt.get_blocks(group.primary_agent_id)["human"].value
        assert rt.get_group(group.id).turns == 2
        report = rt.check_invariants()
        assert report.ok, report.violations
