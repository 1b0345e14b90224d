"""Restarts: state continues from the store, open runs are re-queued, kinds can wait."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from actors import (
    AgentFactory,
    NotOwner,
    ReadOnlyRuntime,
    Runtime,
    RuntimeStopped,
    UnknownAgentKind,
)
from messages import RunStatus, StopReason
from tests.agents import Echo, Gated, Recorder, user, wait_until
from tests.invariants import check_group


def test_counter_cursor_and_history_continue_after_a_restart(db_url: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=3
        )
        for n in range(4):
            rt.wait_for_runs(rt.step(group.id, [user(f"my n is {n}")]).run_ids, timeout=30)
        before = rt.get_group(group.id)
    with Runtime.start(db_url) as rt:
        assert rt.get_group(group.id) == before
        fired = [rt.step(group.id, [user("again")]).fired for _ in range(3)]
        assert fired == [False, False, True]  # turns 5, 6, 7: frequency 3 fires on 1, 4, 7
        history = rt.list_messages(group.primary_agent_id)
        assert [m.sequence for m in history] == list(range(1, 15))
        rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group.id)], timeout=30)
        check_group(rt, group.id)


def test_run_interrupted_by_a_stop_is_requeued_by_the_next_start(db_url: str) -> None:
    gate = threading.Event()
    hung = Recorder(gate=gate)
    rt = Runtime.start(db_url, kinds={"echo": Echo, "worker": hung.factory})
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "worker"}])
    run_id = rt.step(group.id, [user("hello")]).run_ids[0]
    queued = rt.step(group.id, [user("second")]).run_ids[0]
    hung.wait_started()
    rt.stop(drain_timeout=0.05)
    assert rt.stopped
    try:
        finishing = Recorder()
        with Runtime.start(db_url, kinds={"echo": Echo, "worker": finishing.factory}) as again:
            first, second = again.wait_for_runs([run_id, queued], timeout=30)
            assert (first.status, first.attempt) == (RunStatus.COMPLETED, 2)
            assert (second.status, second.attempt) == (RunStatus.COMPLETED, 1)
            events = again.run_events(run_id)
            assert [(e.status, e.attempt, e.reason) for e in events] == [
                ("created", 1, "created"),
                ("running", 1, "started"),
                ("created", 2, "interrupted"),
                ("running", 2, "started"),
                ("completed", 2, "end_turn"),
            ]
            assert finishing.run_ids == [run_id, queued]  # original order
            check_group(again, group.id)
    finally:
        gate.set()


def test_run_interrupted_max_attempts_times_fails_as_interrupted(db_url: str) -> None:
    gate = threading.Event()
    hung = Recorder(gate=gate)
    kinds: dict[str, AgentFactory] = {"echo": Echo, "worker": hung.factory}
    try:
        rt = Runtime.start(db_url, kinds=kinds)
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "worker"}], max_attempts=2
        )
        run_id = rt.step(group.id, [user("hello")]).run_ids[0]
        hung.wait_started()
        rt.stop(drain_timeout=0)
        rt = Runtime.start(db_url, kinds=kinds)  # attempt 2 starts and hangs too
        hung.wait_started()
        assert rt.get_run(run_id).attempt == 2
        rt.stop(drain_timeout=0)
        with Runtime.start(db_url, kinds=kinds) as last:
            run = last.get_run(run_id)
            assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.INTERRUPTED)
            assert "interrupted 2 time(s)" in (run.error or "")
    finally:
        gate.set()


def test_unregistered_kind_fails_turns_and_queued_runs_wait_for_it(db_url: str) -> None:
    recorder = Recorder()
    with Runtime.start(db_url, kinds={"echo": Echo, "custom": recorder.factory}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "custom"}])
        other = rt.create_group(primary={"kind": "custom"}, sleeptime=[{"kind": "memory"}])
        rt.stop(drain_timeout=0)  # nothing queued yet
    late = Recorder()
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        with pytest.raises(UnknownAgentKind, match="'custom'"):
            rt.step(other.id, [user("hi")])
        assert rt.get_group(other.id).turns == 0  # nothing stored
        run_id = rt.step(group.id, [user("hi")]).run_ids[0]
        with pytest.raises(TimeoutError):
            rt.wait_for_runs([run_id], timeout=0.2)
        assert rt.get_run(run_id).status is RunStatus.CREATED
        rt.agents.register("custom", late.factory)
        assert rt.wait_for_runs([run_id], timeout=30)[0].status is RunStatus.COMPLETED
        assert late.run_ids == [run_id]


def test_read_only_runtime_inspects_without_recovering_or_changing(db_url: str) -> None:
    gate = threading.Event()
    hung = Recorder(gate=gate)
    try:
        rt = Runtime.start(db_url, kinds={"echo": Echo, "worker": hung.factory})
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "worker"}])
        run_id = rt.step(group.id, [user("hello")]).run_ids[0]
        hung.wait_started()
        rt.stop(drain_timeout=0)
        with Runtime.start(db_url, read_only=True) as viewer:
            run = viewer.get_run(run_id)
            assert (run.status, run.attempt) == (RunStatus.RUNNING, 1)  # not re-queued
            assert viewer.list_runs(newest_first=True)[0].id == run_id
            assert viewer.get_agent(group.primary_agent_id).kind == "echo"
            for call in (
                lambda: viewer.step(group.id, [user("x")]),
                lambda: viewer.cancel_run(run_id),
                lambda: viewer.update_group(group.id, frequency=3),
                lambda: viewer.create_group(
                    primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}]
                ),
            ):
                with pytest.raises(ReadOnlyRuntime, match="read_only=True"):
                    call()
        with Runtime.start(db_url, read_only=True) as viewer:
            assert viewer.get_run(run_id).attempt == 1
    finally:
        gate.set()


def test_a_turn_sent_once_stop_began_is_refused_and_no_actor_outlives_stop(db_url: str) -> None:
    """A turn admitted before `stop` and waiting for a permit is sent once stop began: it
    gets RuntimeStopped, and no new group actor is started for it (one started then was
    never stopped, and recorded the turn behind stop's back)."""
    gated = Gated()
    rt = Runtime.start(db_url, max_turns_in_flight=1)
    rt.agents.register("gated", gated.factory)
    holder = rt.create_group(primary={"kind": "gated"}, sleeptime=[{"kind": "memory"}])
    waiter = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    gated.gate.clear()
    outcomes: dict[str, Future[Any]] = {"holder": Future(), "waiter": Future(), "stop": Future()}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            outcomes[name].set_result(fn())
        except BaseException as error:
            outcomes[name].set_exception(error)

    threads = [
        threading.Thread(target=call, args=("holder", lambda: rt.step(holder.id, [user("a")])))
    ]
    threads[0].start()
    gated.wait_entered()
    threads.append(
        threading.Thread(target=call, args=("waiter", lambda: rt.step(waiter.id, [user("b")])))
    )
    threads[1].start()
    assert wait_until(lambda: rt.stats()["turns_waiting"] == 1)
    threads.append(threading.Thread(target=call, args=("stop", lambda: rt.stop(drain_timeout=5))))
    threads[2].start()
    assert wait_until(rt._stopped.is_set)
    gated.gate.set()
    assert outcomes["holder"].result(timeout=30).turn == 1  # queued before stop: finished
    # (On PostgreSQL stopping hands the shards over first: the group is then moving.)
    with pytest.raises((RuntimeStopped, NotOwner)):
        outcomes["waiter"].result(timeout=30)
    outcomes["stop"].result(timeout=60)
    actors = ("GroupActor", "SleeptimeAgentActor")
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith(actors)], timeout=10
    )
    with Runtime.start(db_url) as again:
        assert again.get_group(waiter.id).turns == 0
        assert again.get_group(holder.id).turns == 1
