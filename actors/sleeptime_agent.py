"""The SleeptimeAgentActor: one per sleeptime agent id, running its runs one at a time.

Runs start in creation order; the next starts only when the current one has ended
(completed, failed, cancelled and returned, or timed out), so two runs of one agent
never overlap. Steps execute on the shared step pool, so this actor stays free to take
deadlines and new runs while its agent works. A run is started (asked of the tracker,
then `running`) only once a pool thread takes its step, and its `run_timeout` counts
from then: a run waiting for a thread is still `created`, and its time is not spent.

A new incarnation takes its queue from the tracker, which re-queues the run the previous
one was running; it starts nothing while a step started by an earlier incarnation still
executes or waits for a thread (`StepsInFlight`), unless that step is past its run's
timeout, which is logged as `step_overlaps_timed_out_step`.

A run whose start met a store outage never reached its agent: it goes back to the head
of the queue and is started again, with a growing delay, once the store answers.

The actor has no thread of its own: its messages run on the runtime's dispatcher (a few
threads all agents share, `actors._pykka.Dispatcher`), or on the sender's thread while it
is idle (`serves_callers`). Nothing it does waits, so thousands of agents cost no thread.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from actors._address import Address
from actors._execute import Built, execute_run
from actors._observer import NO_OBSERVER, Observer
from actors._pool import StepPool
from actors._protocol import (
    Adopted,
    AdoptRuns,
    AssignRun,
    FinishRun,
    GroupChanged,
    KindRegistered,
    RunDeadline,
    StartAborted,
    StartDecision,
    StartRun,
    StepDone,
)
from actors._pykka import Dispatcher
from actors._scheduler import Scheduler, Timer
from actors._settings import GroupSettings, SettingsCell
from actors._supervised import CrashReporter, DispatchedSupervisedActor
from actors.sdk import AgentBehaviour
from messages import (
    Agent,
    Group,
    Message,
    Run,
    RunStatus,
    StopReason,
)
from messages._errors import describe
from messages._futures import Flag, Reply
from messages._log import get_logger
from persistence import Store


@dataclass(frozen=True, slots=True)
class AgentWiring:
    """What a SleeptimeAgentActor uses besides its own state, as the runtime wires it."""

    store: Store
    build: Callable[[str, Mapping[str, Any]], AgentBehaviour]
    """Build the agent of a kind from its config (the wiring may wrap what it builds). It
    runs on the step's pool thread: a factory is user code, and may take its time."""
    known: Callable[[str], bool]
    """Whether a kind is registered (until it is, the agent's runs wait)."""
    tracker: Address
    pool: StepPool
    scheduler: Scheduler
    steps: StepsInFlight
    dispatcher: Dispatcher
    """Where the actor's messages run (it has no thread of its own)."""
    observer: Observer = field(default=NO_OBSERVER)
    settings: GroupSettings = field(default_factory=GroupSettings)
    """Where a step reads its group's settings as it begins (shared with the group's actor)."""


log = get_logger("sleeptime.agent")

START_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
"""Seconds before starting again a run whose start met a store outage (then 2 s each)."""


class StepsInFlight:
    """The step each sleeptime agent has executing, whatever incarnation of its actor
    started it, and when that step's run times out (a `time.monotonic()` value).

    It outlives the actors: a new incarnation waits for the step of the one that crashed,
    so an agent that ignores cancellation never runs two steps at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[str, tuple[Future[StepDone], StepClock]] = {}
        self.postponed = 0  # starts put off because the store was unavailable

    def count_postponed(self) -> None:
        with self._lock:
            self.postponed += 1

    def track(self, agent_id: str, step: Future[StepDone], clock: StepClock) -> None:
        """Follow `step` until it returns (call before adding any other callback to it)."""
        with self._lock:
            self._steps[agent_id] = (step, clock)
        step.add_done_callback(partial(self._returned, agent_id))

    def executing(self, agent_id: str) -> tuple[Future[StepDone], float] | None:
        """The agent's step still executing (or waiting for a pool thread), with its
        deadline (infinite until it begins); None if there is none."""
        with self._lock:
            found = self._steps.get(agent_id)
        return None if found is None else (found[0], found[1].deadline)

    def _returned(self, agent_id: str, step: Future[StepDone]) -> None:
        with self._lock:
            if self._steps.get(agent_id, (None, 0.0))[0] is step:
                del self._steps[agent_id]


@dataclass(slots=True)
class StepClock:
    """When a run's step times out: set as the step begins on a pool thread (a step
    waiting for a thread has no deadline yet), with the timer that tells its actor."""

    deadline: float = math.inf  # a time.monotonic() value
    timeout: float = math.inf  # the group's run_timeout as the step began
    timer: Timer | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _EarlierStepEnded:
    """Told to an agent whose next start waits for an earlier step: look again."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class _AskAgain:
    """Told to an agent once a wait is over: ask the tracker for its runs again, if the
    request with this token is still the one it awaits (not a later incarnation's)."""

    token: int


_TOKENS = itertools.count(1)
"""Tokens of the requests agents tell the tracker, unique in the process."""


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What a passivated agent leaves for its next instance: its group's settings."""

    group: Group


@dataclass(slots=True)
class _Current:
    """The run this agent asked to start and steps (or waits to step) on the pool."""

    run: Run
    window: list[Message] | None
    token: int
    decided: Future[StartDecision]  # completed by the tracker (see `StartRun`)
    abandoned: threading.Event  # set at the deadline: the step must not begin any more
    future: Future[StepDone]
    clock: StepClock
    built: Built | None  # what its step builds, if it builds the agent

    @property
    def run_id(self) -> str:
        return self.run.id

    def started(self) -> StartDecision | None:
        """The tracker's decision if it started the run and the start is committed."""
        if not self.decided.done():
            return None
        decision = self.decided.result()
        if not decision.started or decision.committed is None:
            return None
        if not decision.committed.done() or decision.committed.exception() is not None:
            return None
        return decision


class SleeptimeAgentActor(DispatchedSupervisedActor):
    """Executes the runs of one sleeptime agent, one at a time, in creation order.

    Told: `AssignRun`, `StepDone`, `RunDeadline`, `GroupChanged`, `KindRegistered`, and
    the tracker's answer `Adopted`. It never waits on another actor: it tells the tracker
    `AdoptRuns` (on start) and goes on when told back, and `StartRun` with the run's step
    handed to the pool at once (the step waits for the decision on its own thread).

    It is told mostly by the turn that made a run (`AssignRun`) and by the step that
    returns (`StepDone`), and takes both quickly: while idle it handles them on the
    sender's thread (`serves_callers`), its own thread then waking for neither.
    """

    serves_callers = True

    def __init__(
        self,
        reporter: CrashReporter,
        agent: Agent,
        group: Group,
        wiring: AgentWiring,
    ) -> None:
        super().__init__(reporter)
        self.dispatcher = wiring.dispatcher
        self._address = reporter.address
        self._agent = agent
        self._group = group
        self._latest = wiring.settings.cell(group)
        self._wiring = wiring
        self._queue: deque[Run] = deque()
        self._queued: set[str] = set()
        self._windows: dict[str, list[Message]] = {}  # run id -> window handed over with it
        self._current: _Current | None = None
        self._start_failures = 0  # starts in a row that met a store outage
        self._hold_until = 0.0  # no start before this time.monotonic() value
        self._awaited: Future[StepDone] | None = None  # an earlier step we wait for
        # The token of the `AdoptRuns` this incarnation awaits the answer to: nothing
        # starts while it is out (the adopted runs go first).
        self._adopting: int | None = None
        self._behaviour: AgentBehaviour | None = None  # built by a step, kept for the next
        self._build_error: str | None = None
        self._kinds_seen = 0  # registrations of its kind seen: a step's build is of one
        self._log = log.bind(agent_id=agent.id, group_id=agent.group_id)

    def started(self) -> None:
        self._ask_for_runs()

    def _ask_for_runs(self, token: int | None = None) -> None:
        """Ask the tracker for this agent's open runs (the answer is `Adopted`)."""
        token = next(_TOKENS) if token is None else token
        self._adopting = token
        self._wiring.tracker.tell(AdoptRuns(self._agent.id, self._address, token))

    def _adopted(self, adopted: Adopted) -> None:
        if self._adopting != adopted.token:
            return  # an answer to an earlier incarnation
        if adopted.retry:  # still awaited: asked again, with a new token, after a while
            again = next(_TOKENS)
            self._adopting = again
            self._hold("the tracker could not list the runs", then=_AskAgain(again))
            return
        self._adopting = None
        # The adopted runs are older than any assigned since: they go first.
        assigned = [run for run in self._queue if run.id not in {r.id for r in adopted.runs}]
        self._queue.clear()
        self._queued.clear()
        for run in [*adopted.runs, *assigned]:
            self._enqueue(run)

    def on_stop(self) -> None:
        self._let_go()
        super().on_stop()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._let_go()
        super().on_failure(exception_type, exception_value, traceback)

    def _let_go(self) -> None:
        """This incarnation ends: its step, if no thread took it yet, never runs (the next
        incarnation adopts the run, still `created`); one that began keeps its deadline."""
        if self._current is not None and not self._current.future.cancel():
            self._current.clock.cancel()

    def receive(self, message: Any) -> Any:
        match message:
            case AssignRun(run=run, window=window):
                self._enqueue(run, window)
            case StepDone():
                self._step_done(message)
            case RunDeadline(run_id=run_id, token=token):
                self._deadline(run_id, token)
            case GroupChanged(group=group):
                self._group = group
                self._latest.offer(group)
            case KindRegistered(kind=kind):
                if kind == self._agent.kind:
                    self._behaviour, self._build_error = None, None
                    self._kinds_seen += 1  # an agent built from the earlier factory is not kept
            case Adopted():
                self._adopted(message)
            case _EarlierStepEnded():
                pass  # the pump below looks again
            case _AskAgain(token=token):
                if self._adopting == token:
                    self._ask_for_runs(token)
            case _:
                raise TypeError(f"a sleeptime agent does not handle {type(message).__name__}")
        self._pump()
        return None

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue) or self._adopting is not None

    def idle(self) -> bool:
        return not self.busy

    def snapshot(self) -> AgentSnapshot:
        return AgentSnapshot(group=self._group)

    def _enqueue(self, run: Run, window: list[Message] | None = None, first: bool = False) -> None:
        if run.id not in self._queued and (self._current is None or self._current.run_id != run.id):
            if first:
                self._queue.appendleft(run)
            else:
                self._queue.append(run)
            self._queued.add(run.id)
            if window is not None:
                self._windows[run.id] = window

    def _pump(self) -> None:
        """Start the next run, if nothing runs or awaits an answer: hand its step to the
        pool, which asks the tracker to start it once a thread takes it (`_begin`), and
        waits for the tracker's decision (and the start's commit) on that thread, so no
        answer comes back here."""
        if self._current is not None or self._adopting is not None or not self._queue:
            return
        if not self._ready() or self._held() or self._earlier_step_executing():
            return
        run = self._queue.popleft()
        self._queued.discard(run.id)
        window = self._windows.pop(run.id, None)
        token = next(_TOKENS)
        decided: Future[StartDecision] = Reply()
        abandoned: threading.Event = Flag()
        clock = StepClock()
        build, built = None, None  # the agent is built by its first step, and kept
        if self._behaviour is None and self._build_error is None:
            build = partial(self._wiring.build, self._agent.kind, self._agent.config)
            built = Built(self._kinds_seen)
        begin = partial(
            _begin,
            self._wiring,
            self._address,
            StartRun(run.id, decided, token),
            clock,
            self._latest,
        )
        job = partial(
            execute_run,
            begin=begin,
            run=run,
            token=token,
            decided=decided,
            behaviour=self._behaviour,
            build_error=self._build_error,
            build=build,
            built=built,
            store=self._wiring.store,
            abandoned=abandoned,
            window=window,
            observer=self._wiring.observer,
        )
        future = self._wiring.pool.submit(job)
        self._wiring.steps.track(self._agent.id, future, clock)
        self._current = _Current(run, window, token, decided, abandoned, future, clock, built)
        future.add_done_callback(partial(_report, self._address, run.id, token))

    def _held(self) -> bool:
        return time.monotonic() < self._hold_until

    def _hold(self, reason: str | None, then: _AskAgain | None = None) -> None:
        """Start nothing for a while: the store was unavailable at the last start. `then`
        is told once the while is over (by default the pump looks again)."""
        delay = START_RETRY_DELAYS[min(self._start_failures, len(START_RETRY_DELAYS) - 1)]
        self._start_failures += 1
        self._wiring.steps.count_postponed()
        self._hold_until = time.monotonic() + delay
        wake: Any = _EarlierStepEnded() if then is None else then
        self._wiring.scheduler.call_later(delay, partial(self._address.tell, wake))
        self._log.warning("run_start_postponed", delay_s=delay, error=reason)

    def _earlier_step_executing(self) -> bool:
        """Whether a step of this agent still executes (started by an earlier incarnation,
        or abandoned at its timeout); we then wait for it, up to its run's deadline."""
        earlier = self._wiring.steps.executing(self._agent.id)
        if earlier is None:
            return False
        step, deadline = earlier
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if self._awaited is not step:
                self._awaited = step
                self._wiring.pool.abandon(step)  # its thread is replaced, as at a deadline
                self._log.warning("step_overlaps_timed_out_step")
            return False
        if self._awaited is not step:
            self._awaited = step
            address = self._address
            step.add_done_callback(lambda _: address.tell(_EarlierStepEnded()))
            if math.isfinite(remaining):
                self._wiring.scheduler.call_later(
                    remaining, partial(address.tell, _EarlierStepEnded())
                )
            # A step still waiting for a thread has no deadline yet: the one it gets as it
            # begins tells this address (`RunDeadline`), and the pump looks again then.
            timeout = round(remaining, 3) if math.isfinite(remaining) else None
            self._log.info("waiting_for_earlier_step", timeout_in_s=timeout)
        return True

    def _ready(self) -> bool:
        """Whether a run can start: its agent is built (or could not be), or its kind is
        registered (the step builds it, on its pool thread); False while it is not."""
        if self._behaviour is not None or self._build_error is not None:
            return True
        if self._wiring.known(self._agent.kind):
            return True
        self._log.warning(
            "waiting_for_kind",
            kind=self._agent.kind,
            detail=f"no agent kind {self._agent.kind!r} is registered yet",
        )
        return False

    def _step_done(self, done: StepDone) -> None:
        current = self._current
        if current is None or (current.run_id, current.token) != (done.run_id, done.token):
            # A step given up at its deadline, or started by an earlier incarnation: its
            # run ended (or was re-queued) without it. The tracker refuses the finish but
            # keeps what the agent was given and did in its history (SPEC 8).
            self._log.info("late_result", run_id=done.run_id, error=done.error)
            if done.started and done.messages:
                self._finish(done)
            return
        current.clock.cancel()
        self._current = None
        self._keep(current.built)
        if not done.started:
            if done.aborted and done.attempt is not None:  # its start did not land: given back
                self._wiring.tracker.tell(StartAborted(run_id=done.run_id, attempt=done.attempt))
            if done.retry:  # the store is away: this run first, once it is back
                self._enqueue(current.run, current.window, first=True)
                self._hold(done.error)
            return  # refused: the run is terminal or unknown, nothing to do
        self._start_failures = 0
        self._finish(done)

    def _keep(self, built: Built | None) -> None:
        """Keep the agent a step built (or why it could not be) for the next runs, unless
        its kind was registered again since."""
        if (
            built is not None
            and built.generation == self._kinds_seen
            and (built.behaviour is not None or built.error is not None)
        ):
            self._behaviour, self._build_error = built.behaviour, built.error

    def _finish(self, done: StepDone) -> None:
        status = RunStatus.FAILED if done.error is not None else RunStatus.COMPLETED
        self._wiring.tracker.tell(
            FinishRun(
                run_id=done.run_id,
                attempt=done.attempt,
                status=status,
                stop_reason=done.stop_reason,
                error=done.error,
                messages=done.messages,
                token=done.token,
            )
        )

    def _deadline(self, run_id: str, token: int) -> None:
        current = self._current
        if current is None or (current.run_id, current.token) != (run_id, token):
            return
        decision = current.started()
        if decision is None and current.decided.done():
            return  # not started after all: its step reports that at once
        current.abandoned.set()
        if decision is not None:
            assert decision.cancel is not None
            decision.cancel.set()
        self._wiring.pool.abandon(current.future)
        self._current = None
        error = f"run exceeded the group's run_timeout of {current.clock.timeout:g}s"
        self._wiring.tracker.tell(
            FinishRun(
                run_id=run_id,
                # Unknown while the decision is still to come: the tracker takes the
                # attempt this request started, if it started one.
                attempt=None if decision is None else decision.attempt,
                status=RunStatus.FAILED,
                stop_reason=StopReason.TIMEOUT,
                error=error,
                token=token,
            )
        )
        self._log.warning("run_timed_out", run_id=run_id, timeout_s=current.clock.timeout)


def _begin(
    wiring: AgentWiring, address: Address, start: StartRun, clock: StepClock, latest: SettingsCell
) -> Group:
    """A pool thread took the run's step: ask the tracker to start the run, and give the
    step its deadline, from now (called on that thread, first thing); returns the group's
    settings the run is made with, as they are now.

    The start is told first: the finish a deadline makes (however short) then always
    reaches the tracker after it, so the tracker ends the attempt that start began."""
    group = latest.group
    timeout = group.run_timeout
    wiring.tracker.tell(start)
    clock.timeout = timeout
    clock.deadline = time.monotonic() + timeout
    clock.timer = wiring.scheduler.call_later(
        timeout, partial(address.tell, RunDeadline(run_id=start.run_id, token=start.token))
    )
    return group


def _report(address: Address, run_id: str, token: int, future: Future[StepDone]) -> None:
    if future.cancelled():  # its incarnation ended before a thread took it: never ran
        return
    error = future.exception()
    done = (
        future.result()
        if error is None
        else StepDone(  # execute_run never raises: only a failure of the pool gets here
            run_id=run_id,
            attempt=None,  # the tracker ends the attempt this request started, if any
            messages=[],
            stop_reason=StopReason.ERROR,
            error=describe(error),
            token=token,
        )
    )
    address.tell_here(done)  # on the step's thread, if the agent is idle
