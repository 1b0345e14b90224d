"""What the actors hand the store to write: one record per transactional operation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from messages import (
    Agent,
    Block,
    BlockSource,
    Group,
    Message,
    Run,
    RunStatus,
    StopReason,
    TurnResult,
)


@dataclass(frozen=True, slots=True)
class NewGroup:
    """A group with its agents and blocks, written in one transaction.

    `block_sources`: who gave each block its first value, by block id, for its history
    (`application` when not named; `runtime` for a default `memory_persona`)."""

    group: Group
    agents: list[Agent]
    blocks: list[Block]
    block_sources: dict[str, BlockSource] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """The answer to a turn taken with a request id: what its caller was told.

    `error` is the primary agent's failure as the caller read it (the detail of its
    `PrimaryAgentError`), None if it did not fail. Stored with the turn, so a retry with
    the same request id is told the same, even after a crash between commit and reply.
    """

    request_id: str
    result: TurnResult
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TurnWrite:
    """One turn: its messages, the counter bump, the cursor move and its runs, atomically.

    `expected_turns` is the turn count the writer started from; the write is refused if
    the stored count moved meanwhile, so two writers can never both count a turn.
    `request`, for a turn taken with a request id, is its answer, stored in the same
    transaction.
    """

    group_id: str
    expected_turns: int
    turns: int
    counter: int
    cursor: str | None
    cursor_seq: int
    messages: list[Message]
    runs: list[Run]
    at: datetime
    request: TurnRequest | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One run status change, with the messages its agent produced (if any).

    It is written only if the stored run is still at `old` and at `expected_attempt`, so
    a late write from an earlier attempt is refused. `attempt` is the attempt the run is
    at afterwards: `expected_attempt + 1` for a re-queue (running -> created), else
    `expected_attempt` (the stored attempt never goes back).

    Example:
        >>> Transition(run_id, RunStatus.RUNNING, RunStatus.CREATED, utcnow(),
        ...            attempt=2, expected_attempt=1, reason="interrupted")
    """

    run_id: str
    old: RunStatus
    new: RunStatus
    at: datetime
    attempt: int
    expected_attempt: int
    reason: str | None = None
    stop_reason: StopReason | None = None
    error: str | None = None
    messages: list[Message] = field(default_factory=list)
    group_id: str | None = None
    """The run's group, whose shard the write is fenced by (None: not fenced)."""

    def __post_init__(self) -> None:
        step = 1 if self.new is RunStatus.CREATED else 0  # only a re-queue leads to created
        if self.attempt != self.expected_attempt + step:
            raise ValueError(
                f"a change of run {self.run_id} to {self.new.value!r} from attempt "
                f"{self.expected_attempt} leaves it at attempt {self.expected_attempt + step}, "
                f"not {self.attempt}"
            )


@dataclass(frozen=True, slots=True)
class GroupState:
    """What a GroupActor needs to resume a group: the group and its primary history end."""

    group: Group
    cursor_seq: int
    last_seq: int
    primary: Agent
    sleeptime: list[Agent]


@dataclass(frozen=True, slots=True)
class RetentionMarks:
    """What retention removed of a group, as its marks say (for the invariants).

    `cursor_seq`: the sequence of the group's cursor (its message may be gone);
    `messages_pruned_through` / `turns_pruned_through`: primary messages (and turns) up
    to these are gone; `runs_pruned_through_seq`: per sleeptime agent, its runs whose
    windows end at or before this primary sequence are gone.
    """

    cursor_seq: int
    messages_pruned_through: int
    turns_pruned_through: int
    runs_pruned_through_seq: dict[str, int]


# -- groups over their life ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentJoin:
    """A sleeptime agent joining a live group, with its own `memory_persona` block and its
    backfill runs (if any), written in one transaction.

    Refused (StaleTurn) unless the group is still at `expected_turns`. `persona_source` is
    who wrote the block's first value: `application` (given in the spec) or `runtime` (the
    default text). `backfill`, for a join with backfill: given the last primary sequence
    retention removed, read in the join's own transaction (so a prune beside it cannot
    move it in between), the agent with its coverage and its backfill runs, written
    instead of `agent` and `runs`.
    """

    group_id: str
    expected_turns: int
    agent: Agent
    persona: Block
    persona_source: BlockSource
    runs: list[Run]
    at: datetime
    backfill: Callable[[int], tuple[Agent, list[Run]]] | None = None


@dataclass(frozen=True, slots=True)
class AgentLeave:
    """A sleeptime agent taken out of its live group at `turns` (its rows stay).

    Refused (StaleTurn) unless the group is still at `turns`."""

    group_id: str
    agent_id: str
    turns: int
    at: datetime
