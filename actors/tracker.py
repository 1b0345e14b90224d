"""The RunTrackerActor: every run status change goes through it, in one place.

Recovery too: a run an earlier process (or a crashed actor) left `running` is re-queued
or failed here, as `rules.after_interruption` decides, when its agent's actor adopts it.

It keeps every open run in memory, refuses transitions the state machine does not allow
(and logs them), writes the allowed ones through the committer without waiting (each
guarded by the status and attempt it holds the run at, so the store refuses a late write
of an earlier attempt), and resolves `wait_for_runs` only once a terminal status is
committed. Its state comes from the store: a restarted tracker first lets every write
already queued commit, then loads the open runs. Waiters and cancel flags live outside it
and survive its restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from actors._address import Address
from actors._observer import NO_OBSERVER, Observer
from actors._protocol import (
    Adopted,
    AdoptRuns,
    AdoptShards,
    CancelAgentRuns,
    CancelRun,
    CountOpenRuns,
    DropShards,
    EndedRuns,
    FailGroupRuns,
    FinishRun,
    ForgetGroup,
    RetryTransition,
    RunsCreated,
    StartAborted,
    StartDecision,
    StartRun,
    TerminalCommitted,
    TransitionFailed,
    WatchRuns,
)
from actors._scheduler import Scheduler
from actors._supervised import CrashReporter, SupervisedActor, contained
from actors.rules import GiveUp, Requeue, after_interruption
from messages import (
    ALLOWED_TRANSITIONS,
    GroupNotFound,
    NotOwner,
    Run,
    RunNotFound,
    RunStatus,
    ShardLost,
    StopReason,
    StoreUnavailable,
    TransitionRefused,
)
from messages._futures import Flag, Reply, reject, resolve
from messages._log import get_logger
from messages._runs import check_transition
from persistence import Store, Transition, utcnow

log = get_logger("sleeptime.tracker")
run_log = get_logger("sleeptime.run")
"""The lifecycle of runs: started, re-queued, finished (with durations)."""
T = TypeVar("T")

RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s, while the runtime lives
STORE_PATIENCE_S = 60.0
"""How long a restarted tracker waits for an unavailable store before it counts as crashed."""


def _when_store_answers(load: Callable[[], T], patience: float) -> T:
    """`load()`, tried again with a growing pause while the store is unavailable, for up
    to `patience` seconds; then its StoreUnavailable is raised."""
    deadline = time.monotonic() + patience
    pause, wait = 0.05, threading.Event()
    while True:
        try:
            return load()
        except StoreUnavailable as error:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("tracker_waiting_for_store", error=str(error), retry_in_s=pause)
            wait.wait(pause)
            pause = min(2.0, pause * 2)


class RunWaiters:
    """Futures of callers waiting for runs to end, kept across tracker restarts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Future[Run | None]]] = {}

    def add(self, run_id: str) -> Future[Run | None]:
        """A future resolved (with None) once the run ends."""
        future: Future[Run | None] = Reply()
        with self._lock:
            self._waiting.setdefault(run_id, []).append(future)
        return future

    def resolve(self, run_id: str) -> None:
        with self._lock:
            futures = self._waiting.pop(run_id, [])
        for future in futures:
            resolve(future, None)

    def run_ids(self) -> list[str]:
        with self._lock:
            return list(self._waiting)

    def fail_runs(self, errors: dict[str, Exception]) -> None:
        """Answer the callers waiting for each run with its error (this process will not
        see those runs end: their shard moved)."""
        with self._lock:
            futures = [
                (f, error)
                for run_id, error in errors.items()
                for f in self._waiting.pop(run_id, [])
            ]
        for future, error in futures:
            reject(future, error)

    def fail(self, error: Exception) -> None:
        """Answer every waiting caller with `error` (no tracker will resolve them)."""
        with self._lock:
            futures = [f for waiting in self._waiting.values() for f in waiting]
            self._waiting.clear()
        for future in futures:
            reject(future, error)


class CancelFlags:
    """The cancel flag of each run's current attempt, seen by its agent's context.

    Every attempt gets a fresh flag, so re-queuing never un-cancels an earlier attempt
    that is still stepping.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, threading.Event] = {}

    def new_attempt(self, run_id: str) -> threading.Event:
        flag: threading.Event = Flag()
        with self._lock:
            self._flags[run_id] = flag
        return flag

    def raise_flag(self, run_id: str) -> None:
        with self._lock:
            flag = self._flags.get(run_id)
        if flag is not None:
            flag.set()

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._flags.pop(run_id, None)


@dataclass(slots=True)
class _Open:
    """A run the tracker follows until its terminal status is committed."""

    run: Run
    status: RunStatus
    attempt: int
    pending: Transition | None = None
    settled: Future[datetime | None] | None = None
    retries: int = 0
    started_at: datetime | None = None
    """When its current attempt started running, as written (for its duration)."""
    unsure: bool = False
    """A start or re-queue of this run failed (a store outage, a commit whose outcome is
    unknown): the stored status and attempt are read back before its next change."""
    start_token: int = 0
    """The agent's request that started its current attempt (see `FinishRun`)."""
    adopted: int = 0
    """The token of the last `AdoptRuns` of its agent, by a new incarnation: a start asked
    with an older token comes from an incarnation gone since, and is refused."""


def _opened(run: Run) -> _Open:
    """Follow `run` at its status and attempt as given (stored, or just created)."""
    started_at = run.started_at if run.status is RunStatus.RUNNING else None  # (this attempt's)
    return _Open(run, run.status, run.attempt, started_at=started_at)


class OpenRuns:
    """The runs a tracker follows, by id, and by agent: a (re)started agent's actor asks
    for its own runs at every activation (`AdoptRuns`), and with thousands of groups
    passivated and woken in turn, that was a scan of every open run per activation."""

    __slots__ = ("_by_agent", "_runs")

    def __init__(self) -> None:
        self._runs: dict[str, _Open] = {}
        self._by_agent: dict[str, dict[str, _Open]] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def __getitem__(self, run_id: str) -> _Open:
        return self._runs[run_id]

    def __setitem__(self, run_id: str, found: _Open) -> None:
        self._runs[run_id] = found
        self._by_agent.setdefault(found.run.agent_id, {})[run_id] = found

    def setdefault(self, run_id: str, found: _Open) -> _Open:
        known = self._runs.get(run_id)
        if known is not None:
            return known
        self[run_id] = found
        return found

    def get(self, run_id: str) -> _Open | None:
        return self._runs.get(run_id)

    def pop(self, run_id: str) -> _Open | None:
        """Follow the run no more; what was followed (None if nothing)."""
        found = self._runs.pop(run_id, None)
        if found is not None:
            agent_id = found.run.agent_id
            mine = self._by_agent.get(agent_id)
            if mine is not None:
                mine.pop(run_id, None)
                if not mine:
                    del self._by_agent[agent_id]
        return found

    def values(self) -> list[_Open]:
        return list(self._runs.values())

    def items(self) -> list[tuple[str, _Open]]:
        return list(self._runs.items())

    def of_agent(self, agent_id: str) -> list[_Open]:
        return list(self._by_agent.get(agent_id, {}).values())


class RunTrackerActor(SupervisedActor):
    """Records run status changes, durably and in a legal order.

    Told: `RunsCreated`, `FinishRun`, `FailGroupRuns`. With a reply: `StartRun` ->
    `StartDecision`, `CancelRun` -> commit future or None, `WatchRuns` -> futures,
    `AdoptRuns` -> runs, `CountOpenRuns` -> counts by status. Every change committed is
    told to the observer and logged (`run_started`, `run_requeued`, `run_finished`).
    """

    def __init__(
        self,
        reporter: CrashReporter | None,
        store: Store,
        scheduler: Scheduler,
        waiters: RunWaiters,
        flags: CancelFlags,
        address: Address,
        recovered: Future[None] | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        """`recovered`: given to the first incarnation of a starting runtime, which
        recovers the runs an earlier process left `running` and resolves it once that is
        committed (or fails it with the reason). `observer` is told of every change
        committed."""
        super().__init__(reporter)
        self._observer = observer
        self._store = store
        self._scheduler = scheduler
        self._waiters = waiters
        self._flags = flags
        self._address = address
        self._recovered = recovered
        self._open = OpenRuns()
        self._ended = EndedRuns()  # this incarnation's writes' ends, gathered
        # By agent: its runs whose end is written but not yet known committed. A run of
        # the agent starts only after them (SPEC 6: one at a time, in order), even when
        # the store lost one of those writes (`_start`).
        self._ending: dict[str, set[str]] = {}

    def started(self) -> None:
        try:
            # A restart during an outage of the store waits for it (up to a bound), so
            # an outage never counts as a crash loop; a runtime's first start does not wait.
            patience = 0.0 if self._recovered is not None else STORE_PATIENCE_S
            for run in _when_store_answers(self._load, patience):
                self._open[run.id] = _opened(run)
            for run_id in self._waiters.run_ids():
                if run_id not in self._open:
                    self._waiters.resolve(run_id)  # ended while no tracker was listening
            if self._recovered is not None:
                self._recover()
        except BaseException as error:
            if self._recovered is not None:
                reject(self._recovered, contained(error))
            raise
        if self._recovered is not None:
            resolve(self._recovered, None)

    def _load(self, shards: frozenset[int] | None = None) -> list[Run]:
        """The open runs of the shards this process holds (of `shards` only, if given),
        once what was queued is settled."""
        self._store.committer.run(lambda connection: None)
        book = self._store.book
        return [
            run
            for run in self._store.open_runs()
            if book.epoch(shard := book.shard_of(run.group_id)) is not None
            and (shards is None or shard in shards)
        ]

    def _recover(self, runs: list[Run] | None = None) -> None:
        """A run an earlier process (or the shard's earlier owner) left `running` was
        interrupted by its end. Each is re-queued or failed, in the order the runs were
        created (all of them, or those of `runs`)."""
        chosen = self._open.values() if runs is None else [self._open[r.id] for r in runs]
        interrupted = sorted(
            (found for found in chosen if found.status is RunStatus.RUNNING),
            key=lambda found: (found.run.created_at, found.run.turn),
        )
        limits: dict[str, int] = {}  # group id -> max_attempts, read once
        writes = [self._interrupt(found, limits) for found in interrupted]
        for write in writes:
            write.result()  # committed before the runtime takes any work
        if writes:
            log.warning("runs_recovered", runs=len(writes))

    def receive(self, message: Any) -> Any:
        match message:
            case RunsCreated(runs=runs):
                for run in runs:
                    self._open.setdefault(run.id, _opened(run))
            case StartRun(run_id=run_id, decided=decided, token=token):
                self._decide_start(run_id, token, decided)
            case StartAborted(run_id=run_id, attempt=attempt):
                self._start_aborted(run_id, attempt)
            case FinishRun():
                self._finish(message)
            case CancelRun(run_id=run_id):
                return self._cancel(run_id)
            case WatchRuns(run_ids=run_ids):
                return self._watch(run_ids)
            case CountOpenRuns():
                return self._count_open()
            case AdoptRuns(agent_id=agent_id, reply_to=reply_to, token=token):
                reply_to.tell(self._answer_adopt(agent_id, token))
            case FailGroupRuns(group_id=group_id, reason=reason):
                self._fail_group(group_id, reason)
            case AdoptShards(shards=shards):
                return self._adopt_shards(shards)
            case DropShards(shards=shards, lost=lost):
                self._drop_shards(shards, lost)
            case TerminalCommitted(ended=ended):
                for run_id in ended.take():
                    self._settle(run_id)
            case CancelAgentRuns(agent_id=agent_id):
                return self._cancel_agent(agent_id)
            case ForgetGroup(group_id=group_id):
                self._forget_group(group_id)
            case TransitionFailed():
                self._retry(message)
            case RetryTransition(run_id=run_id):
                found = self._open.get(run_id)
                if found is not None and found.pending is not None:
                    self._submit(run_id, found, found.pending)
            case _:
                raise TypeError(f"the run tracker does not handle {type(message).__name__}")
        return None

    # -- transitions ----------------------------------------------------------------------

    def _start(self, run_id: str) -> StartDecision:
        run = self._open.get(run_id)
        if run is not None and run.unsure:
            try:
                self._read_back(run)
            except StoreUnavailable as error:
                return StartDecision(started=False, retry=True, reason=str(error))
            except RunNotFound:  # its group was deleted meanwhile
                self._gone(run_id)
                return StartDecision(started=False, reason="run is deleted")
        if run is None or run.status is not RunStatus.CREATED:
            status = "unknown" if run is None else run.status.value
            log.debug("start_refused", run_id=run_id, status=status)
            return StartDecision(started=False, reason=f"run is {status}")
        ending = self._ends_pending(run.run.agent_id)
        lost = next((e for e in ending if e.settled is None or _failed(e.settled)), None)
        if lost is not None:  # its write failed: retried until it lands, and this waits
            reason = f"the end of the agent's earlier run {lost.run.id} is not recorded yet"
            log.info("start_put_off", run_id=run_id, reason=reason)
            return StartDecision(started=False, retry=True, reason=reason)
        flag = self._flags.new_attempt(run_id)
        # Queued after those ends, it commits with them or after them; if one of them
        # fails, so does this start (nothing of it stored).
        after = [e.settled for e in ending if e.settled is not None]
        committed = self._write(run_id, run, RunStatus.RUNNING, reason="started", after=after)
        return StartDecision(started=True, attempt=run.attempt, cancel=flag, committed=committed)

    def _ends_pending(self, agent_id: str) -> list[_Open]:
        """The agent's runs whose end is written and not yet known committed."""
        run_ids = self._ending.get(agent_id)
        if not run_ids:
            return []
        pending = []
        for run_id in list(run_ids):
            found = self._open.get(run_id)
            if found is None or not found.status.terminal:  # settled, or taken back
                run_ids.discard(run_id)
            else:
                pending.append(found)
        if not run_ids:
            del self._ending[agent_id]
        return pending

    def _start_aborted(self, run_id: str, attempt: int) -> None:
        """The agent never stepped the run (the store was unavailable): queued again."""
        found = self._open.get(run_id)
        if found is None or found.attempt != attempt or found.status is not RunStatus.RUNNING:
            return  # cancelled, failed or re-queued meanwhile: that change stands
        self._flags.forget(run_id)
        found.status, found.unsure = RunStatus.CREATED, True
        log.info("run_start_aborted", run_id=run_id, attempt=attempt)

    def _read_back(self, run: _Open) -> None:
        """Take the stored status and attempt of a run whose last start or re-queue may
        not have landed (`unsure`) as the truth.

        An attempt stored `running` that this tracker had already left (an aborted start
        that landed after all, a re-queue that never did) was interrupted: it is
        re-queued (attempt + 1) or failed past max_attempts, as after a crash. Raises
        StoreUnavailable (the run stays unsure).
        """
        if run.status.terminal:  # its terminal write, retried until it lands, decides
            run.unsure = False
            return
        stored = self._store.get_run(run.run.id)
        run.unsure = False
        left = stored.status is RunStatus.RUNNING and (
            run.status is RunStatus.CREATED or stored.attempt < run.attempt
        )
        self._take_stored(run, stored)
        if left:
            self._interrupt(run)

    def _read_back_if_unsure(self, run: _Open | None) -> None:
        """`_read_back` before a change the tracker must base on the stored attempt; while
        the store is away the change goes ahead on what the tracker knows (a guard that
        misses is repaired when its refusal comes back)."""
        if run is None or not run.unsure:
            return
        try:
            self._read_back(run)
        except StoreUnavailable as error:  # still unsure: read back at its next change
            log.warning("read_back_failed", run_id=run.run.id, error=str(error))
        except RunNotFound:  # its group was deleted meanwhile (its start found no row)
            self._gone(run.run.id)

    def _finish(self, finish: FinishRun) -> None:
        self._read_back_if_unsure(self._open.get(finish.run_id))
        run = self._open.get(finish.run_id)  # (None if reading back found it deleted)
        attempt = finish.attempt
        if (
            attempt is None
            and run is not None
            and run.status is RunStatus.RUNNING
            and run.start_token == finish.token
        ):
            attempt = run.attempt  # the attempt its agent's request began, still running
        try:
            if run is None or run.attempt != attempt:
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
            # A late finish (after a cancel, a timeout or a re-queue) changes nothing, but
            # what the agent did is kept in its history.
            log.info("transition_refused", run_id=finish.run_id, detail=str(refused))
            if finish.messages:
                self._store.store_messages(finish.messages)

    def _cancel(self, run_id: str) -> Future[datetime | None] | None:
        run = self._open.get(run_id)
        if run is None:
            stored = self._store.get_run(run_id)
            if stored.status.terminal:
                return None
            if not self._holds(stored.group_id):
                raise self._store.not_owner(stored.group_id)
            run = self._open[run_id] = _opened(stored)
        self._read_back_if_unsure(run)
        if run_id not in self._open:
            return None
        if run.status.terminal:
            return run.settled
        self._flags.raise_flag(run_id)
        return self._write(
            run_id, run, RunStatus.CANCELLED, reason="cancelled", stop_reason=StopReason.CANCELLED
        )

    # A told request must be answered whatever happens: its sender waits for the answer,
    # and a crash here would lose the request (only a message no code ran is redelivered).

    def _decide_start(self, run_id: str, token: int, decided: Future[StartDecision]) -> None:
        """Answer a start request through its `decided` future: once the start's commit
        is known if the run starts (the step waits for it anyway), at once otherwise."""
        decision = self._answer_start(run_id, token)
        if not decision.started:
            resolve(decided, decision)
            return
        self._open[run_id].start_token = token
        assert decision.committed is not None
        decision.committed.add_done_callback(lambda _: resolve(decided, decision))

    def _answer_start(self, run_id: str, token: int) -> StartDecision:
        found = self._open.get(run_id)
        if found is not None and token < found.adopted:
            # A step its agent's earlier incarnation queued, taken by a thread only now:
            # the new incarnation has the run (tokens only grow), this one must not run.
            log.info("start_refused_stale_incarnation", run_id=run_id)
            reason = "asked by a stopped incarnation of its agent"
            return StartDecision(started=False, reason=reason, token=token)
        try:
            decision = self._start(run_id)
        except Exception as error:
            log.error("start_failed", run_id=run_id, error=repr(error))
            return StartDecision(started=False, retry=True, reason=repr(error), token=token)
        return replace(decision, token=token)

    def _answer_adopt(self, agent_id: str, token: int) -> Adopted:
        try:
            return Adopted(runs=self._adopt(agent_id, token), token=token)
        except Exception as error:
            log.error("adopt_failed", agent_id=agent_id, error=repr(error))
            return Adopted(runs=[], token=token, retry=True)

    def _adopt(self, agent_id: str, token: int) -> list[Run]:
        """Hand a (re)started agent its runs; one it was running is re-queued first."""
        mine = sorted(
            self._open.of_agent(agent_id),
            key=lambda r: (r.run.turn, r.run.metadata.get("position", 0)),  # creation order
        )
        for found in mine:
            found.adopted = max(found.adopted, token)
            if found.status is RunStatus.RUNNING:
                self._interrupt(found)
        return [
            found.run.model_copy(update={"attempt": found.attempt, "status": RunStatus.CREATED})
            for found in mine
            if found.status is RunStatus.CREATED
        ]

    def _interrupt(
        self, found: _Open, limits: dict[str, int] | None = None
    ) -> Future[datetime | None]:
        """Re-queue or fail a run whose attempt was interrupted (`rules.after_interruption`);
        returns the commit of that change. `limits` caches the groups' max_attempts."""
        run_id, group_id = found.run.id, found.run.group_id
        self._flags.raise_flag(run_id)  # whatever still runs of that attempt, stop it
        limits = {} if limits is None else limits
        if group_id not in limits:
            try:
                limits[group_id] = self._store.get_group(group_id).max_attempts
            except (GroupNotFound, StoreUnavailable):
                limits[group_id] = found.attempt + 1
        match after_interruption(found.attempt, limits[group_id]):
            case GiveUp(error=error):
                return self._write(
                    run_id,
                    found,
                    RunStatus.FAILED,
                    reason="interrupted",
                    stop_reason=StopReason.INTERRUPTED,
                    error=error,
                )
            case Requeue(attempt=attempt):
                return self._write(
                    run_id, found, RunStatus.CREATED, reason="interrupted", attempt=attempt
                )

    # -- shards ---------------------------------------------------------------------------

    def _holds(self, group_id: str) -> bool:
        return self._store.book.epoch(self._store.shard_of(group_id)) is not None

    def _adopt_shards(self, shards: frozenset[int]) -> list[str]:
        """Follow the open runs of newly held `shards`, recovering those left running;
        returns the agents that have runs there, to be started.

        A run this tracker follows already counts too: an incarnation that restarted
        after the shards were put in the book (and before this request) loaded their
        runs as its own. Left running by the shard's earlier owner, such a run was
        started by no agent here (`start_token` 0): it is recovered all the same."""
        found = self._load(shards)
        for run in found:
            if run.id not in self._open:
                self._open[run.id] = _opened(run)
        interrupted = [run for run in found if self._open[run.id].start_token == 0]
        self._recover(interrupted)
        if found:
            log.info("shard_runs_adopted", shards=len(shards), runs=len(found))
        return list(dict.fromkeys(run.agent_id for run in found))

    def _drop_shards(self, shards: frozenset[int], lost: bool) -> None:
        """Forget the runs of `shards`: their new owner carries them on. Their waiters hear
        why: ShardLost (taken over) or NotOwner naming the group (handed over)."""
        book = self._store.book
        errors: dict[str, Exception] = {}
        for run_id, found in self._open.items():
            group_id = found.run.group_id
            shard = book.shard_of(group_id)
            if shard not in shards:
                continue
            self._flags.raise_flag(run_id)  # whatever still steps here stops
            self._flags.forget(run_id)
            self._open.pop(run_id)
            errors[run_id] = ShardLost(shard) if lost else NotOwner(group_id, shard)
        self._waiters.fail_runs(errors)
        if errors:
            self._observer.runs_forgotten(list(errors), "moved")
            log.warning("shard_runs_dropped", shards=len(shards), runs=len(errors), lost=lost)

    def _fail_group(self, group_id: str, reason: str) -> None:
        for run_id, found in self._open.items():
            if found.run.group_id == group_id and not found.status.terminal:
                self._flags.raise_flag(run_id)
                self._write(
                    run_id,
                    found,
                    RunStatus.FAILED,
                    reason="group_failed",
                    stop_reason=StopReason.ERROR,
                    error=f"the group failed: {reason}",
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
        attempt: int | None = None,
        after: Sequence[Future[Any]] = (),
    ) -> Future[datetime | None]:
        """Record `run` moving to `new`, guarded by the status and attempt the tracker
        holds it at; `attempt` is the attempt it moves to (a re-queue's; else the same);
        `after`: writes it must not outlive (see `Store.apply_transition`)."""
        check_transition(run_id, run.status, new)
        change = Transition(
            run_id=run_id,
            old=run.status,
            new=new,
            at=utcnow(),
            attempt=run.attempt if attempt is None else attempt,
            expected_attempt=run.attempt,
            reason=reason,
            stop_reason=stop_reason,
            error=error,
            messages=messages or [],
            group_id=run.run.group_id,
        )
        run.status, run.attempt = new, change.attempt
        if new is RunStatus.RUNNING:
            run.started_at = change.at
        elif new is RunStatus.CREATED:  # re-queued: its next attempt has not started
            run.started_at = None
        return self._submit(run_id, run, change, after)

    def _submit(
        self, run_id: str, run: _Open, change: Transition, after: Sequence[Future[Any]] = ()
    ) -> Future[datetime | None]:
        future = self._store.apply_transition(change, after)
        address, observer, ended = self._address, self._observer, self._ended
        created, started_at = run.run, run.started_at
        if change.new.terminal:
            run.settled, run.pending = future, change
            self._ending.setdefault(created.agent_id, set()).add(run_id)
        told = observer is not NO_OBSERVER

        def committed(done: Future[datetime | None]) -> None:
            error = done.exception()
            if error is None and (told or _logs(change)):  # on the writer thread
                at = done.result()  # the time the writer gave it
                stored = change if at is None else replace(change, at=at)
                observer.run_committed(created, stored, started_at)
                _log_committed(created, stored, started_at)
            if error is not None:
                address.tell(
                    TransitionFailed(
                        run_id=run_id,
                        error=str(error),
                        retryable=isinstance(error, StoreUnavailable),
                        terminal=change.new.terminal,
                        refused=isinstance(error, TransitionRefused),
                    )
                )
            elif change.new.terminal and ended.add(run_id):
                address.tell(TerminalCommitted(ended))

        future.add_done_callback(committed)
        return future

    def _settle(self, run_id: str) -> None:
        found = self._open.pop(run_id)
        if found is not None:
            ending = self._ending.get(found.run.agent_id)
            if ending is not None:
                ending.discard(run_id)
                if not ending:
                    del self._ending[found.run.agent_id]
            self._flags.forget(run_id)
            self._waiters.resolve(run_id)

    def _retry(self, failed: TransitionFailed) -> None:
        """A write failed. A terminal one is written again until it lands (a run must
        end); a start or re-queue that failed leaves the run `unsure`, read back before
        its next change, since every later write is guarded by the attempt it left."""
        run_id, error = failed.run_id, failed.error
        run = self._open.get(run_id)
        if run is None:
            return
        if self._store.book.epoch(self._store.shard_of(run.run.group_id)) is None:
            return  # its shard was lost: the runtime drops its runs (DropShards)
        if not failed.terminal:
            run.unsure = True
            log.warning("transition_not_recorded", run_id=run_id, error=error)
            return
        if run.pending is None:
            return  # taken back from the store meanwhile
        if failed.retryable:
            delay = RETRY_DELAYS[min(run.retries, len(RETRY_DELAYS) - 1)]
            run.retries += 1
            log.warning("transition_retry", run_id=run_id, error=error, delay_s=delay)
            address = self._address
            self._scheduler.call_later(delay, lambda: address.tell(RetryTransition(run_id=run_id)))
            return
        if failed.refused:
            self._refused(run_id, run, run.pending, error)
            return
        if run.pending.messages:
            # The run must end even if its history cannot be written: end it without.
            log.error(
                "run_history_dropped",
                run_id=run_id,
                error=error,
                messages=len(run.pending.messages),
            )
            self._submit(run_id, run, replace(run.pending, messages=[]))
            return
        log.warning("transition_rejected_by_store", run_id=run_id, error=error)
        self._resync(run_id, run)

    def _refused(self, run_id: str, run: _Open, change: Transition, error: str) -> None:
        """The store refused a terminal change: the stored run is not at the status and
        attempt the tracker held it at. Nothing of the change is applied (what its agent
        did is kept in its history), and the stored run is taken as the truth.

        If the tracker's own re-queue of the stored attempt never landed, it is made
        again, and the change, which belongs to the attempt that re-queue leads to, is
        written for it; a change of any other attempt stays refused.
        """
        log.warning(
            "transition_refused_by_store",
            run_id=run_id,
            status=change.new.value,
            attempt=change.expected_attempt,
            error=error,
        )
        run.pending = None
        if change.messages:
            self._store.store_messages(change.messages)
        try:
            stored = self._store.get_run(run_id)
        except RunNotFound:  # its group was deleted (or it was pruned) meanwhile
            self._gone(run_id)
            return
        except StoreUnavailable as failure:
            log.error("resync_failed", run_id=run_id, error=str(failure))
            return
        requeue_lost = (
            stored.status is RunStatus.RUNNING and stored.attempt < change.expected_attempt
        )
        self._take_stored(run, stored)
        if stored.status.terminal:
            return
        if requeue_lost:
            self._interrupt(run)
        if (
            run.attempt == change.attempt
            and change.new in ALLOWED_TRANSITIONS[run.status]
            and run_id in self._open
        ):
            log.info("transition_rewritten", run_id=run_id, attempt=run.attempt)
            self._write(
                run_id,
                run,
                change.new,
                reason=change.reason or change.new.value,
                stop_reason=change.stop_reason,
                error=change.error,
            )

    def _resync(self, run_id: str, run: _Open) -> None:
        try:
            stored = self._store.get_run(run_id)
        except RunNotFound:
            self._gone(run_id)
            return
        except StoreUnavailable as error:
            log.error("resync_failed", run_id=run_id, error=str(error))
            return
        self._take_stored(run, stored)

    def _take_stored(self, run: _Open, stored: Run) -> None:
        """Hold the run at its stored status and attempt (settled if that is terminal)."""
        run.status, run.attempt, run.pending = stored.status, stored.attempt, None
        if stored.status.terminal:
            self._settle(stored.id)

    def _count_open(self) -> dict[str, int]:
        counts = dict.fromkeys((RunStatus.CREATED.value, RunStatus.RUNNING.value), 0)
        for found in self._open.values():
            if not found.status.terminal:
                counts[found.status.value] += 1
        return counts

    # -- groups over their life -----------------------------------------------------------

    def _cancel_agent(self, agent_id: str) -> list[Future[datetime | None]]:
        """Cancel every open run of the agent (those followed, and any the store holds
        open), each recorded as a user's cancel is; the commit futures of the changes."""
        followed = [found.run.id for found in self._open.of_agent(agent_id)]
        stored = [
            run.id
            for run in self._store.list_runs(
                agent_id=agent_id, statuses=[RunStatus.CREATED, RunStatus.RUNNING]
            )
        ]
        futures = []
        for run_id in dict.fromkeys([*followed, *stored]):
            committed = self._cancel(run_id)
            if committed is not None:
                futures.append(committed)
        return futures

    def _forget_group(self, group_id: str) -> None:
        """The group's rows were deleted: its runs are no longer followed. Whatever still
        steps is asked to stop; a later write for them finds no row and changes nothing;
        callers waiting for them hear RunNotFound."""
        gone = [run_id for run_id, found in self._open.items() if found.run.group_id == group_id]
        self._forget_runs(gone)
        if gone:
            log.info("group_runs_forgotten", group_id=group_id, runs=len(gone))

    def _gone(self, run_id: str) -> None:
        """A run this tracker follows is no longer stored (its group was deleted, or a
        prune removed it, while it changed): it is forgotten, as a deleted group's are."""
        log.info("run_gone", run_id=run_id)
        self._forget_runs([run_id])

    def _forget_runs(self, run_ids: list[str]) -> None:
        """Stop following runs whose rows are gone: whatever still steps is asked to stop,
        and callers waiting for them hear RunNotFound."""
        for run_id in run_ids:
            self._flags.raise_flag(run_id)
            self._flags.forget(run_id)
            self._open.pop(run_id)
        self._waiters.fail_runs({run_id: RunNotFound(run_id) for run_id in run_ids})
        if run_ids:
            self._observer.runs_forgotten(run_ids, "deleted")

    # -- waiting --------------------------------------------------------------------------

    def _watch(self, run_ids: list[str]) -> list[Future[Run | None]]:
        unknown = [i for i in dict.fromkeys(run_ids) if i not in self._open]
        stored = self._store.get_runs(unknown) if unknown else {}
        futures: dict[str, Future[Run | None]] = {}
        for run_id in dict.fromkeys(run_ids):
            if run_id not in self._open and run_id not in stored:
                raise RunNotFound(run_id)
            if run_id not in self._open and stored[run_id].status.terminal:
                done: Future[Run | None] = Reply()
                done.set_result(stored[run_id])  # final: the caller need not read it again
                futures[run_id] = done
                continue
            if run_id not in self._open:  # open in the store but not followed: follow it
                found = stored[run_id]
                if not self._holds(found.group_id):
                    raise self._store.not_owner(found.group_id)
                self._open[run_id] = _opened(found)
            futures[run_id] = self._waiters.add(run_id)
        return [futures[run_id] for run_id in run_ids]


def _failed(future: Future[Any]) -> bool:
    return future.done() and future.exception() is not None


def _logs(change: Transition) -> bool:
    """Whether the lifecycle event of `change` is logged (info; warning if it failed)."""
    failed = change.new is RunStatus.FAILED
    return run_log.is_enabled_for(logging.WARNING if failed else logging.INFO)


def _log_committed(run: Run, change: Transition, started_at: datetime | None) -> None:
    """The lifecycle event of a committed change: a run started (with its time queued),
    re-queued, or ended (info when completed or cancelled, warning when it failed, with
    its stop reason, error and durations)."""
    if not _logs(change):
        return  # (on the writer thread: nothing more than this check when nobody listens)
    failed = change.new is RunStatus.FAILED
    bound = run_log.bind(group_id=run.group_id, agent_id=run.agent_id, run_id=run.id)
    if change.new is RunStatus.RUNNING:
        bound.info("run_started", attempt=change.attempt, queued_ms=_ms(run.created_at, change.at))
    elif change.new is RunStatus.CREATED:
        bound.info("run_requeued", attempt=change.attempt, reason=change.reason)
    else:
        level = logging.WARNING if failed else logging.INFO
        bound.log(
            level,
            "run_finished",
            status=change.new.value,
            stop_reason=None if change.stop_reason is None else change.stop_reason.value,
            error=change.error,
            attempt=change.attempt,
            duration_ms=None if started_at is None else _ms(started_at, change.at),
            total_ms=_ms(run.created_at, change.at),
        )


def _ms(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 3)
