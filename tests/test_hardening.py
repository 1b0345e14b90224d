"""Faults found by attacking the runtime (issue 13), each pinned by a test that failed before.

Agent code raising SystemExit, a stream sink that raises, a reply cancelled while it is
completed, timed-out runs and their threads and timers, overlapping steps after a crash,
a store outage at a run's start, and a caller's turn timeout.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import pytest

from actors import (
    AgentFactory,
    Chaos,
    PrimaryAgentError,
    RestartPolicy,
    Runtime,
    TurnTimeout,
)
from actors._pool import StepPool
from actors._protocol import TakeTurn
from actors._scheduler import COMPACT_AT_LEAST, Scheduler
from actors.sdk import AgentContext
from messages import Message, MessageCreate, RunStatus, StopReason
from messages._futures import reject, resolve
from tests.agents import Echo, user, wait_until
from tests.invariants import check_group
from tests.postgres import PostgresCluster


class Exits:
    """An agent whose step calls sys.exit(), as careless agent code might."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        sys.exit(3)


class Blocks:
    """A primary agent that waits for `gate` before answering."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def factory(self, config: dict[str, Any]) -> Blocks:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        assert self.gate.wait(30)
        return [MessageCreate(role="assistant", content="at last")]


class Patient:
    """A sleeptime agent that waits until its run is cancelled (honours cancellation)."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        context.wait(30)
        return []


class OverlapProbe:
    """A sleeptime agent that ignores cancellation and counts its agents' concurrent steps."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self.active: dict[str, int] = defaultdict(int)
        self.most: dict[str, int] = defaultdict(int)
        self.steps = 0

    def factory(self, config: dict[str, Any]) -> OverlapProbe:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        with self._lock:
            self.active[context.agent_id] += 1
            self.most[context.agent_id] = max(
                self.most[context.agent_id], self.active[context.agent_id]
            )
            self.steps += 1
        try:
            threading.Event().wait(self.seconds)  # deaf to the cancel flag, on purpose
            return [MessageCreate(role="assistant", content="noted")]
        finally:
            with self._lock:
                self.active[context.agent_id] -= 1


# -- 1. agent code raising a BaseException -----------------------------------------------


def test_system_exit_in_agent_code_fails_only_its_own_turn_or_run(db_url: str) -> None:
    kinds: dict[str, AgentFactory] = {"echo": Echo, "exits": Exits}
    with Runtime.start(db_url, kinds=kinds) as rt:
        broken_primary = rt.create_group(primary={"kind": "exits"}, sleeptime=[{"kind": "memory"}])
        broken_sleeper = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "exits"}])
        healthy = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])

        with pytest.raises(PrimaryAgentError, match="SystemExit: 3") as failed:
            rt.step(broken_primary.id, [user("hello")], timeout=10)
        assert failed.value.result.turn == 1  # the turn was still recorded
        with pytest.raises(PrimaryAgentError, match="SystemExit"):
            list(rt.stream(broken_primary.id, [user("again")], timeout=10))

        run_id = rt.step(broken_sleeper.id, [user("hi")], timeout=10).run_ids[0]
        (run,) = rt.wait_for_runs([run_id], timeout=10)
        assert run.status is RunStatus.FAILED
        assert run.stop_reason is StopReason.ERROR
        assert "SystemExit: 3" in (run.error or "")

        # The rest of the runtime carries on, the broken groups too.
        result = rt.step(healthy.id, [user("my favorite color is teal")], timeout=10)
        assert [r.status for r in rt.wait_for_runs(result.run_ids, timeout=10)] == [
            RunStatus.COMPLETED
        ]
        assert "teal" in rt.get_blocks(healthy.primary_agent_id)["human"].value
        assert rt.get_group(broken_primary.id).turns == 2
        assert rt.step(broken_sleeper.id, [user("still here")], timeout=10).fired
        assert rt.stats()["restarts"] == 0  # nothing crashed: the errors were the agents'
        check_group(rt, healthy.id)


def test_a_factory_raising_system_exit_is_a_config_error(rt: Runtime) -> None:
    def factory(config: dict[str, Any]) -> Echo:
        raise SystemExit("no")

    rt.agents.register("quitter", factory)
    with pytest.raises(Exception, match="SystemExit") as refused:
        rt.create_group(primary={"kind": "quitter"}, sleeptime=[{"kind": "memory"}])
    assert not isinstance(refused.value, SystemExit)
    assert rt.list_groups() == []


# -- 6. a stream consumer whose sink raises ----------------------------------------------


class ClosedLoopSink(queue.SimpleQueue[Message | None]):
    """A consumer's sink whose event loop has closed: every put raises."""

    def put(self, item: Message | None, block: bool = True, timeout: float | None = None) -> None:
        raise RuntimeError("Event loop is closed")


def test_a_raising_sink_never_changes_the_turn(rt: Runtime) -> None:
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    command = TakeTurn(input=[user("my name is Ada")], mode="stream", sink=ClosedLoopSink())
    reply = rt._send_group(group.id, command)
    result = reply.result(timeout=10)  # the turn's result, not the sink's error
    assert result.turn == 1 and result.fired and result.messages
    assert rt.get_group(group.id).turns == 1
    texts = [m.text() for m in rt.list_messages(group.primary_agent_id)]
    assert texts.count("my name is Ada") == 1
    rt.wait_for_runs(result.run_ids, timeout=10)


# -- 7. completing a reply that its caller cancels ---------------------------------------


class _CancelledBetween(Future[Any]):
    """A future cancelled by another thread right after `done()` said it was not."""

    def done(self) -> bool:
        answer = super().done()
        self.cancel()
        return answer


def test_resolve_and_reject_leave_a_cancelled_future_alone() -> None:
    completions: list[Callable[[Future[Any]], bool]] = [
        lambda f: resolve(f, 1),
        lambda f: reject(f, ValueError("x")),
    ]
    for complete in completions:
        future: Future[Any] = _CancelledBetween()
        with pytest.raises(InvalidStateError):  # what the old check-then-set did
            if not future.done():
                future.set_result(1)
        contested: Future[Any] = _CancelledBetween()
        contested.done()
        assert complete(contested) is False
        fresh: Future[Any] = Future()
        assert complete(fresh) is True and fresh.done()


def test_replies_cancelled_by_their_callers_never_crash_the_group(rt: Runtime) -> None:
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    cancelled = 0
    for n in range(300):
        command = TakeTurn(input=[user(f"turn {n}")], mode="step")
        reply = rt._send_group(group.id, command)
        cancelled += reply.cancel()  # races the group completing it
    assert rt.step(group.id, [user("last")], timeout=10).turn == 301
    assert rt.stats()["restarts"] == 0


# -- 4 and 9. timed-out runs: threads and timers -----------------------------------------


def test_timed_out_runs_leak_no_threads(db_url: str) -> None:
    with Runtime.start(db_url, kinds={"patient": Patient}, workers=4) as rt:
        groups = [
            rt.create_group(
                primary={"kind": "scripted"},
                sleeptime=[{"kind": "patient"}],
                run_timeout=0.02,
            )
            for _ in range(4)
        ]

        def time_out(runs_per_group: int) -> int:
            run_ids = [
                run_id
                for _ in range(runs_per_group)
                for group in groups
                for run_id in rt.step(group.id, [user("wait")]).run_ids
            ]
            runs = rt.wait_for_runs(run_ids, timeout=60)
            assert {r.stop_reason for r in runs} == {StopReason.TIMEOUT}
            # The cancelled steps return at once; their threads leave the pool then.
            assert wait_until(lambda: rt.stats()["step_threads"] == 4)
            return threading.active_count()

        after_10 = time_out(3)
        after_200 = time_out(50)
        assert after_200 == after_10
        assert rt._parts.pool.abandoned >= 200


def test_no_timer_outlives_its_run(rt: Runtime) -> None:
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=None
    )
    run_ids = [run_id for n in range(300) for run_id in rt.step(group.id, [user(f"n {n}")]).run_ids]
    rt.wait_for_runs(run_ids, timeout=60)
    # Each run's 600 s deadline was cancelled when it ended; cancelled timers are swept.
    assert rt.stats()["timers"] < COMPACT_AT_LEAST + 8


def test_cancelled_timers_are_swept_and_never_run() -> None:
    scheduler = Scheduler()
    try:
        fired = threading.Event()
        timers = [scheduler.call_later(600, fired.set) for _ in range(10_000)]
        keep = scheduler.call_later(600, fired.set)
        for timer in timers:
            timer.cancel()
            timer.cancel()  # twice is once
        assert scheduler.pending() == 1
        assert scheduler.held() < COMPACT_AT_LEAST + 2
        assert all(t.fn is not fired.set for t in timers)  # what they held is freed
        soon = threading.Event()
        scheduler.call_later(0.01, soon.set)
        assert soon.wait(5)
        assert not fired.is_set()
        keep.cancel()
        assert scheduler.pending() == 0
    finally:
        scheduler.close()


# -- 8. one agent's steps never overlap, whatever incarnation started them ---------------


def test_no_overlapping_steps_of_one_agent_under_crashes(db_url: str) -> None:
    probe = OverlapProbe(seconds=0.01)
    kinds: dict[str, AgentFactory] = {"probe": probe.factory}
    chaos = Chaos(crash_rate=0.15, only="agent:", seed=11)
    policy = RestartPolicy(max_restarts=1000, within_seconds=1, backoff_base=0.001)
    with Runtime.start(db_url, kinds=kinds, chaos=chaos, restart_policy=policy) as rt:
        groups = [
            rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "probe"}])
            for _ in range(3)
        ]
        run_ids = [
            run_id
            for n in range(25)
            for group in groups
            for run_id in rt.step(group.id, [user(f"my number is {n}")]).run_ids
        ]
        runs = rt.wait_for_runs(run_ids, timeout=120)
        assert all(r.status.terminal for r in runs)
        assert rt.stats()["injected_crashes"] > 0
        assert max(probe.most.values()) == 1, dict(probe.most)
        assert rt.check_invariants().ok


# -- 3. a store outage at a run's start --------------------------------------------------


class Gated:
    """A sleeptime agent whose first step waits for `gate`; counts its steps."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.returned = threading.Semaphore(0)

    def factory(self, config: dict[str, Any]) -> Gated:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        try:
            assert self.gate.wait(30)
            return [MessageCreate(role="assistant", content="noted")]
        finally:
            self.returned.release()


def test_queued_runs_survive_a_server_restart_and_complete(
    backend: str, request: pytest.FixtureRequest, db_url: str
) -> None:
    if backend != "postgresql":
        pytest.skip("a server restart is a PostgreSQL matter")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    gate = threading.Event()
    agent = Gated(gate)
    with Runtime.start(db_url, kinds={"gated": agent.factory}) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "gated"}])
        run_ids = [rt.step(group.id, [user(f"my number is {n}")]).run_ids[0] for n in range(4)]
        cluster.stop("fast")
        try:
            gate.set()  # the first run ends while the server is down; the next cannot start
            assert agent.returned.acquire(timeout=10)
            assert wait_until(lambda: rt.stats()["starts_postponed"] >= 2, timeout=20)
        finally:
            cluster.start()
        runs = rt.wait_for_runs(run_ids, timeout=60)
        assert [r.status for r in runs] == [RunStatus.COMPLETED] * 4, [r.error for r in runs]
        assert rt.check_invariants().ok


# -- 14. a caller's turn timeout ---------------------------------------------------------


def test_turn_timeout_names_the_group_and_the_turn_still_completes(db_url: str) -> None:
    gate = threading.Event()
    agent = Blocks(gate)
    with Runtime.start(db_url, kinds={"blocks": agent.factory}) as rt:
        group = rt.create_group(primary={"kind": "blocks"}, sleeptime=[{"kind": "memory"}])
        try:
            with pytest.raises(TurnTimeout, match=group.id) as timed_out:
                rt.step(group.id, [user("first")], timeout=0.2)
            assert isinstance(timed_out.value, TimeoutError)
            assert timed_out.value.group_id == group.id
            # Turns of a group are serialized: these wait behind the hung one.
            with pytest.raises(TurnTimeout):
                rt.record_turn(group.id, [user("q"), {"role": "assistant", "content": "a"}], 0.1)
            stream = rt.stream(group.id, [user("streamed")], timeout=0.1)
            with pytest.raises(TurnTimeout):
                next(stream)
            with pytest.raises(TurnTimeout):
                stream.result  # noqa: B018
        finally:
            gate.set()
        assert rt.step(group.id, [user("after")], timeout=10).turn == 4
        assert rt.get_group(group.id).turns == 4  # the timed-out turns were all recorded
        for bad in (0, -1, float("nan"), float("inf"), "soon"):
            with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
                rt.step(group.id, [user("x")], timeout=bad)  # type: ignore[arg-type]


def test_a_tracker_restarted_during_an_outage_waits_for_the_store(
    backend: str, request: pytest.FixtureRequest, db_url: str
) -> None:
    if backend != "postgresql":
        pytest.skip("a server restart is a PostgreSQL matter")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        cluster.stop("fast")
        try:
            rt._parts.tracker.tell(object())  # a message it does not handle: it crashes
            assert wait_until(lambda: rt.stats()["restarts"] >= 1)
            # Its restarts wait for the store instead of crash-looping into RuntimeFailed.
            assert not wait_until(lambda: rt._parts.failure is not None, timeout=8)
        finally:
            cluster.start()
        result = rt.step(group.id, [user("my favorite color is teal")], timeout=30)
        assert [r.status for r in rt.wait_for_runs(result.run_ids, timeout=30)] == [
            RunStatus.COMPLETED
        ]
        assert rt.stats()["escalations"] == 0


def test_a_step_abandoned_twice_costs_one_stand_in_thread() -> None:
    """Its deadline and a later incarnation's wait may both give a hung step up: one
    thread stands in for it, and the pool is back to its size once the steps return."""
    pool = StepPool(2)
    release = threading.Event()
    try:
        hung = pool.submit(lambda: release.wait(30))
        assert wait_until(hung.running)
        pool.abandon(hung)
        pool.abandon(hung)
        assert pool.threads == 3 and pool.abandoned == 1
        release.set()
        hung.result(timeout=10)
        assert pool.submit(lambda: 42).result(timeout=10) == 42
        assert wait_until(lambda: pool.threads == 2)
    finally:
        release.set()
        pool.close()
