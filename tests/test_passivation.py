"""Passivation: idle groups give their threads back and wake from the store on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from actors import Runtime
from messages import RunStatus
from tests.agents import Echo, Recorder, user


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition the runtime's own timer makes true (no event to wait on)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.02)
    return True


def test_active_groups_are_capped_and_threads_stay_bounded(db_url: str) -> None:
    with Runtime.start(db_url, max_active_groups=4, passivate_after=None) as rt:
        groups = [
            rt.create_group(
                primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
            ).id
            for _ in range(30)
        ]
        baseline = threading.active_count()
        run_ids = []
        for round_ in range(3):
            for group_id in groups:
                result = rt.step(group_id, [user(f"my round is {round_}")])
                run_ids += result.run_ids
                rt.wait_for_runs(result.run_ids, timeout=30)
        assert rt.stats()["groups"] <= 4
        assert rt.stats()["passivated"] >= 30 * 3 - 4
        assert threading.active_count() <= baseline + 2 * 4 + 2
        runs = rt.wait_for_runs(run_ids, timeout=60)
        assert all(r.status is RunStatus.COMPLETED for r in runs)
        for group_id in groups:  # every wake-up continued from the stored state
            group = rt.get_group(group_id)
            assert (group.turns, group.counter) == (3, 0)
        assert rt.check_invariants().ok


def test_idle_group_is_passivated_and_wakes_where_it_left_off(db_url: str) -> None:
    with Runtime.start(db_url, passivate_after=0.1) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=2
        )
        first = rt.step(group.id, [user("my favorite color is red")])
        rt.wait_for_runs(first.run_ids, timeout=30)
        assert _until(lambda: rt.stats()["groups"] == 0 and rt.stats()["agents"] == 0)
        second = rt.step(group.id, [user("what is my favorite color?")])
        assert (second.turn, second.fired) == (2, False)
        assert second.messages[0].text() == "Your favorite color is red."
        third = rt.step(group.id, [user("my favorite color is blue")])
        assert third.fired and third.turn == 3
        assert rt.wait_for_runs(third.run_ids, timeout=30)[0].status is RunStatus.COMPLETED
        assert rt.stats()["passivated"] >= 1
        assert rt.check_invariants().ok


def test_a_group_with_work_in_flight_is_never_passivated(db_url: str) -> None:
    gate = threading.Event()
    busy = Recorder(gate=gate)
    try:
        with Runtime.start(
            db_url,
            kinds={"echo": Echo, "busy": busy.factory},
            max_active_groups=1,
            passivate_after=0.05,
        ) as rt:
            slow = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "busy"}])
            quick = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])
            held = rt.step(slow.id, [user("hold this")]).run_ids
            busy.wait_started()
            for n in range(5):  # pressure on the cap while the first group's run is held
                rt.wait_for_runs(rt.step(quick.id, [user(f"n {n}")]).run_ids, timeout=30)
            assert rt.get_run(held[0]).status is RunStatus.RUNNING
            gate.set()
            assert rt.wait_for_runs(held, timeout=30)[0].status is RunStatus.COMPLETED
            assert busy.most_active == 1
            assert rt.check_invariants().ok
    finally:
        gate.set()
