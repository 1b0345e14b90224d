"""What the actors tell or ask each other. Each is frozen; none carries a reference to
another actor's state, only values (and, where a caller waits, a queue or an event)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from messages._content import Message, MessageCreate
from messages._groups import Group
from messages._runs import Run, RunStatus, StopReason

TurnMode = Literal["step", "stream", "record"]


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


def _reply() -> Future[Any]:
    return Future()


# -- to a GroupActor ------------------------------------------------------------------


@runtime_checkable
class MessageSink(Protocol):
    """Where a streamed turn puts its messages as they come, then `None` at the end."""

    def put(self, item: Message | None, /) -> None: ...


class TakeTurn(_Command):
    """Run one turn. For `stream`, produced messages go to `sink` as they come, then `None`."""

    input: list[MessageCreate]
    mode: TurnMode
    sink: MessageSink | None = None
    reply: Future[Any] = Field(default_factory=_reply)


class ChangeSettings(_Command):
    """Change a group's settings between two turns; replies with the updated Group."""

    changes: dict[str, Any]
    reply: Future[Any] = Field(default_factory=_reply)


class DispatchRuns(_Command):
    """Hand committed runs to their agents again, after a failed attempt."""

    runs: list[Run]
    attempt: int


# -- to a SleeptimeAgentActor ---------------------------------------------------------


class AssignRun(_Command):
    """A run of this agent was created and committed; queue it.

    `window` is the primary messages of the run's window when the group still held them,
    so the run need not read them back; None means "read them from the store".
    """

    run: Run
    window: list[Message] | None = None


class StepDone(_Command):
    """The agent's step for a run returned (or raised).

    `started` is False when the run never reached its agent because the store was
    unavailable (its start could not be recorded, or its window read): not the agent's
    failure, so the run is queued again rather than ended.
    """

    run_id: str
    attempt: int
    messages: list[Message]
    stop_reason: StopReason
    error: str | None = None
    started: bool = True


class RunDeadline(_Command):
    """The run's `run_timeout` elapsed."""

    run_id: str
    attempt: int


class GroupChanged(_Command):
    """The group's settings changed (transcript preamble, limits, timeout)."""

    group: Group


class KindRegistered(_Command):
    """An agent kind was registered; runs that waited for it can start."""

    kind: str


# -- to the RunTrackerActor -----------------------------------------------------------


class RunsCreated(_Command):
    """Runs committed by a turn; the tracker now follows them."""

    runs: list[Run]


class StartRun(_Command):
    """Ask to move a run to `running`; the reply is a `StartDecision`."""

    run_id: str
    reply: Future[Any] = Field(default_factory=_reply)


class StartDecision(_Command):
    """Whether the run may start, and if so its cancel flag and the start's commit.

    `retry`: not now (the store is unavailable), ask again later; otherwise a run that
    did not start never will (it is terminal or unknown)."""

    started: bool
    attempt: int = 0
    cancel: threading.Event | None = None
    committed: Future[None] | None = None
    reason: str | None = None
    retry: bool = False


class StartAborted(_Command):
    """The run's agent never stepped it: the store was unavailable at its start.

    The run is queued again; the store may hold it `created` (the start never landed) or
    `running` (it did), which the tracker reads back before the next start."""

    run_id: str
    attempt: int


class FinishRun(_Command):
    """A run ended as its agent saw it; refused (and logged) if it is already terminal."""

    run_id: str
    attempt: int
    status: RunStatus
    stop_reason: StopReason
    error: str | None = None
    messages: list[Message] = []


class CancelRun(_Command):
    """Cancel a run; the reply is the commit future of the change, or None if none."""

    run_id: str
    reply: Future[Any] = Field(default_factory=_reply)


class WatchRuns(_Command):
    """The reply is one future per run id, resolved once that run is terminal and committed."""

    run_ids: list[str]
    reply: Future[Any] = Field(default_factory=_reply)


class AdoptRuns(_Command):
    """A sleeptime agent's actor (re)started: the reply is its queued runs, oldest first.

    A run it was running when its previous incarnation died is re-queued first
    (attempt + 1), or failed as `interrupted` past the group's `max_attempts`.
    """

    agent_id: str
    reply: Future[Any] = Field(default_factory=_reply)


class FailGroupRuns(_Command):
    """The group escalated: fail its open runs with the reason."""

    group_id: str
    reason: str


class TerminalCommitted(_Command):
    """A terminal status of this run is now durable (sent by the tracker to itself)."""

    run_id: str


class TransitionFailed(_Command):
    """A status change could not be written (sent by the tracker to itself).

    `retryable` when the database was unavailable: the same write may succeed later.
    """

    run_id: str
    error: str
    retryable: bool


class RetryTransition(_Command):
    """Write a run's pending terminal status again after a failed write."""

    run_id: str
