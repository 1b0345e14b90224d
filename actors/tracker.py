"""The RunTrackerActor: every run status change goes through it, in one place.

It keeps the status of every open run in memory, refuses transitions the state machine
does not allow (and logs them), writes the allowed ones through the committer without
waiting, and resolves `wait_for_runs` only once a terminal status is committed.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors._scheduler import Scheduler
from messages import (
    CancelRun,
    FinishRun,
    RetryTransition,
    Run,
    RunNotFound,
    RunsCreated,
    RunStatus,
    StartDecision,
    StartRun,
    StopReason,
    StoreUnavailable,
    TerminalCommitted,
    TransitionFailed,
    TransitionRefused,
    WatchRuns,
    check_transition,
)
from persistence import Store, Transition, utcnow

log = structlog.get_logger("sleeptime.tracker")

RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s, while the runtime lives


@dataclass(slots=True)
class _Open:
    """A run the tracker follows until its terminal status is committed."""

    agent_id: str
    group_id: str
    status: RunStatus
    attempt: int
    cancel: threading.Event | None = None
    settled: Future[None] | None = None
    pending: Transition | None = None
    retries: int = 0
    waiters: list[Future[None]] = field(default_factory=list)


class RunTrackerActor(pykka.ThreadingActor):
    """Records run status changes, durably and in a legal order.

    Told: `RunsCreated`, `FinishRun`. Asked: `StartRun` -> `StartDecision`,
    `CancelRun` -> commit future or None, `WatchRuns` -> one future per run.
    """

    use_daemon_thread = True

    def __init__(self, store: Store, scheduler: Scheduler, open_runs: list[Run]) -> None:
        super().__init__()
        self._store = store
        self._scheduler = scheduler
        self._open: dict[str, _Open] = {
            run.id: _Open(run.agent_id, run.group_id, run.status, run.attempt) for run in open_runs
        }

    def on_receive(self, message: Any) -> Any:
        match message:
            case RunsCreated(runs=runs):
                for run in runs:
                    self._open.setdefault(
                        run.id, _Open(run.agent_id, run.group_id, run.status, run.attempt)
                    )
            case StartRun(run_id=run_id):
                return self._start(run_id)
            case FinishRun():
                self._finish(message)
            case CancelRun(run_id=run_id):
                return self._cancel(run_id)
            case WatchRuns(run_ids=run_ids):
                return self._watch(run_ids)
            case TerminalCommitted(run_id=run_id):
                self._settle(run_id)
            case TransitionFailed(run_id=run_id, error=error, retryable=retryable):
                self._retry(run_id, error, retryable)
            case RetryTransition(run_id=run_id):
                pending = self._open.get(run_id)
                if pending is not None and pending.pending is not None:
                    self._submit(run_id, pending, pending.pending)
            case _:
                return super().on_receive(message)
        return None

    @property
    def open_count(self) -> int:
        return sum(1 for run in self._open.values() if not run.status.terminal)

    # -- transitions ----------------------------------------------------------------------

    def _start(self, run_id: str) -> StartDecision:
        run = self._open.get(run_id)
        if run is None or run.status is not RunStatus.CREATED:
            status = "unknown" if run is None else run.status.value
            log.debug("start_refused", run_id=run_id, status=status)
            return StartDecision(started=False, reason=f"run is {status}")
        run.cancel = threading.Event()
        committed = self._write(run_id, run, RunStatus.RUNNING, reason="started")
        return StartDecision(
            started=True, attempt=run.attempt, cancel=run.cancel, committed=committed
        )

    def _finish(self, finish: FinishRun) -> None:
        run = self._open.get(finish.run_id)
        try:
            if run is None or run.attempt != finish.attempt:
                raise TransitionRefused(finish.run_id, "terminal or re-queued", finish.status.value)
            self._write(
                finish.run_id,
                run,
                finish.status,
                reason=finish.stop_reason.value,
                stop_reason=finish.stop_reason,
                error=finish.error,
                messages=finish.messages,
            )
        except TransitionRefused as refused:
            # A late finish (after cancel or timeout) changes nothing, but what the agent
            # did is kept in its history.
            log.info(
                "transition_refused",
                run_id=finish.run_id,
                agent_id=finish.messages[0].agent_id if finish.messages else None,
                detail=str(refused),
            )
            if finish.messages:
                self._store.store_messages(finish.messages)

    def _cancel(self, run_id: str) -> Future[None] | None:
        run = self._open.get(run_id)
        if run is None:
            return None
        if run.status.terminal:
            return run.settled
        if run.cancel is not None:
            run.cancel.set()
        return self._write(
            run_id, run, RunStatus.CANCELLED, reason="cancelled", stop_reason=StopReason.CANCELLED
        )

    def _write(
        self,
        run_id: str,
        run: _Open,
        new: RunStatus,
        *,
        reason: str,
        stop_reason: StopReason | None = None,
        error: str | None = None,
        messages: list[Any] | None = None,
    ) -> Future[None]:
        check_transition(run_id, run.status, new)
        change = Transition(
            run_id=run_id,
            old=run.status,
            new=new,
            at=utcnow(),
            attempt=run.attempt,
            reason=reason,
            stop_reason=stop_reason,
            error=error,
            messages=messages or [],
        )
        run.status = new
        return self._submit(run_id, run, change)

    def _submit(self, run_id: str, run: _Open, change: Transition) -> Future[None]:
        future = self._store.apply_transition(change)
        ref = self.actor_ref
        if change.new.terminal:
            run.settled, run.pending = future, change

        def committed(done: Future[None]) -> None:
            error = done.exception()
            try:
                if error is not None:
                    retryable = isinstance(error, StoreUnavailable)
                    ref.tell(TransitionFailed(run_id=run_id, error=str(error), retryable=retryable))
                elif change.new.terminal:
                    ref.tell(TerminalCommitted(run_id=run_id))
            except pykka.ActorDeadError:
                pass  # stopping: what is not committed is recovered on the next start

        future.add_done_callback(committed)
        return future

    def _settle(self, run_id: str) -> None:
        run = self._open.pop(run_id, None)
        if run is not None:
            for waiter in run.waiters:
                waiter.set_result(None)

    def _retry(self, run_id: str, error: str, retryable: bool) -> None:
        """A write failed: a terminal one is written again until it lands (a run must
        end); a start or re-queue that failed is left to the terminal write that follows,
        whose guard accepts any open status."""
        run = self._open.get(run_id)
        if run is None:
            return
        if run.pending is None:
            log.warning("transition_not_recorded", run_id=run_id, error=error)
            return
        if retryable:
            delay = RETRY_DELAYS[min(run.retries, len(RETRY_DELAYS) - 1)]
            run.retries += 1
            log.warning("transition_retry", run_id=run_id, error=error, delay_s=delay)
            ref = self.actor_ref
            self._scheduler.call_later(delay, lambda: _tell(ref, RetryTransition(run_id=run_id)))
            return
        log.warning("transition_refused_by_store", run_id=run_id, error=error)
        self._resync(run_id, run)

    def _resync(self, run_id: str, run: _Open) -> None:
        try:
            stored = self._store.get_run(run_id)
        except (RunNotFound, StoreUnavailable) as error:
            log.error("resync_failed", run_id=run_id, error=str(error))
            return
        run.status, run.attempt, run.pending = stored.status, stored.attempt, None
        if stored.status.terminal:
            self._settle(run_id)

    def on_failure(self, *exc_info: Any) -> None:
        log.error("actor_crashed", actor="RunTrackerActor", error=repr(exc_info[1]))

    # -- waiting --------------------------------------------------------------------------

    def _watch(self, run_ids: list[str]) -> list[Future[None]]:
        futures: dict[str, Future[None]] = {}
        unknown = [i for i in dict.fromkeys(run_ids) if i not in self._open]
        stored = self._store.get_runs(unknown) if unknown else {}
        for run_id in dict.fromkeys(run_ids):
            future: Future[None] = Future()
            run = self._open.get(run_id)
            if run is not None:
                run.waiters.append(future)
            elif run_id not in stored:
                raise RunNotFound(run_id)
            elif stored[run_id].status.terminal:
                future.set_result(None)
            else:  # open in the store but not followed: follow it from now on
                found = stored[run_id]
                self._open[run_id] = _Open(
                    found.agent_id, found.group_id, found.status, found.attempt, waiters=[future]
                )
            futures[run_id] = future
        return [futures[run_id] for run_id in run_ids]


def _tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass
