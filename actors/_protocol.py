"""What the actors tell or ask each other: light frozen objects, apart from the vocabulary.

A request that expects a reply is an `Ask[R]`: it carries the `reply` future its sender
waits on, typed by what the receiver answers (`TakeTurn` is an `Ask[TurnResult]`). The
rest are told and answered by nothing. None carries a reference to another actor's state,
only values (and, where a caller waits, a future, a sink or an event). They are made by
the runtime from data it checked already, so they are plain slotted dataclasses: making
one validates nothing.

Example:
    >>> command = TakeTurn(input=checked, mode="step")
    >>> address.tell(command); result: TurnResult = command.reply.result()
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from messages import (
    Agent,
    Block,
    BlockSource,
    Group,
    Message,
    MessageCreate,
    Run,
    RunStatus,
    StopReason,
    TurnResult,
)
from messages._futures import Reply

R = TypeVar("R")
TurnMode = Literal["step", "stream", "record"]


class Ask(Generic[R]):
    """A request answered through its `reply` future, with an `R` (or an exception)."""

    __slots__ = ()
    reply: Future[R]


class Recipient(Protocol):
    """Who a reply is told to: an actor's address (it outlives the actor's incarnations)."""

    def tell(self, message: Any, /) -> None: ...


@runtime_checkable
class MessageSink(Protocol):
    """Where a streamed turn puts its messages as they come, then `None` at the end."""

    def put(self, item: Message | None, /) -> None: ...


# -- to a GroupActor ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeTurn(Ask[TurnResult]):
    """Run one turn. For `stream`, produced messages go to `sink` as they come, then `None`.

    With a `request_id` the group already answered, the turn is not taken again: the
    first call's answer is given (its messages to the sink first, for `stream`). A
    `new_request` id was just made by its caller, so no earlier call can have used it:
    it is recorded with the turn but not looked up first (one read less per turn)."""

    input: list[MessageCreate]
    mode: TurnMode
    sink: MessageSink | None = None
    request_id: str | None = None
    new_request: bool = False
    parent: Any = None
    """What the observer took in the caller's thread (`Observer.caller_context`)."""
    reply: Future[TurnResult] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class ChangeSettings(Ask[Group]):
    """Change a group's settings between two turns; replies with the updated Group."""

    changes: dict[str, Any]
    reply: Future[Group] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class DispatchRuns:
    """Hand committed runs to their agents again, after a failed attempt."""

    runs: list[Run]
    attempt: int


# -- to a SleeptimeAgentActor -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignRun:
    """A run of this agent was created and committed; queue it.

    `window` is the primary messages of the run's window when the group still held them,
    so the run need not read them back; None means "read them from the store".
    """

    run: Run
    window: list[Message] | None = None


@dataclass(frozen=True, slots=True)
class StepDone:
    """The agent's step for a run returned (or raised), or the run never reached it.

    `token` is the start request's. `started` is False when the run never reached its
    agent: the tracker refused the start (the run is terminal or unknown: `retry` False,
    nothing more to do), put it off (the store is unavailable: `retry`), or recorded it
    but its commit or its window's read met a store outage (`aborted`: the tracker is
    told the start is given back). None of these is the agent's failure: a run put off or
    aborted is queued again rather than ended.
    """

    run_id: str
    attempt: int | None  # None: not known (the pool failed, not the step)
    messages: list[Message]
    stop_reason: StopReason
    error: str | None = None
    started: bool = True
    token: int = 0
    retry: bool = True
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class RunDeadline:
    """The run's `run_timeout` elapsed (for the start request `token`)."""

    run_id: str
    token: int


@dataclass(frozen=True, slots=True)
class GroupChanged:
    """The group's settings changed (transcript preamble, limits, timeout)."""

    group: Group


@dataclass(frozen=True, slots=True)
class KindRegistered:
    """An agent kind was registered; runs that waited for it can start."""

    kind: str


# -- to the RunTrackerActor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunsCreated:
    """Runs committed by a turn; the tracker now follows them."""

    runs: list[Run]


@dataclass(frozen=True, slots=True)
class StartDecision:
    """Whether the run may start, and if so its cancel flag and the start's commit.

    `retry`: not now (the store is unavailable), ask again later; otherwise a run that
    did not start never will (it is terminal or unknown). `token` is the request's."""

    started: bool
    attempt: int = 0
    cancel: threading.Event | None = None
    committed: Future[datetime | None] | None = None
    reason: str | None = None
    retry: bool = False
    token: int = 0


@dataclass(frozen=True, slots=True)
class StartRun:
    """Ask to move a run to `running`; the tracker completes `decided` with its
    `StartDecision`: once the start is committed (or failed to be) if it starts, at once
    if it does not.

    The agent's step waits on `decided` on its pool thread, so the run starts without a
    message back to the agent's actor, which never blocks on the tracker. `token` names
    the request: a finish without an attempt (`FinishRun.attempt` None) means "the attempt
    this request started".
    """

    run_id: str
    decided: Future[StartDecision]
    token: int


@dataclass(frozen=True, slots=True)
class StartAborted:
    """The run's agent never stepped it: the store was unavailable at its start.

    The run is queued again; the store may hold it `created` (the start never landed) or
    `running` (it did), which the tracker reads back before the next start."""

    run_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class FinishRun:
    """A run ended as its agent saw it; refused (and logged) if it is already terminal.

    `attempt` None: the attempt the start request `token` began, if it began one (a run
    whose deadline passed before its agent learnt the tracker's decision)."""

    run_id: str
    attempt: int | None
    status: RunStatus
    stop_reason: StopReason
    error: str | None = None
    messages: list[Message] = field(default_factory=list)
    token: int = 0


@dataclass(frozen=True, slots=True)
class CancelRun(Ask[Future[None] | None]):
    """Cancel a run; the reply is the commit future of the change, or None if none."""

    run_id: str
    reply: Future[Future[None] | None] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class WatchRuns(Ask[list[Future[Run | None]]]):
    """The reply is one future per run id, resolved once that run is terminal and
    committed: with the run as stored if the tracker read it so (it ended before it was
    asked, and terminal runs never change), else with None."""

    run_ids: list[str]
    reply: Future[list[Future[Run | None]]] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class CountOpenRuns(Ask[dict[str, int]]):
    """The reply is how many runs the tracker follows that are not terminal, by status."""

    reply: Future[dict[str, int]] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class AdoptRuns:
    """A sleeptime agent's actor (re)started: the tracker tells `reply_to` its queued
    runs, oldest first, as `Adopted` (with this `token`).

    A run it was running when its previous incarnation died is re-queued first
    (attempt + 1), or failed as `interrupted` past the group's `max_attempts`.
    """

    agent_id: str
    reply_to: Recipient
    token: int


@dataclass(frozen=True, slots=True)
class Adopted:
    """The tracker's answer to `AdoptRuns`: the agent's open runs, oldest first.

    `retry`: the tracker could not answer now (the store is unavailable); ask again."""

    runs: list[Run]
    token: int
    retry: bool = False


@dataclass(frozen=True, slots=True)
class FailGroupRuns:
    """The group escalated: fail its open runs with the reason."""

    group_id: str
    reason: str


class EndedRuns:
    """The runs whose terminal status the writer committed, gathered until the tracker
    takes them: the ends of one batch of writes cost the tracker one message, not one
    each (a message to an idle actor wakes its thread, the dearest part of a hand-off)."""

    __slots__ = ("_lock", "_run_ids")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run_ids: list[str] = []

    def add(self, run_id: str) -> bool:
        """Gather `run_id`; True if it is the first since the tracker last took them
        (the caller then tells the tracker `TerminalCommitted`)."""
        with self._lock:
            self._run_ids.append(run_id)
            return len(self._run_ids) == 1

    def take(self) -> list[str]:
        """The runs gathered, in the order committed; none are left."""
        with self._lock:
            run_ids, self._run_ids = self._run_ids, []
        return run_ids


@dataclass(frozen=True, slots=True)
class TerminalCommitted:
    """Terminal statuses are now durable: those of the runs `ended` gathered (sent by the
    tracker to itself, once for the runs gathered until it takes them)."""

    ended: EndedRuns


@dataclass(frozen=True, slots=True)
class TransitionFailed:
    """A status change could not be written (sent by the tracker to itself).

    `retryable` when the database was unavailable: the same write may succeed later.
    `refused` when the store refused it: the stored run was not at the status and
    attempt the change left (its guard missed). `terminal` when the change was to a
    terminal status.
    """

    run_id: str
    error: str
    retryable: bool
    terminal: bool = True
    refused: bool = False


@dataclass(frozen=True, slots=True)
class RetryTransition:
    """Write a run's pending terminal status again after a failed write."""

    run_id: str


# -- shards (to the RunTrackerActor) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdoptShards(Ask[list[str]]):
    """This process acquired `shards`: follow their open runs, recovering those left
    `running` as a restart does; replies with the agent ids that have open runs."""

    shards: frozenset[int]
    reply: Future[list[str]] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class DropShards(Ask[None]):
    """This process no longer holds `shards`: forget their runs; their new owner carries
    them on. Callers waiting for those runs get `ShardLost` if the shards were `lost`
    (taken over), else `NotOwner` naming the run's group (handed over)."""

    shards: frozenset[int]
    lost: bool
    reply: Future[None] = field(default_factory=Reply)


# -- groups over their life ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeleteGroup(Ask[None]):
    """Delete the group between two turns: its rows go in one transaction, and every
    later message to the group is refused with GroupNotFound."""

    reply: Future[None] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class AddSleeptimeAgent(Ask[Agent]):
    """Add `agent` (with its own `persona` block) to the group between two turns, at the
    cursor, or with backfill runs over the stored history in windows of at most
    `backfill_window` messages. `persona_source`: who gave the persona (`application`
    or `runtime`). An agent already added (a retried call) is answered as stored."""

    agent: Agent
    persona: Block
    persona_source: BlockSource
    backfill: bool
    backfill_window: int | None
    reply: Future[Agent] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class RemoveSleeptimeAgent(Ask[Agent]):
    """Take a sleeptime agent out of the group between two turns: its open runs are
    cancelled first, then it is marked removed; replies with the stored agent."""

    agent_id: str
    reply: Future[Agent] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class CancelAgentRuns(Ask[list[Future[None]]]):
    """Cancel every open run of an agent (to the run tracker); the reply is the commit
    future of each cancellation."""

    agent_id: str
    reply: Future[list[Future[None]]] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class ForgetGroup(Ask[None]):
    """The group was deleted (to the run tracker): stop following its runs, raise their
    cancel flags, and answer whoever waits for them with RunNotFound."""

    group_id: str
    reply: Future[None] = field(default_factory=Reply)
