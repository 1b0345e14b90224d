"""The GroupActor: one per group, it serializes the group's turns and owns counter and cursor.

A turn runs the primary agent (or takes recorded messages), decides whether sleeptime
fires, and commits input, output, counter, cursor and runs in one transaction. Only then
are the runs handed to the tracker and the sleeptime agents, so no work starts on a run
that is not stored, and a crash leaves the whole turn stored or none of it.

A turn taken with a request id commits its answer with it; a retry with that id finds the
answer in the store and gets it again, without a turn. The group's turns are serialized
here, so looking the id up and then writing it cannot race within the process; the
table's primary key refuses a second writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from actors._address import Address
from actors._execute import as_output, stamp
from actors._observer import NO_OBSERVER, Observer, TurnWatch
from actors._protocol import (
    AddSleeptimeAgent,
    AssignRun,
    CancelAgentRuns,
    ChangeSettings,
    DeleteGroup,
    DispatchRuns,
    GroupChanged,
    KindRegistered,
    RemoveSleeptimeAgent,
    RunsCreated,
    TakeTurn,
)
from actors._scheduler import Scheduler
from actors._settings import GroupSettings
from actors._supervised import CrashReporter, SupervisedActor
from actors.rules import backfill_runs, backfill_windows, claim_window, decide_fire
from actors.sdk import AgentBehaviour, AgentContext, Memory, StepFailed, stream_of
from messages import (
    Agent,
    AgentNotInGroup,
    Group,
    GroupFailed,
    GroupNotFound,
    Message,
    MessageCreate,
    PrimaryAgentError,
    Run,
    RunStatus,
    SleeptimeError,
    StoreUnavailable,
    TurnResult,
)
from messages._errors import describe
from messages._lifecycle import DEFAULT_BACKFILL_WINDOW
from messages._log import get_logger
from persistence import (
    AgentJoin,
    AgentLeave,
    GroupState,
    StaleTurn,
    Store,
    TurnRequest,
    TurnWrite,
    utcnow,
)


@dataclass(frozen=True, slots=True)
class GroupWiring:
    """What a GroupActor uses besides its own state, as the runtime wires it."""

    store: Store
    build_agent: Callable[[str, Mapping[str, Any]], AgentBehaviour]
    """Build the primary agent of a kind from its config."""
    tracker: Address
    agent: Callable[[str], Address]
    """The address of a sleeptime agent's actor (started on demand)."""
    notify_agent: Callable[[str, Any], None]
    """Tell a sleeptime agent's running actor, if any (a passivated one reads the store)."""
    scheduler: Scheduler
    observer: Observer = field(default=NO_OBSERVER)
    settings: GroupSettings = field(default_factory=GroupSettings)
    """Told each change of the group's settings, as it commits (its agents' steps read it)."""


log = get_logger("sleeptime.group")
T = TypeVar("T")

MAX_TAIL_MESSAGES = 512
"""At most this many messages since the cursor are kept for the next runs' window;
a longer window is read back from the store."""


class GroupActor(SupervisedActor):
    """Runs the turns of one group, one at a time.

    With a reply: `TakeTurn` -> `TurnResult` (or `PrimaryAgentError` carrying it),
    `ChangeSettings` -> `Group`, `AddSleeptimeAgent` / `RemoveSleeptimeAgent` -> `Agent`,
    `DeleteGroup` -> None (then every later request is refused with GroupNotFound).
    Told: `DispatchRuns`, `KindRegistered`.

    While idle it serves a turn on its caller's thread (`serves_callers`, see
    `Runtime._send_turn`): the same `receive`, under the same lock, a thread woken less.
    """

    serves_callers = True

    def __init__(
        self,
        reporter: CrashReporter,
        state: GroupState,
        wiring: GroupWiring,
        hand_over: bool = False,
    ) -> None:
        super().__init__(reporter)
        self._address = reporter.address
        self._hand_over = hand_over
        self._wiring = wiring
        self._adopt(state)
        self._behaviour: AgentBehaviour | None = None
        self._stale = False
        self._redispatches = 0  # hand-overs scheduled again after a failed delivery
        self._deleted = False  # the group's rows are gone: every request is refused
        self._log = log.bind(group_id=state.group.id, agent_id=state.primary.id)

    def _adopt(self, state: GroupState) -> None:
        self._sleeptime = state.sleeptime
        self._group = state.group
        self._primary = state.primary
        self._cursor_seq = state.cursor_seq
        self._last_seq = state.last_seq
        # The primary messages after the cursor that this incarnation committed, so a run
        # is handed its window instead of reading it back; complete from `_tail_from` on.
        self._tail: list[Message] = []
        self._tail_from = state.last_seq + 1

    def started(self) -> None:
        if self._hand_over:  # a new incarnation: runs committed but not handed over yet
            self._reload()

    def receive(self, message: Any) -> Any:
        match message:
            case TakeTurn():
                sink = _Sink(message.sink, self._log)
                try:
                    return self._turn(message, sink)
                finally:
                    sink.offer(None)
            case ChangeSettings(changes=changes):
                self._check_live()
                return self._change(changes)
            case AddSleeptimeAgent():
                return self._add_agent(message)
            case RemoveSleeptimeAgent(agent_id=agent_id):
                return self._remove_agent(agent_id)
            case DeleteGroup():
                return self._delete()
            case DispatchRuns(runs=runs, attempt=attempt):
                self._redispatches -= 1
                if not self._deleted:
                    self._dispatch(runs, attempt)
                return None
            case KindRegistered(kind=kind):
                if kind == self._primary.kind:
                    self._behaviour = None  # a re-registered kind takes effect next turn
                return None
            case _:
                raise TypeError(f"a group does not handle {type(message).__name__}")

    def idle(self) -> bool:
        # A stale group must hand over what its uncertain commit may hold: not idle. A
        # deleted one is stopped by the runtime; a new instance must not start from memory.
        return not self._stale and self._redispatches == 0 and not self._deleted

    def snapshot(self) -> GroupState:
        """Only this actor moves the group: its state is what the store holds."""
        return GroupState(
            group=self._group,
            cursor_seq=self._cursor_seq,
            last_seq=self._last_seq,
            primary=self._primary,
            sleeptime=self._sleeptime,
        )

    # -- turns ----------------------------------------------------------------------------

    def _turn(self, command: TakeTurn, sink: _Sink) -> TurnResult:
        if self._deleted:
            raise GroupNotFound(self._group.id)
        if self._stale:
            self._reload()  # raises StoreUnavailable while the store is still away
        group = self._group
        if command.request_id is not None and not command.new_request:
            answered = self._wiring.store.find_turn_request(group.id, command.request_id)
            if answered is not None:
                return self._answer_again(answered, sink)
        if group.status == "failed":
            raise GroupFailed(group.id, group.failure_reason or "stopped")
        with self._wiring.observer.turn(group.id, self._primary.id, command.parent) as watch:
            return self._take(command, sink, watch)

    def _take(self, command: TakeTurn, sink: _Sink, watch: TurnWatch) -> TurnResult:
        """Run the turn, commit it whole, hand its runs over; `watch` observes it."""
        began = time.perf_counter()
        group = self._group
        turn, now = group.turns + 1, utcnow()
        seq = self._last_seq
        stored = []
        for create in command.input:
            seq += 1
            stored.append(self._stamp(create, seq, turn))
        error: BaseException | None = None
        if command.mode == "record":
            output = [m for m in stored if m.role != "user"]
        else:
            output = []
            behaviour = self._primary_behaviour()  # an unknown kind stores nothing
            with watch.step():
                try:
                    for create in self._produce(behaviour, stored, command.mode == "stream"):
                        message = self._stamp(create, seq + 1, turn)
                        seq += 1  # (only once stamped: a message that fails leaves no gap)
                        output.append(message)
                        sink.offer(message)
                except BaseException as failure:  # agent code: even SystemExit fails only it
                    error = failure
            outage = None if error is None else _store_outage(error)
            if outage is not None:
                # The store the agent read through (its memory, its history) is away: not
                # the agent's failure, and nothing is recorded; a retry takes the turn.
                raise outage
        decision = decide_fire(group.frequency, group.counter)
        recorded = stored if command.mode == "record" else stored + output
        runs, cursor, cursor_seq = claim_window(
            group, self._cursor_seq, turn, recorded, decision.fired, bool(output), now
        )
        result = TurnResult(
            group_id=group.id,
            turn=turn,
            messages=recorded if command.mode == "record" else output,
            fired=decision.fired,
            run_ids=[r.id for r in runs],
        )
        detail = None if error is None else describe(error)
        write = TurnWrite(
            group_id=group.id,
            expected_turns=group.turns,
            turns=turn,
            counter=decision.counter,
            cursor=cursor,
            cursor_seq=cursor_seq,
            messages=recorded,
            runs=runs,
            at=now,
            request=None
            if command.request_id is None
            else TurnRequest(command.request_id, result, detail),
        )
        with watch.commit():
            self._commit(write)
        watch.recorded(turn, decision.fired, runs, error)
        self._group = group.model_copy(
            update={
                "turns": turn,
                "counter": decision.counter,
                "cursor": cursor,
                "updated_at": write.at,
                "last_turn_at": write.at,
            }
        )
        window = self._window(recorded, runs, cursor_seq)
        self._cursor_seq, self._last_seq = cursor_seq, seq
        self._dispatch(runs, window=window)
        self._log.debug(
            "turn_recorded",
            turn=turn,
            fired=decision.fired,
            runs=len(runs),
            error=detail,
            duration_ms=round(1000 * (time.perf_counter() - began), 3),
        )
        if detail is not None:
            raise PrimaryAgentError(group.id, detail, result) from error
        return result

    def _answer_again(self, answered: TurnRequest, sink: _Sink) -> TurnResult:
        """A retry of a turn already recorded: the first call's answer (its messages to a
        stream's sink first), and nothing recorded. The retry's own input is not looked
        at: a request id names one turn, whatever is sent with it again."""
        for message in answered.result.messages:
            sink.offer(message)
        self._log.info("turn_retried", request_id=answered.request_id, turn=answered.result.turn)
        if answered.error is not None:
            raise PrimaryAgentError(self._group.id, answered.error, answered.result)
        return answered.result

    def _window(
        self, recorded: list[Message], runs: list[Run], cursor_seq: int
    ) -> list[Message] | None:
        """Keep the committed messages after the cursor; the runs' window if complete.

        `cursor_seq` is the cursor after the turn: a fire of a group with no sleeptime
        agent moves it too (as Letta does), with no run."""
        self._tail.extend(recorded)
        if cursor_seq == self._cursor_seq:  # nothing claimed
            if len(self._tail) > MAX_TAIL_MESSAGES:
                del self._tail[: len(self._tail) - MAX_TAIL_MESSAGES]
                self._tail_from = self._tail[0].sequence
            return None
        window = None
        if runs:
            first = runs[0].window_first_seq
            if first >= self._tail_from:
                window = [m for m in self._tail if m.sequence >= first]
        self._tail = []
        self._tail_from = cursor_seq + 1
        return window

    def _produce(
        self, behaviour: AgentBehaviour, stored: list[Message], streaming: bool
    ) -> Iterator[MessageCreate]:
        store = self._wiring.store
        memory = Memory(partial(store.get_blocks, self._primary.id), store)
        context = AgentContext(
            agent_id=self._primary.id,
            group_id=self._group.id,
            run_id=None,
            memory=memory,
            history=lambda: self._wiring.store.list_messages(self._primary.id),
            recent_history=partial(self._wiring.store.recent_messages, self._primary.id),
            observer=self._wiring.observer,
        )
        if streaming:
            try:
                for item in stream_of(behaviour, context, stored):
                    yield (
                        item
                        if isinstance(item, MessageCreate)
                        else MessageCreate.model_validate(item)
                    )
            except StepFailed as failure:
                # What it said before it failed is kept, as a step's: a kind with no
                # `stream` of its own is stepped, and its failure carries its messages.
                yield from failure.messages
                raise
            finally:
                memory.close()
            return
        try:
            produced, _ = as_output(behaviour.step(context, stored))
        except StepFailed as failure:
            yield from failure.messages  # what the agent said before it failed is kept
            raise
        finally:
            memory.close()
        yield from produced

    def _stamp(self, create: MessageCreate, sequence: int, turn: int) -> Message:
        return stamp(
            create, agent_id=self._primary.id, group_id=self._group.id, sequence=sequence, turn=turn
        )

    def _primary_behaviour(self) -> AgentBehaviour:
        if self._behaviour is None:
            self._behaviour = self._wiring.build_agent(self._primary.kind, self._primary.config)
        return self._behaviour

    def _commit(self, write: TurnWrite) -> None:
        try:
            self._wiring.store.record_turn(write).result()
        except StaleTurn as stale:
            # Someone else moved this group: take the stored state as the truth.
            self._reload()
            raise SleeptimeError(
                f"turn not recorded: {stale}; the group was reloaded, retry the turn"
            ) from stale
        except StoreUnavailable:
            # The commit may or may not have happened (a connection lost mid-commit):
            # before the next turn, read back what the store holds.
            self._stale = True
            raise

    def _reload(self) -> None:
        """Take the group's state from the store, and hand over runs not yet started."""
        self._adopt(self._wiring.store.group_state(self._group.id))
        waiting = self._wiring.store.list_runs(
            group_id=self._group.id, statuses=[RunStatus.CREATED]
        )
        self._dispatch(waiting)
        self._stale = False
        self._log.info("group_reloaded", turns=self._group.turns, runs_handed_over=len(waiting))

    def _dispatch(
        self, runs: list[Run], attempt: int = 0, window: list[Message] | None = None
    ) -> None:
        """Hand committed runs to the tracker, then to their agents.

        The turn is already committed, so a failure here must not reach its caller: the
        runs are handed over again a little later instead.
        """
        if attempt > 0:  # not to an agent taken out of the group since
            runs = [r for r in runs if r.agent_id in self._group.sleeptime_agent_ids]
        if not runs:
            return
        if attempt == 0:
            # The tracker hears of the runs before any agent can ask to start one.
            self._wiring.tracker.tell(RunsCreated(runs=runs))
        undelivered = []
        for run in runs:
            try:
                self._wiring.agent(run.agent_id).tell_here(AssignRun(run=run, window=window))
            except Exception as error:
                self._log.error("dispatch_failed", run_id=run.id, error=str(error))
                undelivered.append(run)
        if undelivered:
            delay = min(30.0, 0.5 * 2**attempt)
            command = DispatchRuns(runs=undelivered, attempt=attempt + 1)
            self._redispatches += 1
            self._wiring.scheduler.call_later(delay, partial(self._address.tell, command))

    # -- settings -------------------------------------------------------------------------

    def _change(self, changes: dict[str, Any]) -> Group:
        changes = {**changes, "updated_at": utcnow()}
        # (An outage may leave the change stored or not: the next turn reads it back.)
        self._between_turns(
            lambda: self._wiring.store.update_group(self._group.id, changes).result()
        )
        self._group = self._group.model_copy(update=changes)
        self._wiring.settings.changed(self._group)
        for agent_id in self._group.sleeptime_agent_ids:
            self._wiring.notify_agent(agent_id, GroupChanged(group=self._group))
        return self._group

    # -- groups over their life -----------------------------------------------------------

    def _check_live(self) -> None:
        """Refuse a change of a deleted (GroupNotFound) or failed (GroupFailed) group."""
        if self._deleted:
            raise GroupNotFound(self._group.id)
        if self._stale:
            self._reload()  # raises StoreUnavailable while the store is still away
        if self._group.status == "failed":
            raise GroupFailed(self._group.id, self._group.failure_reason or "stopped")

    def _between_turns(self, write: Callable[[], T]) -> T:
        """Commit a change made between two turns, as a turn's commit is handled."""
        try:
            return write()
        except StaleTurn as stale:
            self._reload()
            raise SleeptimeError(
                f"group not changed: {stale}; the group was reloaded, try again"
            ) from stale
        except StoreUnavailable:
            self._stale = True  # the commit may or may not have happened: read it back
            raise

    def _add_agent(self, command: AddSleeptimeAgent) -> Agent:
        """A sleeptime agent joins at the cursor: it takes part in every later firing.
        With backfill, it covers from the first primary message still stored instead,
        through runs over [that message, cursor] in windows of bounded size, committed
        with it and executed, in order, before its runs of later turns."""
        self._check_live()
        group, store = self._group, self._wiring.store
        known = next((a for a in self._sleeptime if a.id == command.agent.id), None)
        if known is not None:
            return known  # a retried call: added already
        group, join = self._group, self._plan_join(command)
        agent, runs = self._between_turns(partial(_commit_join, store, join))
        now, coverage = join.at, agent.coverage_from_seq
        self._sleeptime = [*self._sleeptime, agent]
        self._group = group.model_copy(
            update={
                "sleeptime_agent_ids": [*group.sleeptime_agent_ids, agent.id],
                "updated_at": now,
            }
        )
        if runs:
            self._wiring.observer.runs_backfilled(runs)
        self._dispatch(runs)
        self._log.info(
            "sleeptime_agent_added",
            added_agent_id=agent.id,
            turn=group.turns,
            coverage_from_seq=coverage,
            backfill_runs=len(runs),
        )
        return agent

    def _plan_join(self, command: AddSleeptimeAgent) -> AgentJoin:
        """The agent joining now at the cursor, to commit at once; with backfill, its
        coverage and runs are planned in the join's transaction, from the first primary
        message still stored then (a prune going on beside it cannot move it meanwhile)."""
        group, now, cursor_seq = self._group, utcnow(), self._cursor_seq
        agent = command.agent.model_copy(
            update={
                "group_id": group.id,
                "added_turn": group.turns,
                "coverage_from_seq": cursor_seq + 1,
            }
        )
        size = command.backfill_window or group.transcript_max_messages or DEFAULT_BACKFILL_WINDOW

        def backfill(pruned: int) -> tuple[Agent, list[Run]]:
            coverage = min(pruned + 1, cursor_seq + 1)
            windows = backfill_windows(coverage, cursor_seq, size)
            covering = agent.model_copy(update={"coverage_from_seq": coverage})
            return covering, backfill_runs(group, agent.id, windows, now)

        return AgentJoin(
            group_id=group.id,
            expected_turns=group.turns,
            agent=agent,
            persona=command.persona,
            persona_source=command.persona_source,
            runs=[],
            at=now,
            backfill=backfill if command.backfill else None,
        )

    def _remove_agent(self, agent_id: str) -> Agent:
        """A sleeptime agent leaves: its open runs are cancelled (recorded, through the
        tracker), then it is marked removed; its rows stay readable."""
        self._check_live()
        group, store = self._group, self._wiring.store
        if agent_id not in group.sleeptime_agent_ids:
            if agent_id == self._primary.id:
                raise AgentNotInGroup(
                    agent_id, group.id, "it is the group's primary agent (delete the group instead)"
                )
            stored = store.get_agent(agent_id)  # AgentNotFound
            if stored.group_id != group.id:
                raise AgentNotInGroup(
                    agent_id, group.id, f"it belongs to group {stored.group_id!r}"
                )
            return stored  # removed already: as it is
        for committed in self._wiring.tracker.ask(CancelAgentRuns(agent_id=agent_id)):
            committed.result()  # cancelled before it leaves: recovery never finds it open
        now = utcnow()
        leave = AgentLeave(group_id=group.id, agent_id=agent_id, turns=group.turns, at=now)
        removed: Agent = self._between_turns(lambda: store.leave_agent(leave).result())
        self._sleeptime = [a for a in self._sleeptime if a.id != agent_id]
        self._group = group.model_copy(
            update={
                "sleeptime_agent_ids": [i for i in group.sleeptime_agent_ids if i != agent_id],
                "updated_at": now,
            }
        )
        self._log.info("sleeptime_agent_removed", removed_agent_id=agent_id, turn=group.turns)
        return removed

    def _delete(self) -> None:
        """Remove the group's rows in one transaction; from then on every request is
        refused with GroupNotFound (the runtime then stops this actor and its agents)."""
        if self._deleted:
            raise GroupNotFound(self._group.id)
        if self._stale:
            self._reload()  # GroupNotFound if a delete whose outcome was unknown went through
        try:
            self._wiring.store.delete_group(self._group.id).result()
        except GroupNotFound:
            self._deleted = True
            raise
        except StoreUnavailable:
            self._stale = True
            raise
        self._deleted = True
        self._log.info("group_deleted", turns=self._group.turns)


class _Sink:
    """Where a streamed turn's messages go, as its consumer gave it.

    What the consumer does can never change the turn: a sink that raises (its event loop
    closed, say) is logged once and dropped, and the turn goes on and is recorded.
    """

    __slots__ = ("_log", "_target")

    def __init__(self, target: Any, logger: Any) -> None:
        self._target = target
        self._log = logger

    def offer(self, item: Message | None) -> None:
        if self._target is None:
            return
        try:
            self._target.put(item)
        except Exception as error:
            self._target = None
            self._log.warning("stream_consumer_dropped", error=repr(error))


def _store_outage(error: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable behind an agent's failure (raised, or what it raised from),
    if an outage of the store made it fail; None when the agent failed by itself."""
    seen: set[int] = set()
    found: BaseException | None = error
    while found is not None and id(found) not in seen:
        if isinstance(found, StoreUnavailable):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def _commit_join(store: Store, join: AgentJoin) -> tuple[Agent, list[Run]]:
    return store.join_agent(join).result()
