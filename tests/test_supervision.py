"""Supervision: restarts with state from the store, nothing dropped, escalation, backoff.

The restart decision itself is tested in test_restart_policy.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka
import pytest

from actors import AgentFactory, Chaos, GroupFailed, RestartPolicy, Runtime
from actors._protocol import Ask
from actors._scheduler import Scheduler
from actors._supervised import CrashReporter, SupervisedActor
from actors._supervisor import ChildSpec, Supervisor
from messages import RunStatus, SleeptimeError
from tests.agents import Echo, Recorder, user, wait_until

# -- the supervisor, on a small actor whose "store" is a dict -------------------------------


@dataclass(frozen=True)
class Add:
    amount: int


@dataclass(frozen=True)
class Total(Ask[int]):
    reply: Future[int] = field(default_factory=Future)


@dataclass(frozen=True)
class Explode:
    pass


class Counter(SupervisedActor):
    """Adds numbers; its total lives in `store`, so a new incarnation picks it up."""

    def __init__(self, reporter: CrashReporter, store: dict[str, int]) -> None:
        super().__init__(reporter)
        self.store = store

    def receive(self, message: Any) -> Any:
        match message:
            case Add(amount=amount):
                self.store["total"] = self.store.get("total", 0) + amount
            case Total():
                return self.store.get("total", 0)
            case Explode():
                raise RuntimeError("boom")
        return None


class RecordingScheduler(Scheduler):
    """A real scheduler that also notes every delay it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        self.delays.append(delay)
        return super().call_later(delay, fn)


@pytest.fixture
def scheduler() -> Iterator[RecordingScheduler]:
    made = RecordingScheduler()
    yield made
    made.close()


def _counter(
    supervisor: Supervisor,
    store: dict[str, int],
    policy: RestartPolicy,
    escalated: list[str],
    starts: list[int] | None = None,
) -> Any:
    def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
        if starts is not None:
            starts.append(reporter.address.incarnation)
            if len(starts) == 1:
                raise RuntimeError("the first start fails")
        return Counter.start(reporter, store)

    return supervisor.supervise(
        ChildSpec(
            "counter",
            start,
            escalated.append,
            policy,
            refuse=lambda reason: SleeptimeError("counter gone"),
        )
    )


def test_crashed_actor_comes_back_with_its_state_and_every_message(
    scheduler: RecordingScheduler,
) -> None:
    supervisor, store, escalated = Supervisor(scheduler), {}, []  # type: ignore[var-annotated]
    address = _counter(supervisor, store, RestartPolicy(backoff_base=0.05), escalated)
    address.tell(Add(1))
    address.tell(Explode())
    for n in range(2, 101):  # told while it dies and restarts: none may be lost
        address.tell(Add(n))
    assert address.ask(Total(), timeout=10) == sum(range(1, 101))
    assert supervisor.restarts == 1 and address.incarnation == 1
    assert escalated == []
    supervisor.stop("counter", SleeptimeError("stopped"))


def test_failed_start_counts_as_a_crash(scheduler: RecordingScheduler) -> None:
    supervisor, store, escalated, starts = Supervisor(scheduler), {}, [], []  # type: ignore[var-annotated]
    address = _counter(supervisor, store, RestartPolicy(), escalated, starts)
    address.tell(Add(5))  # waits for the second start
    assert address.ask(Total(), timeout=10) == 5
    assert starts == [0, 1]
    supervisor.stop("counter", SleeptimeError("stopped"))


def test_too_many_crashes_escalate_once_and_later_messages_are_refused(
    scheduler: RecordingScheduler,
) -> None:
    supervisor, store, escalated = Supervisor(scheduler), {}, []  # type: ignore[var-annotated]
    policy = RestartPolicy(max_restarts=3, within_seconds=60, backoff_base=0.001, jitter=0)
    address = _counter(supervisor, store, policy, escalated)
    for _ in range(4):
        address.tell(Explode())
    with pytest.raises(SleeptimeError, match="counter gone"):
        address.ask(Total(), timeout=10)
    assert len(escalated) == 1 and "4 crashes within 60s" in escalated[0]
    assert supervisor.restarts == 3 and supervisor.escalations == 1
    assert scheduler.delays == pytest.approx([0.001, 0.002, 0.004])  # the backoff doubled


def test_crashes_spread_out_beyond_the_window_never_escalate(scheduler: RecordingScheduler) -> None:
    now = [0.0]
    supervisor = Supervisor(scheduler, clock=lambda: now[0])
    store: dict[str, int] = {}
    escalated: list[str] = []
    address = _counter(
        supervisor,
        store,
        RestartPolicy(max_restarts=1, within_seconds=5, backoff_base=0.001),
        escalated,
    )
    for _ in range(5):
        address.tell(Explode())
        address.ask(Total(), timeout=10)  # back up again
        now[0] += 6  # the fake clock moves past the window
    assert escalated == [] and supervisor.restarts == 5


# -- crash injection at each actor of a real runtime -----------------------------------------


def _setup(db_url: str, sleepers: int = 1) -> str:
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        # Room for every injected crash: a crash mid-run costs that run an attempt.
        return rt.create_group(
            primary={"kind": "echo"},
            sleeptime=[{"kind": "memory"}] * sleepers,
            frequency=1,
            max_attempts=10,
        ).id


@pytest.mark.parametrize("target", ["group:", "agent:", "tracker"])
def test_crashed_actor_is_restarted_and_nothing_is_lost(db_url: str, target: str) -> None:
    group_id = _setup(db_url, sleepers=2)
    chaos = Chaos(crash_rate=0.5, seed=11, only=target, crash_limit=4)
    with Runtime.start(
        db_url, kinds={"echo": Echo}, chaos=chaos, restart_policy=RestartPolicy(backoff_base=0.001)
    ) as rt:
        run_ids = []
        for n in range(10):
            run_ids += rt.step(group_id, [user(f"my number is {n}")]).run_ids
        runs = rt.wait_for_runs(run_ids, timeout=60)
        assert all(r.status is RunStatus.COMPLETED for r in runs), [
            (r.status, r.stop_reason, r.error, r.attempt) for r in runs
        ]
        assert rt.get_group(group_id).turns == 10  # each turn counted exactly once
        stats = rt.stats()
        assert stats["injected_crashes"] >= 1 and stats["restarts"] >= 1
        report = rt.check_invariants()
        assert report.ok, report.violations


def test_agent_crash_mid_run_requeues_the_run(db_url: str) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with Runtime.start(db_url, kinds={"echo": Echo, "rec": recorder.factory}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "rec"}])
    # Spares the agent's first two messages (its runs adopted, the first run assigned: its
    # start is decided on the pool thread, no message): it crashes on the next, while the
    # first run steps.
    chaos = Chaos(
        crash_rate=1.0, only=f"agent:{group.sleeptime_agent_ids[0]}", crash_limit=1, after=2
    )
    try:
        with Runtime.start(
            db_url, kinds={"echo": Echo, "rec": recorder.factory}, chaos=chaos
        ) as rt:
            first = rt.step(group.id, [user("one")]).run_ids[0]
            recorder.wait_started()  # attempt 1 is stepping
            second = rt.step(group.id, [user("two")]).run_ids[0]  # crashes the agent actor
            requeued = ("created", 2, "interrupted")
            assert wait_until(
                lambda: requeued in [(e.status, e.attempt, e.reason) for e in rt.run_events(first)]
            )
            # The new incarnation re-queued the run, but attempt 1 still steps (this agent
            # ignores the cancel flag while it waits): attempt 2 waits for it to return.
            assert not recorder.started.acquire(timeout=0.3)
            gate.set()
            recorder.wait_started()  # attempt 2, once attempt 1 returned
            done = rt.wait_for_runs([first, second], timeout=30)
            assert [(r.status, r.attempt) for r in done] == [
                (RunStatus.COMPLETED, 2),
                (RunStatus.COMPLETED, 1),
            ]
            assert [(e.status, e.attempt, e.reason) for e in rt.run_events(first)][2] == (
                "created",
                2,
                "interrupted",
            )
            assert recorder.most_active == 1  # never two steps of one agent at once
            assert rt.check_invariants().ok
    finally:
        gate.set()


def test_group_crashing_too_often_fails_alone(db_url: str) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    kinds: dict[str, AgentFactory] = {"echo": Echo, "rec": recorder.factory}
    with Runtime.start(db_url, kinds=kinds) as rt:
        doomed = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "rec"}])
        healthy = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])
        open_run = rt.step(doomed.id, [user("hello")]).run_ids[0]
        rt.stop(drain_timeout=0)  # leaves the run open
    chaos = Chaos(crash_rate=1.0, only=f"group:{doomed.id}")
    policy = RestartPolicy(max_restarts=2, within_seconds=60, backoff_base=0.001)
    try:
        with Runtime.start(db_url, kinds=kinds, chaos=chaos, restart_policy=policy) as rt:
            with pytest.raises(GroupFailed, match="crashes within 60s"):
                rt.step(doomed.id, [user("again")])
            failed = rt.get_group(doomed.id)
            assert failed.status == "failed" and "crashes" in (failed.failure_reason or "")
            (run,) = rt.wait_for_runs([open_run], timeout=30)
            assert run.status is RunStatus.FAILED and "the group failed" in (run.error or "")
            with pytest.raises(GroupFailed):
                rt.step(doomed.id, [user("still there?")])
            # The rest of the runtime goes on.
            ok = rt.step(healthy.id, [user("my name is Ok")])
            assert rt.wait_for_runs(ok.run_ids, timeout=30)[0].status is RunStatus.COMPLETED
            assert rt.stats()["escalations"] == 1
        with Runtime.start(db_url, kinds=kinds) as rt, pytest.raises(GroupFailed):
            rt.step(doomed.id, [user("after a restart")])  # and it stays failed
    finally:
        gate.set()


class BusyCounter(Counter):
    """A counter that declines passivation while `store["busy"]` is set."""

    def idle(self) -> bool:
        return not self.store.get("busy")


def test_a_busy_child_is_asked_to_passivate_at_most_every_nudge_interval(
    scheduler: RecordingScheduler,
) -> None:
    supervisor, store = Supervisor(scheduler), {"busy": 1}
    address = supervisor.supervise(
        ChildSpec(
            "counter",
            lambda reporter: BusyCounter.start(reporter, store),
            escalate=lambda reason: None,
            passivates=True,
        )
    )
    address.tell(Add(1))
    assert address.ask(Total(), timeout=10) == 1
    assert supervisor.reap(0.0, None, "") == 1  # asked, declines: it is busy
    assert supervisor.reap(0.0, None, "") == 0  # not asked again at once
    assert supervisor.active_count() == 1
    store["busy"] = 0
    supervisor._active["counter"].nudged = float("-inf")  # the interval has passed
    assert supervisor.reap(0.0, None, "") == 1
    assert supervisor.wait_until(lambda s: s.active_count() == 0, timeout=10)
    address.tell(Add(2))  # starts it again, from the store
    assert address.ask(Total(), timeout=10) == 3
    assert (supervisor.passivations, supervisor.activations) == (1, 1)
    supervisor.stop("counter", SleeptimeError("stopped"))


def test_a_child_that_gets_work_done_between_crashes_is_not_in_a_crash_loop(
    scheduler: RecordingScheduler,
) -> None:
    supervisor, store, escalated = Supervisor(scheduler), {}, []  # type: ignore[var-annotated]
    policy = RestartPolicy(
        max_restarts=2, within_seconds=60, backoff_base=0.001, jitter=0, reset_on_progress=True
    )
    address = _counter(supervisor, store, policy, escalated)
    for _ in range(6):  # each incarnation handles a message, then crashes
        address.tell(Add(1))
        address.tell(Explode())
    assert address.ask(Total(), timeout=10) == 6
    assert escalated == [] and supervisor.restarts == 6
    assert set(scheduler.delays) == {0.001}  # the backoff starts again after progress
    for _ in range(3):  # crashes with nothing handled between them: a crash loop
        address.tell(Explode())
    with pytest.raises(SleeptimeError, match="counter gone"):
        address.ask(Total(), timeout=10)
    assert len(escalated) == 1 and "3 crashes within 60s" in escalated[0]


def test_a_shut_down_supervisor_refuses_every_child_and_starts_none(
    scheduler: RecordingScheduler,
) -> None:
    supervisor, store, escalated = Supervisor(scheduler), {}, []  # type: ignore[var-annotated]
    address = _counter(supervisor, store, RestartPolicy(), escalated)
    address.tell(Add(2))
    assert address.ask(Total(), timeout=10) == 2
    supervisor.shut_down(SleeptimeError("gave up"))
    with pytest.raises(SleeptimeError, match="gave up"):
        address.ask(Total(), timeout=10)
    starts: list[CrashReporter] = []

    def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
        starts.append(reporter)
        return Counter.start(reporter, store)

    later = supervisor.supervise(ChildSpec("later", start, escalate=escalated.append))
    with pytest.raises(SleeptimeError, match="gave up"):
        later.ask(Total(), timeout=10)
    assert starts == [] and escalated == []
    assert supervisor.wait_until(lambda s: s.active_count() == 0, timeout=10)
