"""The SleeptimeAgentActor: one per sleeptime agent id, running its runs one at a time.

Runs start in creation order; the next starts only when the current one has ended
(completed, failed, cancelled and returned, or timed out), so two runs of one agent
never overlap. Steps execute on the shared step pool, so this actor stays free to take
deadlines and new runs while its agent works. A new incarnation takes its queue from the
tracker, which re-queues the run the previous one was running.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pydantic
import structlog

from actors._execute import execute_run
from actors._scheduler import Timer
from actors._supervision import Address, CrashReporter, SupervisedActor
from actors.kinds._base import AgentBehaviour
from messages import (
    AdoptRuns,
    Agent,
    AgentConfigError,
    AssignRun,
    FinishRun,
    Group,
    GroupChanged,
    KindRegistered,
    Message,
    Run,
    RunDeadline,
    RunStatus,
    StartDecision,
    StartRun,
    StepDone,
    StopReason,
    UnknownAgentKind,
)

if TYPE_CHECKING:
    from actors._parts import RuntimeParts

log = structlog.get_logger("sleeptime.agent")


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What a passivated agent leaves for its next instance: its group's settings and
    where its history ends (only this agent's runs append to it)."""

    group: Group
    next_seq: int


@dataclass(slots=True)
class _Current:
    run_id: str
    attempt: int
    decision: StartDecision
    future: Future[StepDone]
    deadline: Timer


class SleeptimeAgentActor(SupervisedActor):
    """Executes the runs of one sleeptime agent, one at a time, in creation order.

    Told: `AssignRun`, `StepDone`, `RunDeadline`, `GroupChanged`, `KindRegistered`.
    """

    def __init__(
        self,
        reporter: CrashReporter,
        agent: Agent,
        group: Group,
        parts: RuntimeParts,
        snapshot: AgentSnapshot | None = None,
    ) -> None:
        super().__init__(reporter)
        self._address = reporter.address
        self._agent = agent
        self._group = group
        self._parts = parts
        self._next_seq = 1
        self._snapshot = snapshot
        self._queue: deque[Run] = deque()
        self._queued: set[str] = set()
        self._windows: dict[str, list[Message]] = {}  # run id -> window handed over with it
        self._current: _Current | None = None
        self._behaviour: AgentBehaviour | None = None
        self._build_error: str | None = None
        chaos = parts.chaos
        self._step_dice = (
            chaos.dice(f"steps/{agent.id}", reporter.address.incarnation)
            if (chaos is not None and chaos.failure_rate > 0)
            else None
        )
        self._log = log.bind(agent_id=agent.id, group_id=agent.group_id)

    def started(self) -> None:
        if self._snapshot is not None:
            self._next_seq = self._snapshot.next_seq
        else:
            self._next_seq = self._parts.store.last_sequence(self._agent.id) + 1
        for run in self._parts.tracker.ask(AdoptRuns(agent_id=self._agent.id)):
            self._enqueue(run)
        self._pump()

    def on_stop(self) -> None:
        if self._current is not None:
            self._current.deadline.cancel()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        if self._current is not None:
            self._current.deadline.cancel()
        super().on_failure(exception_type, exception_value, traceback)

    def receive(self, message: Any) -> Any:
        match message:
            case AssignRun(run=run, window=window):
                self._enqueue(run, window)
            case StepDone():
                self._step_done(message)
            case RunDeadline(run_id=run_id, attempt=attempt):
                self._deadline(run_id, attempt)
            case GroupChanged(group=group):
                self._group = group
            case KindRegistered(kind=kind):
                if kind == self._agent.kind:
                    self._behaviour, self._build_error = None, None
            case _:
                raise TypeError(f"a sleeptime agent does not handle {type(message).__name__}")
        self._pump()
        return None

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue)

    def idle(self) -> bool:
        return not self.busy

    def snapshot(self) -> AgentSnapshot:
        return AgentSnapshot(group=self._group, next_seq=self._next_seq)

    def _enqueue(self, run: Run, window: list[Message] | None = None) -> None:
        if run.id not in self._queued and (self._current is None or self._current.run_id != run.id):
            self._queue.append(run)
            self._queued.add(run.id)
            if window is not None:
                self._windows[run.id] = window

    def _pump(self) -> None:
        while self._current is None and self._queue:
            if not self._ready():
                return
            run = self._queue.popleft()
            self._queued.discard(run.id)
            window = self._windows.pop(run.id, None)
            decision: StartDecision = self._parts.tracker.ask(StartRun(run_id=run.id))
            if decision.started:
                self._begin(run, decision, window)

    def _ready(self) -> bool:
        """Build the agent if needed; False while its kind is not registered."""
        if self._behaviour is not None or self._build_error is not None:
            return True
        try:
            self._behaviour = self._parts.kinds.build(self._agent.kind, self._agent.config)
        except UnknownAgentKind as error:
            self._log.warning("waiting_for_kind", kind=self._agent.kind, detail=str(error))
            return False
        except (AgentConfigError, pydantic.ValidationError) as error:
            self._build_error = str(error)
        return True

    def _begin(self, run: Run, decision: StartDecision, window: list[Message] | None) -> None:
        assert decision.cancel is not None and decision.committed is not None
        address = self._address
        if self._behaviour is None:
            error = self._build_error or "agent could not be built"
            self._parts.tracker.tell(
                FinishRun(
                    run_id=run.id,
                    attempt=decision.attempt,
                    status=RunStatus.FAILED,
                    stop_reason=StopReason.ERROR,
                    error=error,
                )
            )
            return
        job = partial(
            execute_run,
            run=run,
            attempt=decision.attempt,
            group=self._group,
            behaviour=self._behaviour,
            store=self._parts.store,
            cancel=decision.cancel,
            started=decision.committed,
            first_seq=self._next_seq,
            window=window,
            injected_failure=self._step_dice is not None
            and self._step_dice.random()
            < (self._parts.chaos.failure_rate if self._parts.chaos else 0.0),
        )
        future = self._parts.pool.submit(job)
        deadline = self._parts.scheduler.call_later(
            self._group.run_timeout,
            partial(address.tell, RunDeadline(run_id=run.id, attempt=decision.attempt)),
        )
        self._current = _Current(run.id, decision.attempt, decision, future, deadline)
        future.add_done_callback(partial(_report, address, run.id, decision.attempt))
        self._log.debug("run_started", run_id=run.id, attempt=decision.attempt)

    def _step_done(self, done: StepDone) -> None:
        current = self._current
        if current is None or (current.run_id, current.attempt) != (done.run_id, done.attempt):
            self._log.info("late_result_ignored", run_id=done.run_id, error=done.error)
            return
        current.deadline.cancel()
        self._current = None
        if done.messages:
            self._next_seq = max(self._next_seq, done.messages[-1].sequence + 1)
        status = RunStatus.FAILED if done.error is not None else RunStatus.COMPLETED
        self._parts.tracker.tell(
            FinishRun(
                run_id=done.run_id,
                attempt=done.attempt,
                status=status,
                stop_reason=done.stop_reason,
                error=done.error,
                messages=done.messages,
            )
        )
        self._log.debug(
            "run_finished",
            run_id=done.run_id,
            status=status.value,
            stop_reason=done.stop_reason.value,
            error=done.error,
        )

    def _deadline(self, run_id: str, attempt: int) -> None:
        current = self._current
        if current is None or (current.run_id, current.attempt) != (run_id, attempt):
            return
        assert current.decision.cancel is not None
        current.decision.cancel.set()
        self._parts.pool.abandon(current.future)
        self._current = None
        self._next_seq += 1  # the transcript's sequence stays reserved for the late step
        error = f"run exceeded the group's run_timeout of {self._group.run_timeout:g}s"
        self._parts.tracker.tell(
            FinishRun(
                run_id=run_id,
                attempt=attempt,
                status=RunStatus.FAILED,
                stop_reason=StopReason.TIMEOUT,
                error=error,
            )
        )
        self._log.warning("run_timed_out", run_id=run_id, timeout_s=self._group.run_timeout)


def _report(address: Address, run_id: str, attempt: int, future: Future[StepDone]) -> None:
    error = future.exception()
    done = (
        future.result()
        if error is None
        else StepDone(
            run_id=run_id,
            attempt=attempt,
            messages=[],
            stop_reason=StopReason.ERROR,
            error=f"{type(error).__name__}: {error}",
        )
    )
    address.tell(done)
