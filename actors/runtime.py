"""The Runtime: the public face of sleeptime-runtime (SPEC 11).

Example:
    >>> with Runtime.start("sqlite:///sleeptime.db") as rt:
    ...     group = rt.create_group(primary={"kind": "scripted"},
    ...                             sleeptime=[{"kind": "memory"}], frequency=2)
    ...     result = rt.step(group.id, [MessageCreate(role="user", content="hi")])
    ...     rt.wait_for_runs(result.run_ids, timeout=30)
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import ConfigDict, Field, StrictBool, TypeAdapter

from actors._address import Address
from actors._admission import TurnAdmission, TurnTicket, permit_wait
from actors._arguments import (
    BLOCK_HISTORY_PAGE,
    BLOCK_LABEL,
    DRAIN_TIMEOUT,
    GROUP_IDS,
    REQUEST_ID,
    TURN_TIMEOUT,
    EventPage,
    GroupFilters,
    MessagePage,
    RunFilters,
    RunWait,
    StartOptions,
)
from actors._chaos import Chaos
from actors._invariants import InvariantReport, check_invariants
from actors._logging import ensure_logging
from actors._observer import NO_OBSERVER, Load, Observer
from actors._parts import ActorDirectory, RuntimeParts
from actors._pool import StepPool
from actors._protocol import (
    AddSleeptimeAgent,
    AdoptShards,
    CancelRun,
    ChangeSettings,
    CountOpenRuns,
    DeleteGroup,
    DropShards,
    ForgetGroup,
    KindRegistered,
    MessageSink,
    RemoveSleeptimeAgent,
    TakeTurn,
    TurnMode,
    WatchRuns,
)
from actors._pykka import Dispatcher
from actors._restart import RestartPolicy
from actors._scheduler import Scheduler
from actors._shards import ShardKeeper
from actors._telemetry import runtime_observer
from actors.kinds import builtin_kinds
from actors.kinds._registry import AgentKinds
from actors.rules import new_group
from actors.sdk import AgentFactory, AgentRole
from messages import (
    DEFAULT_BLOCK_LIMIT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RUN_TIMEOUT,
    MEMORY_PERSONA,
    PRUNE_KINDS,
    Agent,
    AgentNotFound,
    AgentSpec,
    Block,
    BlockCreate,
    BlockNotFound,
    Blocks,
    BlockSource,
    BlockVersion,
    Group,
    GroupFailed,
    GroupNotFound,
    GroupOwner,
    GroupSettings,
    Message,
    MessageCreate,
    NotOwner,
    PruneReport,
    PruneSettings,
    ReadOnlyRuntime,
    Run,
    RunEvent,
    RunNotFound,
    RunStatus,
    RunsTimeout,
    RuntimeBusy,
    RuntimeFailed,
    RuntimeStopped,
    ShardLost,
    StoreUnavailable,
    TurnResult,
    TurnTimeout,
)
from messages._blocks import BlockSpec, BlockValue
from messages._futures import reject, wait_all
from messages._groups import GroupCreate
from messages._ids import new_id
from messages._lifecycle import SleeptimeAgentAdd
from messages._log import get_logger
from messages._text import check_id
from persistence import DEFAULT_SHARDS, NewGroup, Store, utcnow

if TYPE_CHECKING:
    from actors.metrics import RuntimeMetrics

log = get_logger("sleeptime.runtime")

DEFAULT_URL = "sqlite:///sleeptime.db"
AGENT_DISPATCH_THREADS = 4
"""The threads the sleeptime agents' actors share: their handling never waits (steps run
on the step pool), so a few serve thousands of agents."""
DEFAULT_PASSIVATE_AFTER = 300.0
LATE_READ_S = 1.0
"""How long `wait_for_runs`, its timeout passed, waits for the store to say which runs
ended; a store that does not answer by then is treated as away."""
LATE_READ_THREADS = 2
"""Seconds a group may be told nothing before its actors give their threads back."""
DEFAULT_MAX_ACTIVE_GROUPS = 256
"""Groups with live actors at most (each holds a thread, and one per busy agent)."""
REAP_INTERVAL_S = 0.1
DEFAULT_LEASE_S = 10.0
"""How long a shard's lease lasts unrenewed (PostgreSQL): the longest a dead process's
groups wait for a new owner, and the longest pause a process survives."""
TURNS_STOP_MAX_S = 60.0
"""How long `stop` waits for the turns queued to finish (at least 5 s, or the drain time)."""
HAND_OVER_TURNS_S = 30.0
"""How long a hand-over waits for a group's queued turns to finish."""
MAX_ID_DRAWS = 1_000_000
ADOPTION_RETRY_S = 1.0
DEFAULT_MAX_TURNS_IN_FLIGHT = 10_000
"""Turns sent and not ended, at most, over the whole runtime; more wait for a permit."""
DEFAULT_MAX_QUEUED_TURNS = 1_000
"""Turns of one group admitted and not ended, at most; more raise GroupBusy."""
DEFAULT_PERMIT_TIMEOUT = 30.0
"""Seconds a turn waits for a permit to be in flight before RuntimeBusy."""
LOAD_TIMEOUT_S = 1.0
RETIRE_WAIT_S = 5.0
"""How long removing a sleeptime agent waits for a step it has under way (its run is
cancelled and its cancel flag raised) before it stops the agent's actor: the step's
messages are kept in the agent's history if it returns in that time."""
STOP_ACTORS_S = 10.0
"""How long deleting a group waits for each of its actors to stop."""
"""How long a scrape of the metrics waits for the run tracker's count of open runs."""
LOSS_RETRY_S = 0.05
"""How soon the scheduler tries again to handle a shard loss while shards are adopted."""
DEFAULT_MEMORY_PERSONA = (
    "You keep the primary agent's long-term memory. Record durable facts about the user "
    "(name, preferences, plans, circumstances) in the human block, one fact per line, and "
    "replace a fact when the user changes it. Keep blocks short; never record small talk."
)
_MESSAGES: TypeAdapter[list[MessageCreate]] = TypeAdapter(
    Annotated[list[MessageCreate], Field(min_length=1)], config=ConfigDict(title="messages")
)
_UNSET: Any = object()
DEFAULT_PRUNE_BATCH = 500
"""Rows of a kind a prune removes per transaction, by default."""
PRUNE_GROUP_PAGE = 500
DRY_RUN: TypeAdapter[bool] = TypeAdapter(StrictBool, config=ConfigDict(title="dry_run"))
_STREAM_POLL_S = 0.25
_running: weakref.WeakSet[Runtime] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class TurnCall:
    """One turn call, checked and ready to be admitted and sent; for both APIs.

    `deadline` is when its caller stops waiting (`time.monotonic()`), from its `timeout`.
    """

    group_id: str
    command: TakeTurn
    timeout: float | None
    deadline: float | None


class TurnStream(Iterator[Message]):
    """The primary agent's messages as it produces them; the turn runs to its end anyway.

    Iterate it for the messages; `result` is the turn's `TurnResult` (it waits for the
    end of the turn); `close()` stops listening without stopping the turn. With a
    `timeout`, both raise TurnTimeout once that many seconds passed since the call.
    """

    def __init__(
        self,
        sink: queue.SimpleQueue[Message | None],
        reply: Future[Any],
        group_id: str = "",
        timeout: float | None = None,
    ) -> None:
        self._sink = sink
        self._reply = reply
        self._group_id = group_id
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._ended = False
        self._closed = False

    def __next__(self) -> Message:
        if self._closed or self._ended:
            raise StopIteration
        while True:
            try:
                item = self._sink.get(timeout=min(_STREAM_POLL_S, self._remaining()))
                break
            except queue.Empty:
                # The group always ends the sink; if its actor died before taking the turn,
                # only the reply tells, so look at it now and then.
                if self._reply_ready():
                    item = None
                    break
                self._check_deadline()
        if item is None:
            self._ended = True
            self.result  # noqa: B018  # raises the turn's error, if any, to the consumer
            raise StopIteration
        return item

    def _reply_ready(self) -> bool:
        return self._reply.done()

    def _remaining(self) -> float:
        if self._deadline is None:
            return _STREAM_POLL_S
        return max(0.0, self._deadline - time.monotonic())

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            assert self._timeout is not None
            raise TurnTimeout(self._group_id, self._timeout)

    @property
    def result(self) -> TurnResult:
        """The whole turn's result, once it has ended (raises the turn's error)."""
        return _outcome(self._reply, self._group_id, self._timeout, self._deadline)

    def close(self) -> None:
        """Stop consuming; the turn still completes and is recorded."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Runtime:
    """A running sleeptime runtime over one database.

    Start it with `Runtime.start(url)`, as a context manager or not; `stop()` ends it.
    Every method is safe to call from many threads.
    """

    def __init__(
        self,
        store: Store,
        kinds: AgentKinds,
        workers: int,
        read_only: bool = False,
        chaos: Chaos | None = None,
        restart_policy: RestartPolicy | None = None,
        passivate_after: float | None = None,
        max_active_groups: int | None = None,
        max_turns_in_flight: int | None = DEFAULT_MAX_TURNS_IN_FLIGHT,
        max_queued_turns: int | None = DEFAULT_MAX_QUEUED_TURNS,
        permit_timeout: float | None = DEFAULT_PERMIT_TIMEOUT,
        observer: Observer = NO_OBSERVER,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._admission = TurnAdmission(max_turns_in_flight, max_queued_turns, permit_timeout)
        self._passivate_after = passivate_after
        self._max_active_groups = max_active_groups
        self.read_only = read_only
        self.agents = kinds
        self._stopped = threading.Event()
        # Reads made once a wait's time is up, so a stalled database cannot hold the
        # caller past it (its threads start only when first needed).
        self._late_reads = ThreadPoolExecutor(LATE_READ_THREADS, "sleeptime-late-read")
        scheduler = Scheduler()
        self._parts = RuntimeParts(
            store=store,
            kinds=kinds,
            pool=StepPool(workers),
            scheduler=scheduler,
            dispatcher=Dispatcher(AGENT_DISPATCH_THREADS),
            policy=restart_policy or RestartPolicy(),
            chaos=chaos,
            observer=observer,
        )
        observer.observe_load(self._load)
        self._directory = ActorDirectory(self._parts)
        self._keeper: ShardKeeper | None = None
        self._hand_over_timeout = 0.0  # how long a hand-over waits for open runs (s)
        self._adopting = False  # shards acquired are adopted by the tracker (once it runs)
        # Shard losses found by writes, not handled yet; and the order of shard changes:
        # a loss is always handled before the same shard, taken again, is adopted.
        self._losses: dict[int, int] = {}
        self._losses_lock = threading.Lock()  # (taken on the writer's thread: never waits long)
        self._shard_changes = threading.RLock()

    @classmethod
    def start(
        cls,
        url: str = DEFAULT_URL,
        *,
        kinds: Mapping[str, AgentFactory] | None = None,
        workers: int = 32,
        read_only: bool = False,
        auto_upgrade: bool = True,
        chaos: Chaos | None = None,
        restart_policy: RestartPolicy | None = None,
        passivate_after: float | None = DEFAULT_PASSIVATE_AFTER,
        max_active_groups: int | None = DEFAULT_MAX_ACTIVE_GROUPS,
        shards: int = DEFAULT_SHARDS,
        lease_s: float = DEFAULT_LEASE_S,
        address: str | None = None,
        max_turns_in_flight: int | None = DEFAULT_MAX_TURNS_IN_FLIGHT,
        max_queued_turns: int | None = DEFAULT_MAX_QUEUED_TURNS,
        permit_timeout: float | None = DEFAULT_PERMIT_TIMEOUT,
        metrics: bool | Any = False,
        tracing: bool | Any = True,
    ) -> Runtime:
        """Open (or create) the database at `url`, recover its open runs, and start.

        `kinds` are registered, next to the built-in ones, before recovery starts any run.
        `workers` is the number of threads agents step on. With `read_only=True` the
        database is only read (for inspection): no recovery, no run executes, and every
        call that would change something raises ReadOnlyRuntime.

        One runtime owns a SQLite file at a time: a second start raises DatabaseInUse.
        On PostgreSQL several runtimes share the database (SPEC 15): the groups fall in
        `shards` virtual shards (fixed when the database is first served), and each
        process serves the groups of the shards it holds leases on, renewed every
        `lease_s / 3` seconds; a process whose lease lapsed (paused, cut off) loses its
        shards to the others after `lease_s`. Joining processes take a fair share; a
        stopping one hands its shards over. A call about a group served elsewhere raises
        NotOwner naming the owner (and the `address` it advertised). `start` returns once
        this process holds its share (after a crash, once the dead process's leases
        expired), or after about `1.5 * lease_s` in any case.

        The schema is migrated to this code's revision on start; with `auto_upgrade=False` an
        older database is refused (SchemaMismatch) instead, and `Runtime.migrate(url)`
        upgrades it.

        Crashed actors are restarted by their supervisor under `restart_policy` (more
        crashes than it allows fail the group). `chaos` injects crashes and agent
        failures, for tests and simulations.

        Passivation: a group's actors give their threads back when the group was told
        nothing for `passivate_after` seconds, or when more than `max_active_groups`
        groups are active (the least recently used go first); a sleeptime agent follows
        its group once its runs are done. The next turn starts them again from the
        store. None turns either limit off.

        Back-pressure: at most `max_turns_in_flight` turns (of every group, from either
        API) are sent and not ended at once; a turn past it waits for one to end, up to
        `permit_timeout` seconds (or its own `timeout`), then raises RuntimeBusy, nothing
        sent. A group takes at most `max_queued_turns` turns queued (waiting or in
        flight); one more raises GroupBusy at once, nothing sent. None turns a bound off.

        Observability (README, "Running it in a service"): the runtime logs through the
        standard `logging` module (loggers under `sleeptime`). `metrics=True` gives it
        Prometheus metrics in a registry of its own (`rt.metrics`; a prometheus
        `CollectorRegistry` instead of True registers them there); it needs the
        `metrics` extra. `tracing`: True traces through the OpenTelemetry tracer provider
        the host set before this call, if any (nothing is traced, at no cost, if none);
        a `TracerProvider` traces through that one; False never traces.

        An option of the wrong type or out of range (`workers` < 1, `passivate_after`
        <= 0, a kind name that is not text) raises pydantic's ValidationError.
        """
        options = StartOptions(
            url=url,
            kinds=kinds,
            workers=workers,
            read_only=read_only,
            auto_upgrade=auto_upgrade,
            chaos=chaos,
            restart_policy=restart_policy,
            passivate_after=passivate_after,
            max_active_groups=max_active_groups,
            shards=shards,
            lease_s=lease_s,
            address=address,
            max_turns_in_flight=max_turns_in_flight,
            max_queued_turns=max_queued_turns,
            permit_timeout=permit_timeout,
            metrics=metrics,
            tracing=tracing,
        )
        ensure_logging()
        observer, runtime_metrics = runtime_observer(options.metrics, options.tracing)
        try:
            # Every step thread may read at once, plus the groups and the callers.
            store = Store(
                options.url,
                read_only=options.read_only,
                auto_upgrade=options.auto_upgrade,
                readers=options.workers + 8,
                shards=options.shards,
                lease_s=options.lease_s,
                address=options.address,
                observer=observer,
            )
        except BaseException:
            observer.close()  # its metrics leave a registry of the host's as they found it
            raise
        try:
            registry = AgentKinds()
            for name, factory in {**builtin_kinds(), **(options.kinds or {})}.items():
                registry.register(name, factory)
            runtime = cls(
                store,
                registry,
                options.workers,
                options.read_only,
                options.chaos,
                options.restart_policy,
                options.passivate_after,
                options.max_active_groups,
                options.max_turns_in_flight,
                options.max_queued_turns,
                options.permit_timeout,
                observer,
                runtime_metrics,
            )
        except BaseException:
            store.close()
            observer.close()
            raise
        try:
            if options.read_only:
                runtime._directory.start_tracker()
            else:
                # On PostgreSQL the first share is taken before the tracker starts, so
                # its first incarnation recovers it as it recovers a SQLite file's runs.
                runtime._join(settle_s=1.5 * options.lease_s + 1.0)
                runtime._recover()
                if runtime._keeper is not None:
                    runtime._adopting = True
                    runtime._keeper.keep()
        except BaseException:
            runtime.stop(drain_timeout=0)  # what was started stops, the store is closed
            raise
        _running.add(runtime)
        log.info("runtime_started", url=store.url)
        return runtime

    @staticmethod
    def migrate(url: str) -> tuple[str | None, str]:
        """Upgrade the database at `url` to this code's schema; return (from, to) revisions."""
        ensure_logging()
        return Store.migrate(url)

    def _recover(self) -> None:
        """Start the tracker, which re-queues the runs an earlier process left `running`
        (attempt + 1, at-least-once) or fails them past `max_attempts`, as after any crash
        (recovery writes no run status of its own); then start the sleeptime agents of
        the open runs, which take them from the tracker."""
        recovered: Future[None] = Future()
        self._directory.start_tracker(recovered)
        recovered.result()  # the tracker re-queued (or failed) what was left running
        self.agents.on_register(lambda kind: self._directory.broadcast(KindRegistered(kind=kind)))
        book = self._store.book  # on PostgreSQL, shards come later (`_acquired`)
        open_runs = [r for r in self._store.open_runs() if book.serves(book.shard_of(r.group_id))]
        for agent_id in dict.fromkeys(run.agent_id for run in open_runs):
            try:
                self._directory.agent(agent_id)
            except AgentNotFound:  # (a removed agent has no open run; never started again)
                log.warning("agent_not_started", agent_id=agent_id)
        if self._passivate_after is not None or self._max_active_groups is not None:
            self._parts.scheduler.call_later(REAP_INTERVAL_S, self._reap)

    # -- shards (SPEC 15) -----------------------------------------------------------------

    def _join(self, settle_s: float) -> None:
        """On PostgreSQL: join the processes sharing the database and take a share."""
        leases = self._store.leases
        if leases is None:
            return  # a SQLite file: this process holds every shard
        self._store.book.on_lost = self._lost_by_write
        # A rebalancing hand-over runs on the keeper's thread: it must not hold back the
        # renewal of the other leases.
        self._hand_over_timeout = leases.lease_s / 4
        self._keeper = ShardKeeper(
            leases,
            self._store.book,
            on_acquired=self._acquired,
            on_lost=self._lost,
            on_hand_over=self._hand_over,
            busy=self._busy_shards,
        )
        self._keeper.start(settle_s=settle_s)

    def _busy_shards(self) -> set[int]:
        """The shards with a run open here (the keeper hands the others over first): one
        running, or one queued, which its agent may start while the hand-over waits."""
        return {self._store.shard_of(r.group_id) for r in self._store.open_runs()}

    def _acquired(self, shards: Mapping[int, int]) -> None:
        """Shards came to this process: recover their runs as a restart would (those
        left running are re-queued or failed), then start the agents that have runs.

        A loss of the same shards that a write found and that is not handled yet is
        handled first: handled after, it would drop the runs adopted now, and nothing
        would start them again while this process holds the shard."""
        with self._shard_changes:
            self._handle_losses()
            self._adopt(shards)

    def _adopt(self, shards: Mapping[int, int]) -> None:
        self._store.shards_moved()
        if not self._adopting:
            return  # starting: the tracker's first incarnation loads every held shard
        try:
            agent_ids = self._parts.tracker.ask(AdoptShards(shards=frozenset(shards)))
        except RuntimeFailed:
            return  # every later call says why
        except Exception as error:  # the store is away, say: adopt them a little later
            log.warning("shard_adoption_postponed", shards=len(shards), error=repr(error))
            still = {s: e for s, e in shards.items() if self._store.book.epoch(s) == e}
            if still and not self._stopped.is_set():
                retry = partial(self._acquired, still)
                self._parts.scheduler.call_later(ADOPTION_RETRY_S, retry)
            return
        for agent_id in agent_ids:
            try:
                self._directory.agent(agent_id)
            except Exception as error:  # its runs wait for the agent's next start
                log.error("agent_not_started", agent_id=agent_id, error=repr(error))

    def _lost(self, shards: Mapping[int, int]) -> None:
        """Shards were taken over (this process was away too long): stop their actors
        without waiting, forget their runs; their new owner carries everything on."""
        with self._shard_changes:
            self._forget_shards(shards)

    def _forget_shards(self, shards: Mapping[int, int]) -> None:
        chosen = frozenset(shards)
        in_lost = self._in_shards(chosen)
        self._directory.stop_groups(
            in_lost, lambda g: ShardLost(self._store.shard_of(g)), timeout=None
        )
        if self._parts.failure is None:
            self._parts.tracker.tell(DropShards(shards=chosen, lost=True))
        self._store.shards_moved()

    def _lost_by_write(self, shards: dict[int, int]) -> None:
        """A write found shards lost (told from the writer thread): handle it elsewhere,
        soon, and in any case before any of them is adopted again (`_acquired`)."""
        with self._losses_lock:
            self._losses.update(shards)
        self._parts.scheduler.call_later(0.0, self._handle_losses_soon)

    def _handle_losses_soon(self) -> None:
        """On the scheduler's thread, which must not wait for an adoption under way (it
        asks the tracker): if one is, try again a moment later (it handles what it finds
        pending first)."""
        if not self._shard_changes.acquire(blocking=False):
            self._parts.scheduler.call_later(LOSS_RETRY_S, self._handle_losses_soon)
            return
        try:
            self._handle_losses()
        finally:
            self._shard_changes.release()

    def _handle_losses(self) -> None:
        """Forget the shards writes found lost (with `_shard_changes` held)."""
        with self._losses_lock:
            losses, self._losses = self._losses, {}
        if losses:
            self._forget_shards(losses)

    def _hand_over(self, shards: Mapping[int, int]) -> None:
        """Give shards to another process cleanly: no new turns (NotOwner), queued turns
        finish, open runs get a bounded time to end, then the actors stop."""
        chosen = frozenset(shards)
        in_shards = self._in_shards(chosen)

        def moved(group_id: str) -> Exception:  # between owners: try again shortly
            return NotOwner(group_id, self._store.shard_of(group_id))

        self._directory.stop_groups(in_shards, moved, timeout=HAND_OVER_TURNS_S, kinds=("group:",))
        timeout = self._hand_over_timeout
        working = self._parts.failure is None  # else no tracker answers any more
        if timeout > 0 and working:
            try:
                open_ids = [r.id for r in self._store.open_runs() if in_shards(r.group_id)]
                if open_ids:
                    futures = self._parts.tracker.ask(WatchRuns(run_ids=open_ids))
                    not_done = wait_all(futures, timeout=timeout)
                    if not_done:
                        log.warning("hand_over_runs_left", runs=len(not_done))
            except Exception as error:  # the runs stay open, for the next owner
                log.warning("hand_over_wait_skipped", error=str(error))
        self._directory.stop_groups(in_shards, moved, timeout=HAND_OVER_TURNS_S)
        if working:
            try:
                self._parts.tracker.ask(DropShards(shards=chosen, lost=False))
            except Exception as error:
                log.warning("hand_over_drop_failed", error=str(error))
        self._store.shards_moved()

    def _in_shards(self, shards: frozenset[int]) -> Callable[[str], bool]:
        shard_of = self._store.shard_of
        return lambda group_id: shard_of(group_id) in shards

    def owner_of(self, group_id: str) -> GroupOwner:
        """Who serves the group: its shard, the process holding the shard's lease (pid,
        host, since when; None while the shard is between owners), the address it
        advertised, the lease's epoch and expiry, and whether it is this process."""
        group_id = check_id(group_id, "group_id")
        self._check()
        found = self._store.owner_of(group_id)
        holder = None if found.member is None or found.expired else found.holder
        return GroupOwner(
            group_id=group_id,
            shard=found.shard,
            owner=holder,
            address=None if holder is None else found.address,
            epoch=found.epoch,
            expires_at=found.expires_at,
            # (A read-only runtime serves nothing, whatever its book shows to its reads.)
            here=not self.read_only and self._store.serves(group_id),
        )

    def _reap(self) -> None:
        """Passivate idle groups and agents (on the scheduler thread, every interval)."""
        if self._stopped.is_set():
            return
        try:
            self._parts.supervisor.reap(
                self._passivate_after, self._max_active_groups, prefix="group:"
            )
        finally:
            self._parts.scheduler.call_later(REAP_INTERVAL_S, self._reap)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish queued turns, wait up to `drain_timeout` s for open runs, then stop.

        Runs still open after that stay stored and are re-queued by the next start.
        A `drain_timeout` that is not a number of seconds >= 0 raises ValidationError
        (before anything stops).
        """
        drain_timeout = DRAIN_TIMEOUT.validate_python(drain_timeout)
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._keeper is not None:
            # Every shard is handed over: queued turns finish, runs get the drain time.
            self._hand_over_timeout = drain_timeout
            self._keeper.stop()
        self._directory.close("group:")  # a turn sent from now on is refused, not started
        # The turns queued finish (a hung primary step holds up the stop that long only).
        self._directory.stop("group:", timeout=min(TURNS_STOP_MAX_S, max(drain_timeout, 5.0)))
        # A read-only runtime runs nothing; a shard keeper drained as it handed over.
        if drain_timeout > 0 and not self.read_only and self._keeper is None:
            self._drain(drain_timeout)
        self._directory.close("agent:")
        self._directory.stop("agent:", timeout=5.0)
        self._parts.supervisor.stop("tracker", RuntimeStopped(), timeout=10.0)
        self._parts.pool.close()
        self._parts.dispatcher.close()
        self._parts.scheduler.close()
        self._late_reads.shutdown(wait=False, cancel_futures=True)
        self._store.close()
        self._parts.observer.close()
        _running.discard(self)
        log.info("runtime_stopped")

    def _drain(self, timeout: float) -> None:
        try:
            open_ids = [run.id for run in self._store.open_runs()]
            futures = self._parts.tracker.ask(WatchRuns(run_ids=open_ids), timeout=timeout)
        except Exception as error:
            log.warning("drain_skipped", error=str(error))
            return
        not_done = wait_all(futures, timeout=timeout)
        if not_done:
            log.warning("drain_timed_out", open_runs=len(not_done))

    def _check(self, action: str | None = None) -> None:
        if self._stopped.is_set():
            raise RuntimeStopped()
        if action is not None and self._parts.failure is not None:
            raise RuntimeFailed(self._parts.failure)  # its tracker escalated: no more work
        if action is not None and self.read_only:
            raise ReadOnlyRuntime(action)

    # -- groups ---------------------------------------------------------------------------

    def create_group(
        self,
        primary: AgentSpec | Mapping[str, Any],
        sleeptime: Sequence[AgentSpec | Mapping[str, Any]],
        frequency: int | None = None,
        blocks: Mapping[str, str | BlockCreate | Mapping[str, Any]] | None = None,
        preamble: str | None = None,
        transcript_max_messages: int | None = None,
        run_timeout: float = DEFAULT_RUN_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Group:
        """Create a group: a primary agent, its sleeptime agents, shared memory blocks.

        Raises pydantic's ValidationError for malformed arguments (a negative frequency,
        an unknown config key, text that cannot be stored), UnknownAgentKind for a kind
        nobody registered, AgentRoleError for a kind in a role it cannot play.
        """
        self._check("create a group")
        spec = GroupCreate.model_validate(
            {
                "primary": primary,
                "sleeptime": sleeptime,
                "frequency": frequency,
                "blocks": blocks,
                "preamble": preamble,
                "transcript_max_messages": transcript_max_messages,
                "run_timeout": run_timeout,
                "max_attempts": max_attempts,
            }
        )
        group_id, now = self._new_group_id(), utcnow()
        agents = [self._agent(spec.primary, group_id, "primary", now)]
        personas = []
        for index, sleeper in enumerate(spec.sleeptime):
            # GroupCreate checked that a given persona is text.
            persona = sleeper.config.get(MEMORY_PERSONA, DEFAULT_MEMORY_PERSONA)
            config = {k: v for k, v in sleeper.config.items() if k != MEMORY_PERSONA}
            agents.append(
                self._agent(
                    sleeper.model_copy(update={"config": config}), group_id, "sleeptime", now, index
                )
            )
            personas.append(persona)
        stored_blocks = [
            Block(
                id=new_id("block"),
                group_id=group_id,
                label=label,
                value=b.value,
                limit=b.limit,
                read_only=b.read_only,
                description=b.description,
            )
            for label, b in spec.block_specs().items()
        ]
        stored_blocks += [
            _persona_block(agent, persona)
            for agent, persona in zip(agents[1:], personas, strict=True)
        ]
        group = new_group(group_id, agents[0].id, [a.id for a in agents[1:]], spec.settings(), now)
        # For the blocks' histories: a memory_persona nobody gave is the runtime's.
        defaults: dict[str, BlockSource] = {
            block.id: "runtime"
            for block, sleeper in zip(stored_blocks[-len(personas) :], spec.sleeptime, strict=True)
            if MEMORY_PERSONA not in sleeper.config
        }
        self._store.create_group(
            NewGroup(group=group, agents=agents, blocks=stored_blocks, block_sources=defaults)
        ).result()
        log.info(
            "group_created",
            group_id=group_id,
            sleeptime_agents=len(agents) - 1,
            frequency=spec.frequency,
        )
        return group

    def _new_group_id(self) -> str:
        """A fresh group id in a shard this process serves (SPEC 15: a group is created
        where it will be served); NotOwner if it serves none right now."""
        if not self._store.book.held():
            raise NotOwner("(new group)", -1)
        for _ in range(MAX_ID_DRAWS):
            group_id = new_id("group")
            if self._store.serves(group_id):
                return group_id
        raise NotOwner("(new group)", -1)

    def _agent(
        self, spec: AgentSpec, group_id: str, role: AgentRole, now: Any, index: int = 0
    ) -> Agent:
        self.agents.check_role(spec.kind, role)
        self.agents.build(spec.kind, spec.config)  # a bad kind or config fails here, clearly
        name = spec.name or (
            f"{spec.kind} primary" if role == "primary" else f"{spec.kind} sleeptime {index + 1}"
        )
        return Agent(
            id=new_id("agent"),
            group_id=group_id,
            role=role,
            name=name,
            kind=spec.kind,
            config=spec.config,
            created_at=now,
        )

    def get_group(self, group_id: str) -> Group:
        """The group as stored: frequency, counter, cursor, turns, agent ids, settings."""
        group_id = check_id(group_id, "group_id")
        self._check()
        return self._store.get_group(group_id)

    def list_groups(
        self,
        *,
        statuses: Sequence[str] | None = None,
        primary_kind: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Group]:
        """Groups oldest first (by creation, then id), every one or a page of them.

        `statuses` keeps the groups with those statuses ("active", "failed");
        `primary_kind` those whose primary agent is of that kind. A page: `limit` groups
        after the group `after` (the last one of the previous page; GroupNotFound if no
        group has that id). Paging is by key, not offset: a group created meanwhile
        comes after the ones listed, none is listed twice.
        """
        filters = GroupFilters(
            statuses=statuses, primary_kind=primary_kind, limit=limit, after=after
        )
        self._check()
        return self._store.list_groups(
            statuses=filters.statuses,
            primary_kind=filters.primary_kind,
            limit=filters.limit,
            after=filters.after,
        )

    def count_groups(self) -> int:
        """How many groups the database holds (of every process sharing it), failed
        ones included."""
        self._check()
        return self._store.count_groups()

    def update_group(
        self,
        group_id: str,
        *,
        frequency: int | None = _UNSET,
        preamble: str | None = _UNSET,
        transcript_max_messages: int | None = _UNSET,
        run_timeout: float = _UNSET,
        max_attempts: int = _UNSET,
    ) -> Group:
        """Change settings between turns; the counter is kept (as in Letta)."""
        group_id = check_id(group_id, "group_id")
        self._check("update a group")
        changes = {
            name: value
            for name, value in {
                "frequency": frequency,
                "preamble": preamble,
                "transcript_max_messages": transcript_max_messages,
                "run_timeout": run_timeout,
                "max_attempts": max_attempts,
            }.items()
            if value is not _UNSET
        }
        current = self._store.get_group(group_id)
        settings = GroupSettings.model_validate({**current.settings().model_dump(), **changes})
        if not changes:
            return current
        valid = {name: getattr(settings, name) for name in changes}
        updated: Group = self._ask_group(group_id, ChangeSettings(changes=valid))
        return updated

    # -- groups over their life -----------------------------------------------------------

    def delete_group(self, group_id: str) -> None:
        """Delete a group and everything stored of it, for good.

        Turns sent before this call are taken first; turns queued behind it, and every
        later call naming the group, raise GroupNotFound (RunNotFound for its runs,
        AgentNotFound for its agents). Its agents, their messages, its runs and their
        events, its blocks and their versions, its turn requests and prune records are
        removed in one transaction, through the group's owner; nothing is written
        before it, so a crash (even kill -9) leaves the group whole or gone. Then its
        sleeptime agents still stepping are asked to stop (their cancel flag), callers
        waiting for its runs get RunNotFound, and its actors stop; a run that ends
        later writes nothing (logged). Raises GroupNotFound if there is no such group
        (or it was deleted already), NotOwner if another process serves it.
        """
        group_id = check_id(group_id, "group_id")
        self._check("delete a group")
        try:
            try:
                self._ask_group(group_id, DeleteGroup())
            except GroupFailed:
                # Escalated in this process: its actor refuses everything, so no turn
                # can race the delete; the store removes it directly.
                self._store.delete_group(group_id).result()
        except GroupNotFound:
            self._forget_group(group_id)  # whatever this process still holds of it
            raise
        self._forget_group(group_id)
        log.info("group_deleted", group_id=group_id)

    def _forget_group(self, group_id: str) -> None:
        """After a delete: the tracker drops the group's runs (their cancel flags raised,
        their waiters told RunNotFound), then the group's actors stop; a message told to
        them from then on is refused with GroupNotFound."""
        if self._parts.failure is None:
            try:
                self._parts.tracker.ask(ForgetGroup(group_id=group_id), timeout=STOP_ACTORS_S)
            except Exception as error:  # its runs' late writes are refused by the store
                log.warning("group_runs_not_forgotten", group_id=group_id, error=repr(error))
        self._directory.stop_groups(lambda g: g == group_id, GroupNotFound, timeout=STOP_ACTORS_S)

    def add_sleeptime_agent(
        self,
        group_id: str,
        spec: AgentSpec | Mapping[str, Any],
        *,
        backfill: bool = False,
        backfill_window: int | None = None,
    ) -> Agent:
        """Add a sleeptime agent to a live group, between two turns; returns it as stored.

        It joins at the cursor (`added_turn` is the group's turns, `coverage_from_seq`
        the cursor + 1) and takes part in every later firing, after the agents already
        there. It gets its own `memory_persona` block (`memory_persona` in its config,
        else the default text), as `create_group` gives one.

        With `backfill=True` it catches up on what was said before it existed: its
        coverage starts at the first primary message still stored, and runs over
        [that message, cursor] in consecutive windows of at most `backfill_window`
        messages (default: the group's `transcript_max_messages`, else 50) are created
        with it, in the same transaction, marked `{"backfill": True}` in their metadata,
        and executed one at a time, in order, before its runs of later turns.

        Raises pydantic's ValidationError for a malformed spec or `backfill_window` < 1,
        UnknownAgentKind / AgentRoleError for a kind it cannot be, GroupNotFound,
        GroupFailed, NotOwner.
        """
        return self._add_sleeptime_agent(group_id, spec, backfill, backfill_window)

    def _add_sleeptime_agent(
        self,
        group_id: str,
        spec: AgentSpec | Mapping[str, Any],
        backfill: bool,
        backfill_window: int | None,
        agent_id: str | None = None,
    ) -> Agent:
        """`add_sleeptime_agent`; `agent_id` (a Ray client's, made before its first try)
        makes a retry answer with the agent the first try added."""
        group_id = check_id(group_id, "group_id")
        self._check("add a sleeptime agent")
        asked = SleeptimeAgentAdd.model_validate(
            {"spec": spec, "backfill": backfill, "backfill_window": backfill_window}
        )
        given = MEMORY_PERSONA in asked.spec.config
        persona = asked.spec.config.get(MEMORY_PERSONA, DEFAULT_MEMORY_PERSONA)
        config = {k: v for k, v in asked.spec.config.items() if k != MEMORY_PERSONA}
        members = self._store.group_agents(group_id)  # GroupNotFound
        agent = self._agent(
            asked.spec.model_copy(update={"config": config}),
            group_id,
            "sleeptime",
            utcnow(),
            len(members) - 1,
        )
        if agent_id is not None:
            agent = agent.model_copy(update={"id": check_id(agent_id, "agent_id")})
        command = AddSleeptimeAgent(
            agent=agent,
            persona=_persona_block(agent, persona),
            persona_source="application" if given else "runtime",
            backfill=asked.backfill,
            backfill_window=asked.backfill_window,
        )
        added: Agent = self._ask_group(group_id, command)
        return added

    def remove_sleeptime_agent(self, group_id: str, agent_id: str) -> Agent:
        """Take a sleeptime agent out of a live group, between two turns; returns it as
        stored (`removed_at`, `removed_turn` set).

        Its open runs are cancelled first (recorded, as `cancel_run` does), then it
        leaves: it no longer appears in `Group.sleeptime_agent_ids` and takes no part in
        later firings (a group with none left still takes turns and moves its cursor).
        Its actor stops once a step it had under way returned (up to a few seconds).
        Its row, runs, messages and own blocks stay readable. An agent removed already
        is returned as it is. Raises AgentNotInGroup for the group's primary agent or
        an agent of another group, AgentNotFound, GroupNotFound, GroupFailed, NotOwner.
        """
        group_id = check_id(group_id, "group_id")
        agent_id = check_id(agent_id, "agent_id")
        self._check("remove a sleeptime agent")
        removed: Agent = self._ask_group(group_id, RemoveSleeptimeAgent(agent_id=agent_id))
        self._retire_agent(agent_id)
        return removed

    def _retire_agent(self, agent_id: str) -> None:
        """Stop a removed agent's actor, once a step it had under way returned (for up
        to RETIRE_WAIT_S): its late result then reaches the tracker, which refuses it
        (the run was cancelled) and keeps its messages in the agent's history."""
        executing = self._parts.steps.executing(agent_id)
        if executing is not None:
            returned = threading.Event()
            # Called after the agent's own callback, which tells the actor the step ended.
            executing[0].add_done_callback(lambda _: returned.set())
            if not returned.wait(RETIRE_WAIT_S):
                log.warning("removed_agent_step_abandoned", agent_id=agent_id)
        self._parts.supervisor.stop(f"agent:{agent_id}", AgentNotFound(agent_id), STOP_ACTORS_S)

    # -- turns ----------------------------------------------------------------------------

    def step(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """Run the primary agent on `messages` and apply the sleeptime rules (SPEC 4-7).

        Raises PrimaryAgentError (with the recorded turn as `.result`) if the agent failed,
        and TurnTimeout if the turn has not ended after `timeout` seconds (the turn itself
        still completes and is recorded).

        `request_id` makes the call safe to retry: a call with the request id of a turn
        this group already recorded takes no turn and records nothing; it returns that
        first call's result (or raises its PrimaryAgentError, carrying that result), even
        after a crash between its commit and its reply, whatever `messages` it is given.
        """
        return self._turn(group_id, messages, "step", timeout, request_id)

    def record_turn(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """Store one already-produced turn (input and output) and apply the sleeptime rules.

        Raises TurnTimeout if it is not recorded after `timeout` seconds (it still is, later).
        With `request_id`, a retry returns the first call's result and records nothing
        (see `step`).
        """
        return self._turn(group_id, messages, "record", timeout, request_id)

    def stream(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnStream:
        """Like `step`, yielding the output messages as the primary agent produces them.

        With `timeout`, iterating (or reading `.result`) raises TurnTimeout once that many
        seconds passed since this call; the turn itself still completes and is recorded.
        With `request_id`, a retry yields the first call's messages, then has its result
        (see `step`).
        """
        sink: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        call = self._prepare_turn(group_id, messages, "stream", timeout, sink, request_id)
        reply, _ = self._submit_turn(call)
        return TurnStream(sink, reply, call.group_id, call.timeout)

    def _turn(
        self,
        group_id: str,
        messages: Sequence[Any],
        mode: TurnMode,
        timeout: float | None,
        request_id: str | None,
    ) -> TurnResult:
        call = self._prepare_turn(group_id, messages, mode, timeout, request_id=request_id)
        # With no timeout this thread waits for the turn however long it takes: it may as
        # well run it, if the group's actor is idle. Not on the main thread, where a
        # signal (Ctrl-C) could stop the turn half done instead of only its caller's wait.
        here = (
            call.timeout is None
            and not self._crowded()
            and threading.current_thread() is not threading.main_thread()
        )
        reply, ticket = self._submit_turn(call, here=here)
        try:
            return _outcome(reply, call.group_id, call.timeout, call.deadline)
        finally:
            # Free its place now, not only in the reply's callback, which may run after
            # this thread woke: this thread's next turn must find the group's place free.
            if reply.done():
                ticket.end()

    # The steps of a turn call, shared by this API and the asyncio one (`AsyncRuntime`),
    # which waits for its permit on its loop and sends from a thread that may block.

    def _prepare_turn(
        self,
        group_id: str,
        messages: Sequence[Any],
        mode: TurnMode,
        timeout: float | None,
        sink: MessageSink | None = None,
        request_id: str | None = None,
        new_request: bool = False,
    ) -> TurnCall:
        """Check a turn call (ValidationError, RuntimeStopped, ...); nothing is sent.

        Both APIs build their turns here: an argument a turn call grows is checked here,
        once (and added to the signatures of both APIs' `step`, `record_turn`, `stream`).
        `new_request` (for a Ray shard host, whose client made the `request_id` just now
        and sends it for the first time) skips looking the id up; it is still recorded."""
        group_id = check_id(group_id, "group_id")
        request_id = REQUEST_ID.validate_python(request_id)
        self._check("take a turn")
        limit = TURN_TIMEOUT.validate_python(timeout)
        command = TakeTurn(
            input=_MESSAGES.validate_python(messages),
            mode=mode,
            sink=sink,
            request_id=request_id,
            new_request=new_request and request_id is not None,
            parent=self._parts.observer.caller_context(),
        )
        deadline = None if limit is None else time.monotonic() + limit
        return TurnCall(group_id, command, limit, deadline)

    def _crowded(self) -> bool:
        """Whether more groups are active than `max_active_groups`: their turns then go
        through their actors (a caller running its group's turns one after the other
        leaves the group no moment to be passivated in)."""
        cap = self._max_active_groups
        return cap is not None and self._parts.supervisor.active_of_kind("group") > cap

    def _submit_turn(
        self, call: TurnCall, here: bool = False
    ) -> tuple[Future[TurnResult], TurnTicket]:
        """Admit the turn (GroupBusy), wait in this thread for a permit (RuntimeBusy past
        `permit_timeout`), and send it (`here`: see `_send_turn`)."""
        ticket = self._admission.admit(call.group_id)
        if not ticket.granted:
            permit = threading.Event()
            ticket.when_granted(permit.set)
            waited = permit_wait(self._admission.permit_timeout, call.deadline)
            if not permit.wait(waited):
                ticket.withdraw()  # frees the permit too, if it came just now
                assert self._admission.max_in_flight is not None
                raise RuntimeBusy(self._admission.max_in_flight, waited or 0.0)
        return self._send_turn(call, ticket, here=here), ticket

    def _send_turn(
        self,
        call: TurnCall,
        ticket: TurnTicket,
        address: Address | None = None,
        here: bool = False,
    ) -> Future[TurnResult]:
        """Send an admitted turn to its group's actor; its place and permit are freed when
        its reply is done. Without the group's running `address`, this may read the store
        and start the actor (GroupNotFound): it blocks.

        `here`: the caller will wait for the reply whatever it takes; if the actor is idle
        and no other turn of the group is admitted, the turn is run now on this thread,
        by the actor's own code under its lock (`Address.serve_here`), and the reply is
        done on return. Turns stay in the order their callers were admitted: one that
        finds another of its group admitted before it is told, behind it."""
        reply = call.command.reply
        if not ticket.send():
            raise RuntimeError("a turn withdrawn from admission cannot be sent")
        reply.add_done_callback(ticket.end)
        try:
            target = address or self._directory.group(call.group_id)
            alone = here and self._admission.queued(call.group_id) == 1
            if alone and target.serve_here(call.command):
                return reply
            target.tell(call.command)
        except BaseException as error:
            reject(reply, error)  # which ends the ticket
            raise
        return reply

    def _running_group(self, group_id: str) -> Address | None:
        """The group's address if its actor is running: telling it then blocks nothing.
        None if it must be started (or restarted) first."""
        address = self._parts.supervisor.child(f"group:{group_id}")
        return address if address is not None and address.active else None

    def _send_group(self, group_id: str, command: Any) -> Future[Any]:
        """Tell the group's actor; its reply future resolves when the command is done."""
        reply: Future[Any] = command.reply
        self._directory.group(group_id).tell(command)
        return reply

    def _ask_group(self, group_id: str, command: Any) -> Any:
        return self._send_group(group_id, command).result()

    # -- runs -----------------------------------------------------------------------------

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float | None = None) -> list[Run]:
        """Wait until every run is terminal and return them, in the order asked.

        Raises RunsTimeout naming the runs still open when `timeout` (seconds) passes.
        """
        asked = RunWait(run_ids=run_ids, timeout=timeout)
        ids, timeout = asked.run_ids, asked.timeout
        self._check()
        if not ids:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        watched = self._watch_runs(ids)
        # The timeout holds even if the tracker cannot answer (it is restarting, busy, or
        # the timeout is 0): the store then says which runs are still open.
        if wait_all([watched], timeout=timeout):
            return self._ended_by_now(ids, timeout, ids)
        futures = watched.result()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if wait_all(futures, timeout=remaining):
            left = [i for i, future in zip(ids, futures, strict=True) if not future.done()]
            return self._ended_by_now(ids, timeout, left)
        return self._ended(ids, futures)

    def _ended(self, run_ids: list[str], futures: list[Future[Run | None]]) -> list[Run]:
        """The runs, every one of them terminal (their `futures` all done): as the tracker
        read them, if it did (terminal runs never change), else read from the store."""
        ended = {}
        for run_id, future in zip(run_ids, futures, strict=True):
            run = future.result()  # RuntimeFailed if the tracker escalated while we waited
            if run is not None:
                ended[run_id] = run
        unread = [run_id for run_id in run_ids if run_id not in ended]
        if unread:
            ended.update(zip(unread, self._stored_runs(unread), strict=True))
        return [ended[run_id] for run_id in run_ids]

    def _watch_runs(self, run_ids: list[str]) -> Future[list[Future[Run | None]]]:
        """Ask the tracker for one future per run, each done once its run is terminal."""
        command = WatchRuns(run_ids=run_ids)
        self._parts.tracker.tell(command)
        return command.reply

    def _ended_by_now(
        self, run_ids: list[str], timeout: float | None, unsure: list[str]
    ) -> list[Run]:
        """The runs as stored, once `wait_for_runs`'s timeout passed: all of them if each
        is terminal by now; else RunsTimeout naming those still open (RunNotFound for one
        not stored). Read from the store, not from the tracker, whose answer may be late;
        while the store is away, RunsTimeout names the runs not known to have ended
        (`unsure`), as a timeout does, and so it does when the store has not answered
        within `LATE_READ_S` (a database that hangs, say, instead of refusing)."""
        late = RunsTimeout(list(dict.fromkeys(unsure)), timeout or 0.0)
        try:
            read = self._late_reads.submit(self._stored_runs, run_ids)
        except RuntimeError:  # stopping: no more reads
            raise late from None
        try:
            runs = read.result(LATE_READ_S)
        except (StoreUnavailable, TimeoutError):
            raise late from None
        still_open = [run.id for run in runs if not run.status.terminal]
        if still_open:
            raise RunsTimeout(list(dict.fromkeys(still_open)), timeout or 0.0)
        return runs

    def _stored_runs(self, run_ids: list[str]) -> list[Run]:
        """The runs as stored, in the order asked; RunNotFound for one gone meanwhile (a
        prune removed it, or its group was deleted, once it ended)."""
        runs = self._store.get_runs(run_ids)
        for run_id in run_ids:
            if run_id not in runs:
                raise RunNotFound(run_id)
        return [runs[i] for i in run_ids]

    def get_run(self, run_id: str) -> Run:
        """The run as stored: status, attempt, window, stop reason, error."""
        run_id = check_id(run_id, "run_id")
        self._check()
        return self._store.get_run(run_id)

    def list_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        *,
        after: str | None = None,
    ) -> list[Run]:
        """Runs oldest first (or newest first), filtered by agent, group and status.

        A page: `limit` runs after the run `after` in that order (the last one of the
        previous page; RunNotFound if no run has that id). The order is by creation, then
        turn, position and id; paging is by key, not offset, so no run is listed twice
        or skipped, and a run created meanwhile comes after the runs listed (a turn stamps
        its runs when it starts: with turns of several groups committing at once, page
        one group at a time to see every new run).
        """
        filters = RunFilters(
            agent_id=agent_id,
            group_id=group_id,
            statuses=statuses,
            limit=limit,
            newest_first=newest_first,
            after=after,
        )
        self._check()
        return self._store.list_runs(
            agent_id=filters.agent_id,
            group_id=filters.group_id,
            statuses=filters.statuses,
            limit=filters.limit,
            newest_first=filters.newest_first,
            after=filters.after,
        )

    def count_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
    ) -> int:
        """How many runs `list_runs` would return with these filters, without loading them."""
        filters = RunFilters(agent_id=agent_id, group_id=group_id, statuses=statuses)
        self._check()
        return self._store.count_runs(
            agent_id=filters.agent_id, group_id=filters.group_id, statuses=filters.statuses
        )

    def run_events(
        self, run_id: str, *, limit: int | None = None, after: int | None = None
    ) -> list[RunEvent]:
        """Every status change of the run, oldest first; or a page: `limit` events after
        the event whose `id` is `after` (RunEventNotFound if the run has none)."""
        run_id = check_id(run_id, "run_id")
        page = EventPage(limit=limit, after=after)
        self._check()
        return self._store.run_events(run_id, limit=page.limit, after=page.after)

    def cancel_run(self, run_id: str) -> Run:
        """Cancel a run (a terminal run is returned as it is)."""
        run_id = check_id(run_id, "run_id")
        self._check("cancel a run")
        committed = self._parts.tracker.ask(CancelRun(run_id=run_id))
        if committed is not None:
            committed.result()
        return self._store.get_run(run_id)

    # -- memory and history ---------------------------------------------------------------

    def get_agent(self, agent_id: str) -> Agent:
        """The stored agent: id, group, role, name, kind and config."""
        agent_id = check_id(agent_id, "agent_id")
        self._check()
        return self._store.get_agent(agent_id)

    def get_blocks(self, agent_id: str) -> Blocks:
        """The memory blocks as the agent sees them: the shared ones, then its own."""
        agent_id = check_id(agent_id, "agent_id")
        self._check()
        return self._store.get_blocks(agent_id)

    # -- memory blocks from the application (issue 19) -----------------------------------
    #
    # `agent_id` names an agent (its view: the group's shared blocks, then its own) or a
    # group (its shared blocks only). Writes go through this process's writer under the
    # group's lease, planned against the block as committed, so they are serialized with
    # the memory tools' edits of the same block and neither is lost.

    def get_block(self, agent_id: str, label: str) -> Block:
        """The block labelled `label` as the agent sees it (a group id: among the group's
        shared blocks).

        Raises AgentNotFound or GroupNotFound for an unknown id, BlockNotFound (naming
        the labels there are) for a label not there.
        """
        agent_id = check_id(agent_id, "agent_id")
        self._check()
        _, _, block = self._find_block(agent_id, label)
        return block

    def set_block(self, agent_id: str, label: str, value: str) -> Block:
        """Replace the value of the block labelled `label` (as `get_block` finds it);
        return it with its new version, recorded in its history (source `application`).

        Read-only blocks are read-only for the agents' memory tools; the application may
        set them. A value over the block's limit, or text that cannot be stored, raises
        ValidationError; unknown ids and labels as `get_block`; NotOwner for a group
        another process serves.
        """
        agent_id = check_id(agent_id, "agent_id")
        self._check("set a block")
        group_id, where, block = self._find_block(agent_id, label)
        checked = BlockValue(label=block.label, value=value, limit=block.limit)
        self._check_owner(group_id)
        updated = self._store.set_block(block, checked.value, where)
        log.info("block_set", group_id=group_id, block_id=block.id, version=updated.version)
        return updated

    def create_block(
        self,
        agent_id: str,
        label: str,
        value: str = "",
        *,
        limit: int = DEFAULT_BLOCK_LIMIT,
        read_only: bool = False,
        description: str | None = None,
    ) -> Block:
        """Create a block: with a group id a shared block of the group, with an agent id
        a block of that agent's own (as a sleeptime agent's `memory_persona`).

        Runs started afterwards see it (a run sees the blocks as they were when it
        started). Raises BlockExists (nothing written) if an agent concerned already
        sees a block with that label, ValidationError for a malformed label, value,
        limit or description (as `create_group`'s blocks), AgentNotFound or
        GroupNotFound for an unknown id, NotOwner for a group another process serves.
        """
        agent_id = check_id(agent_id, "agent_id")
        self._check("create a block")
        spec = BlockSpec.model_validate(
            {
                "label": label,
                "value": value,
                "limit": limit,
                "read_only": read_only,
                "description": description,
            }
        )
        group_id, owner_id = self._store.block_view(agent_id)
        self._check_owner(group_id)
        block = Block(
            id=new_id("block"),
            group_id=group_id,
            agent_id=owner_id,
            label=spec.label,
            value=spec.value,
            limit=spec.limit,
            read_only=spec.read_only,
            description=spec.description,
        )
        created = self._store.create_block(block, _view_name(group_id, owner_id))
        log.info("block_created", group_id=group_id, block_id=block.id, label=spec.label)
        return created

    def delete_block(self, agent_id: str, label: str) -> Block:
        """Delete the block labelled `label` (as `get_block` finds it); return it as it
        was. Its history stays, ending with a `deleted` version without a value. A run
        that edits it afterwards gets a tool error. Errors as `set_block`.
        """
        agent_id = check_id(agent_id, "agent_id")
        self._check("delete a block")
        group_id, where, block = self._find_block(agent_id, label)
        self._check_owner(group_id)
        deleted = self._store.delete_block(block, where)
        log.info("block_deleted", group_id=group_id, block_id=block.id, label=block.label)
        return deleted

    def block_history(
        self, agent_id: str, label: str, limit: int | None = None, after: int | None = None
    ) -> list[BlockVersion]:
        """Every version of the block(s) labelled `label` in the agent's (or group's)
        view, oldest first, those of deleted blocks too: value, version, and who made it
        (the application, a run with its tool and tool call, a primary agent, the
        runtime).

        Paging: at most `limit` versions, after the version whose `id` is `after` (the
        last one of the previous page); pages stay stable while versions are added.
        Versions removed by retention are not there. Raises BlockNotFound if no block
        of that label is or was there.
        """
        agent_id = check_id(agent_id, "agent_id")
        page = BLOCK_HISTORY_PAGE.validate_python({"label": label, "limit": limit, "after": after})
        self._check()
        group_id, owner_id = self._store.block_view(agent_id)
        return self._store.block_history(
            group_id,
            owner_id,
            page.label,
            _view_name(group_id, owner_id),
            limit=page.limit,
            after=page.after,
        )

    def _find_block(self, agent_id: str, label: str) -> tuple[str, str, Block]:
        """(group id, the view's name, block) of the block labelled `label` in the view
        `agent_id` names."""
        label = BLOCK_LABEL.validate_python(label)
        group_id, owner_id = self._store.block_view(agent_id)
        if owner_id is None:
            found = self._store.shared_blocks(group_id)
        else:
            found = self._store.get_blocks(owner_id)
        where = _view_name(group_id, owner_id)
        block = found.get(label)
        if block is None:
            raise BlockNotFound(label, where, found.labels())
        return group_id, where, block

    def _check_owner(self, group_id: str) -> None:
        if not self._store.serves(group_id):
            raise self._store.not_owner(group_id)

    def list_messages(
        self, agent_id: str, *, limit: int | None = None, after: str | None = None
    ) -> list[Message]:
        """The agent's stored history, oldest first; or a page: `limit` messages after the
        message `after` (MessageNotFound if it is not one of the agent's, e.g. pruned)."""
        agent_id = check_id(agent_id, "agent_id")
        page = MessagePage(limit=limit, after=after)
        self._check()
        return self._store.list_messages(agent_id, limit=page.limit, after=page.after)

    def check_invariants(self, group_ids: Sequence[str] | None = None) -> InvariantReport:
        """Check SPEC 4-6 over what is stored (after the runs finished): every run
        terminal, legal histories, turns and counters, and per agent windows contiguous,
        disjoint and covering every primary message up to the cursor exactly once."""
        group_ids = GROUP_IDS.validate_python(group_ids)
        self._check()
        return check_invariants(self._store, group_ids)

    # -- retention (issue 19) -------------------------------------------------------------

    def prune(
        self,
        *,
        before: datetime | None = None,
        keep_runs: int | None = None,
        messages: bool = False,
        keep_messages: int | None = None,
        keep_block_versions: int | None = None,
        group_ids: Sequence[str] | None = None,
        batch_size: int = DEFAULT_PRUNE_BATCH,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove what a deployment no longer needs, in bounded batches, while it runs.

        - `before` (an aware datetime): terminal runs completed before it go, with their
          events and what their sleeptime agents stored for them (their history), and so
          do turn requests made before it (a retry with a removed request id takes a new
          turn); with `messages` or `keep_block_versions`, only what is older goes too.
        - `keep_runs`: per sleeptime agent, its newest N runs stay (with or without
          `before`). An agent's runs go oldest first, never one after a run that stays.
        - `messages=True`: primary messages already covered by every current sleeptime
          agent's windows go: up to the group's cursor, below the window of every run not
          yet terminal, whole turns only; `keep_messages` keeps the newest N per group
          (the primary agent's recent history; a retried request's answer lists only
          the messages that remain).
        - `keep_block_versions`: per block, the newest N versions stay (N >= 1; the
          current version always does).
        - `group_ids`: only these groups (GroupNotFound for an unknown one); default all.

        Each batch (at most `batch_size` rows of a kind, with the rows riding along) is
        one transaction through this process's writer, fenced by the group's lease, that
        also moves the marks the invariants read (`check_invariants` holds on what
        remains) and adds its counts to the group's row in `prunes`: turns keep being
        taken meanwhile, and a crash leaves each batch done or not. Groups this process
        does not serve (another owns them; or their shard moved meanwhile) are skipped
        and listed in the report. With `dry_run=True` nothing is removed: the report
        counts what would be (a read-only runtime may do that).

        Bad options (a naive datetime, a negative count, nothing to prune) raise
        pydantic's ValidationError.
        """
        settings = PruneSettings(
            before=before,
            keep_runs=keep_runs,
            messages=messages,
            keep_messages=keep_messages,
            keep_block_versions=keep_block_versions,
            batch_size=batch_size,
        )
        chosen = GROUP_IDS.validate_python(group_ids)
        dry_run = DRY_RUN.validate_python(dry_run)
        self._check() if dry_run else self._check("prune")
        removed: dict[str, int] = dict.fromkeys(PRUNE_KINDS, 0)
        by_group: dict[str, dict[str, int]] = {}
        skipped: list[str] = []
        batches = looked_at = 0
        for group_id in self._groups_to_prune(chosen):
            looked_at += 1
            if not self._store.serves(group_id):
                skipped.append(group_id)
                continue
            try:
                if dry_run:
                    counts, done = self._store.prune_counts(group_id, settings), 0
                else:
                    counts, done = self._store.prune_group(group_id, settings)
            except (ShardLost, NotOwner) as moved:
                log.warning("prune_skipped_group", group_id=group_id, error=str(moved))
                skipped.append(group_id)
                continue
            batches += done
            if any(counts.values()):
                by_group[group_id] = {kind: counts.get(kind, 0) for kind in PRUNE_KINDS}
                for kind, count in counts.items():
                    removed[kind] = removed.get(kind, 0) + count
                if not dry_run:
                    log.info("group_pruned", group_id=group_id, batches=done, **counts)
        log.info(
            "prune_finished", dry_run=dry_run, groups=looked_at, skipped=len(skipped), **removed
        )
        return PruneReport(
            dry_run=dry_run,
            groups=looked_at,
            batches=batches,
            removed=removed,
            by_group=by_group,
            skipped=skipped,
        )

    def _groups_to_prune(self, group_ids: list[str] | None) -> Iterator[str]:
        """The given groups (each must exist), or every group, a page at a time."""
        if group_ids is not None:
            for group_id in group_ids:
                self._store.get_group(group_id)  # GroupNotFound before anything is removed
            yield from dict.fromkeys(group_ids)
            return
        after: str | None = None
        while True:
            page = self._store.list_groups(limit=PRUNE_GROUP_PAGE, after=after)
            yield from (group.id for group in page)
            if len(page) < PRUNE_GROUP_PAGE:
                return
            after = page[-1].id

    def stats(self) -> dict[str, int]:
        """What this process holds and has done since it started, read from memory (no
        database query: `count_groups()` and `count_runs()` count what is stored).

        - `groups`, `agents`: the groups (sleeptime agents) this process serves whose
          actor was started since it began, running or passivated; a group nobody took
          a turn on since the start is not among them, whatever the database holds;
        - `active_groups`, `active_agents`: those with a running actor (a thread);
          `passivated_groups`, `passivated_agents`: the others;
        - `passivations`, `activations`: actors that gave their thread back when idle,
          and that a message started again; `restarts`, `escalations`,
          `injected_crashes`: supervision (see `Chaos` for the last);
        - `turns_in_flight`: turns sent and not ended, `turns_waiting`: turns waiting for
          a permit (`max_turns_in_flight`);
        - `step_threads`: the agents' step pool; `starts_postponed`: run starts put off
          while the store was unavailable; `timers`: the scheduler's timers (deadlines of
          running runs, mostly);
        - `transactions`, `writes`: committed by the writer; `writes_queued`: waiting
          for it.
        """
        counts = self._directory.counts()
        active_groups = self._parts.supervisor.active_count("group:")
        active_agents = self._parts.supervisor.active_count("agent:")
        return {
            **counts,
            **self._admission.counts(),
            "active_groups": active_groups,
            "active_agents": active_agents,
            "passivated_groups": max(0, counts["groups"] - active_groups),
            "passivated_agents": max(0, counts["agents"] - active_agents),
            "passivations": self._parts.supervisor.passivations,
            "activations": self._parts.supervisor.activations,
            "restarts": self._parts.supervisor.restarts,
            "injected_crashes": self._parts.crashes.injected,
            "escalations": self._parts.supervisor.escalations,
            "step_threads": self._parts.pool.threads,
            "starts_postponed": self._parts.steps.postponed,
            "timers": self._parts.scheduler.held(),
            "transactions": self._store.committer.transactions,
            "writes": self._store.committer.ops,
            "writes_queued": self._store.committer.queued,
        }

    @property
    def metrics(self) -> RuntimeMetrics | None:
        """The runtime's Prometheus metrics (`Runtime.start(metrics=True)`), else None:
        `rt.metrics.serve(port)`, `rt.metrics.asgi_app()`, `rt.metrics.registry`."""
        return self._metrics

    def _load(self) -> Load:
        """How busy the runtime is, for the metrics' gauges (asks the run tracker)."""
        open_runs: dict[str, int] = {}
        if not self._stopped.is_set() and self._parts.failure is None:
            try:
                open_runs = self._parts.tracker.ask(CountOpenRuns(), timeout=LOAD_TIMEOUT_S)
            except Exception:  # busy past the timeout, or restarting: not this time
                open_runs = {}
        admission = self._admission.counts()
        return Load(
            active_groups=self._parts.supervisor.active_count("group:"),
            active_agents=self._parts.supervisor.active_count("agent:"),
            open_runs=open_runs,
            turns_in_flight=admission["turns_in_flight"],
            turns_waiting=admission["turns_waiting"],
            writes_queued=self._store.committer.queued,
        )


def _outcome(
    reply: Future[Any], group_id: str, timeout: float | None, deadline: float | None
) -> TurnResult:
    """A turn's result (or its error), waiting at most until `deadline`."""
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        result: TurnResult = reply.result(remaining)
    except TimeoutError:
        if not reply.done():
            assert timeout is not None
            raise TurnTimeout(group_id, timeout) from None
        result = reply.result()  # done meanwhile, or failed with a TimeoutError of its own
    return result


def _persona_block(agent: Agent, persona: str) -> Block:
    """A sleeptime agent's own `memory_persona` block, room for its text at least."""
    return Block(
        id=new_id("block"),
        group_id=agent.group_id,
        agent_id=agent.id,
        label=MEMORY_PERSONA,
        value=persona,
        limit=max(len(persona), BlockCreate().limit),
    )


def _view_name(group_id: str, agent_id: str | None) -> str:
    """How an error names a view of blocks."""
    if agent_id is None:
        return f"group {group_id} (its shared blocks)"
    return f"agent {agent_id} (its group's shared blocks and its own)"


@atexit.register
def _stop_at_exit() -> None:
    for runtime in list(_running):
        runtime.stop(drain_timeout=0)
