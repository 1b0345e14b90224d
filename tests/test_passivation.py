"""Passivation (SPEC 9): idle groups give their threads back and come back from the store."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from actors import AgentFactory, Chaos, Runtime
from actors._passivation import Idle, to_passivate
from actors._supervisor import Supervisor
from messages import RunStatus, StopReason
from tests.agents import Echo, Recorder, user


@pytest.mark.parametrize(
    ("children", "active", "idle_after", "max_active", "chosen"),
    [
        ([Idle("group:a", None, 0.0)], {"group:a"}, 99.0, None, ["group:a"]),  # idle long enough
        ([Idle("group:a", None, 1.0)], {"group:a"}, 99.0, None, []),  # told 99 s ago: not yet
        ([Idle("group:a", None, 0.0)], {"group:a"}, None, None, []),  # no limit
        ([Idle("agent:x", "group:a", 99.0)], {"agent:x"}, None, None, ["agent:x"]),  # parent gone
        ([Idle("agent:x", "group:a", 99.0)], {"agent:x", "group:a"}, None, None, []),
        (  # beyond the cap, the least recently told go first; agents are not counted in it
            [
                Idle("group:a", None, 50.0),
                Idle("group:b", None, 10.0),
                Idle("group:c", None, 30.0),
                Idle("agent:x", "group:a", 0.0),
            ],
            {"group:a", "group:b", "group:c", "agent:x"},
            None,
            1,
            ["group:b", "group:c"],
        ),
    ],
)
def test_which_children_passivate(
    children: list[Idle],
    active: set[str],
    idle_after: float | None,
    max_active: int | None,
    chosen: list[str],
) -> None:
    assert to_passivate(children, active, 100.0, idle_after, max_active, "group:") == chosen


def _supervisor(rt: Runtime) -> Supervisor:
    return rt._parts.supervisor


def _settled(rt: Runtime, groups: int, agents: int, timeout: float = 10.0) -> bool:
    return _supervisor(rt).wait_until(
        lambda s: s.active_count("group:") <= groups and s.active_count("agent:") <= agents,
        timeout,
    )


def test_an_idle_group_is_passivated_and_its_next_turn_starts_it_from_the_store(
    db_url: str,
) -> None:
    with Runtime.start(db_url, kinds={"echo": Echo}, passivate_after=0.2) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])
        first = rt.step(group.id, [user("my favorite color is coral")])
        rt.wait_for_runs(first.run_ids, timeout=30)
        assert _settled(rt, groups=0, agents=0)
        assert rt.stats()["passivations"] == 2  # the group and its sleeptime agent

        second = rt.step(group.id, [user("my favorite color is teal")])
        (run,) = rt.wait_for_runs(second.run_ids, timeout=30)
        assert run.status is RunStatus.COMPLETED and second.fired
        stored = rt.get_group(group.id)
        assert (stored.turns, stored.counter) == (2, -1)  # frequency None: counter unused
        assert "teal" in rt.get_blocks(group.sleeptime_agent_ids[0])["human"].value
        assert rt.stats()["activations"] >= 2
        assert rt.check_invariants().ok


def test_a_busy_agent_stays_while_its_group_is_passivated(db_url: str) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    kinds: dict[str, AgentFactory] = {"echo": Echo, "gated": recorder.factory}
    with Runtime.start(db_url, kinds=kinds, passivate_after=0.1) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "gated"}])
        result = rt.step(group.id, [user("hi")])
        recorder.wait_started()
        assert _settled(rt, groups=0, agents=1)
        assert rt.stats()["active_agents"] == 1  # it is running: it declines
        gate.set()
        (run,) = rt.wait_for_runs(result.run_ids, timeout=30)
        assert run.status is RunStatus.COMPLETED
        assert _settled(rt, groups=0, agents=0)  # done: it follows its group


def test_settings_changed_while_passivated_reach_the_new_instances(db_url: str) -> None:
    recorder = Recorder()
    kinds: dict[str, AgentFactory] = {"echo": Echo, "recorder": recorder.factory}
    with Runtime.start(db_url, kinds=kinds, passivate_after=0.1) as rt:
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        rt.wait_for_runs(rt.step(group.id, [user("one")]).run_ids, timeout=30)
        assert _settled(rt, groups=0, agents=0)
        rt.update_group(group.id, frequency=2)
        fired = [rt.step(group.id, [user(f"turn {i}")]).fired for i in range(4)]
        assert fired == [False, True, False, True]


@pytest.mark.parametrize("crash_rate", [0.0, 0.05])
def test_many_groups_under_a_small_cap_lose_nothing(db_url: str, crash_rate: float) -> None:
    chaos = Chaos(crash_rate=crash_rate, seed=11, crash_limit=3) if crash_rate else None
    with Runtime.start(
        db_url, kinds={"echo": Echo}, max_active_groups=3, chaos=chaos, passivate_after=None
    ) as rt:
        # More attempts than crashes per actor: an interrupted run always gets to finish.
        groups = [
            rt.create_group(
                primary={"kind": "echo"}, sleeptime=[{"kind": "simulated"}], max_attempts=5
            ).id
            for _ in range(24)
        ]

        def drive(group_id: str) -> list[str]:
            return [r for i in range(5) for r in rt.step(group_id, [user(f"t{i}")]).run_ids]

        with ThreadPoolExecutor(12) as pool:
            run_ids = [r for ids in pool.map(drive, groups) for r in ids]
        runs = rt.wait_for_runs(run_ids, timeout=60)
        assert len(runs) == 24 * 5
        assert all(r.status is RunStatus.COMPLETED for r in runs), [
            (r.status, r.attempt, r.error) for r in runs if r.status is not RunStatus.COMPLETED
        ]
        assert [rt.get_group(g).turns for g in groups] == [5] * 24
        assert rt.stats()["passivations"] > 0 and rt.stats()["activations"] > 0
        assert _settled(rt, groups=3, agents=3)
        supervisor = _supervisor(rt)
        for kind in ("group", "agent"):  # the kept count is the count, through crashes too
            assert supervisor.active_of_kind(kind) == supervisor.active_count(f"{kind}:")
        report = rt.check_invariants()
        assert report.ok, report


def test_passivation_settings_are_checked(db_url: str) -> None:
    with pytest.raises(ValidationError, match="passivate_after"):
        Runtime.start(db_url, passivate_after=0)
    with pytest.raises(ValidationError, match="max_active_groups"):
        Runtime.start(db_url, max_active_groups=0)


def test_an_agent_passivated_with_old_settings_starts_with_the_new_ones(db_url: str) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate, ignore_cancel=True)
    kinds: dict[str, AgentFactory] = {"echo": Echo, "gated": recorder.factory}
    with Runtime.start(db_url, kinds=kinds, passivate_after=0.1) as rt:
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "gated"}], run_timeout=600
        )
        gate.set()
        rt.wait_for_runs(rt.step(group.id, [user("one")]).run_ids, timeout=30)
        assert _settled(rt, groups=0, agents=0)
        gate.clear()
        rt.update_group(group.id, run_timeout=0.2)  # the agent is passivated meanwhile
        (run,) = rt.wait_for_runs(rt.step(group.id, [user("two")]).run_ids, timeout=30)
        gate.set()
        assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.TIMEOUT)
