"""Runs: statuses, stop reasons, the state machine, and the records callers read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any

from pydantic import BaseModel, ConfigDict

from messages._errors import TransitionRefused


class RunStatus(StrEnum):
    """Where a run is in its life; the last three are terminal."""

    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


class StopReason(StrEnum):
    """Why a run ended (or, for `interrupted`, why it was re-queued)."""

    END_TURN = "end_turn"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    MAX_STEPS = "max_steps"


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})

# The whole state machine of SPEC 6. running -> created is the re-queue after an interruption.
ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.CREATED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CREATED}
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


def check_transition(run_id: str, current: RunStatus, new: RunStatus) -> None:
    """Raise `TransitionRefused` unless `current -> new` is a legal step of a run."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise TransitionRefused(run_id, current.value, new.value)


def is_legal_history(statuses: Sequence[RunStatus | str]) -> bool:
    """True when a run's recorded statuses, oldest first, are a path of the state machine."""
    try:
        path = [RunStatus(s) for s in statuses]
    except ValueError:
        return False
    if not path or path[0] is not RunStatus.CREATED:
        return False
    return all(b in ALLOWED_TRANSITIONS[a] for a, b in pairwise(path))


class Run(BaseModel):
    """One sleeptime agent processing one transcript window."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    group_id: str
    agent_id: str
    status: RunStatus
    stop_reason: StopReason | None = None
    attempt: int = 1
    turn: int
    window_first_seq: int
    window_last_seq: int
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    metadata: dict[str, Any] = {}


class RunEvent(BaseModel):
    """One recorded status change of a run; `id` orders a run's events (and is the
    cursor `run_events(run_id, after=...)` takes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_id: str
    status: RunStatus
    at: datetime
    attempt: int
    reason: str | None = None
    id: int | None = None
