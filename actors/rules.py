"""The rules of SPEC 4-6, each one pure function: start here to find where a decision is made.

The actors only call these; `run.py` calls them too; nothing re-implements them.

- `decide_fire(frequency, counter)`: does this turn fire sleeptime, and the counter to store.
- `claim_window(...)`: which primary messages a firing turn hands over, the runs it creates
  (one per sleeptime agent, in the group's order) and where the cursor goes.
- `new_group(...)`: the state of a group before its first turn.
- `check_transition(run_id, current, new)`: is this run status change allowed (the state
  machine's table is `messages.ALLOWED_TRANSITIONS`).
- `after_interruption(attempt, max_attempts)`: a run found open after an actor or process
  crash is queued again with attempt + 1, or fails as `interrupted`.
- `render_transcript(window, preamble, max_messages)`: what a sleeptime agent receives
  (in `actors._transcript`).
- The memory tools' edits, `replace`, `insert`, `rethink` (in `actors._memory_tools`).

Example:
    >>> decide_fire(2, INITIAL_COUNTER)
    FireDecision(fired=True, counter=0)
    >>> after_interruption(attempt=3, max_attempts=3)
    GiveUp(error="interrupted 3 time(s), the group's max_attempts")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from actors._memory_tools import insert, replace, rethink
from actors._transcript import render_transcript
from messages import Group, GroupSettings, Message, Run, RunStatus
from messages._ids import new_id
from messages._runs import check_transition

INITIAL_COUNTER = -1
"""A new group's counter: with frequency N it fires on turns 1, N+1, 2N+1, ..."""

__all__ = [
    "INITIAL_COUNTER",
    "FireDecision",
    "GiveUp",
    "Requeue",
    "WindowClaim",
    "after_interruption",
    "backfill_runs",
    "backfill_windows",
    "check_transition",
    "claim_window",
    "decide_fire",
    "insert",
    "new_group",
    "render_transcript",
    "replace",
    "rethink",
]


# -- SPEC 4: when sleeptime fires ---------------------------------------------------------


class FireDecision(NamedTuple):
    fired: bool
    counter: int


def decide_fire(frequency: int | None, counter: int) -> FireDecision:
    """Decide one turn and return the counter to store.

    `None` fires every turn and `0` never does; both leave the counter as it is. `N >= 1`
    stores `(counter + 1) % N` and fires when that is 0, so from the initial -1 it fires on
    turns 1, N+1, 2N+1, ...

    >>> decide_fire(2, -1)
    FireDecision(fired=True, counter=0)
    >>> decide_fire(2, 0)
    FireDecision(fired=False, counter=1)
    """
    if frequency is None:
        return FireDecision(True, counter)
    if frequency == 0:
        return FireDecision(False, counter)
    if frequency < 0:
        raise ValueError(f"frequency must be None or >= 0, not {frequency}")
    stored = (counter + 1) % frequency
    return FireDecision(stored == 0, stored)


def new_group(
    group_id: str,
    primary_agent_id: str,
    sleeptime_agent_ids: Sequence[str],
    settings: GroupSettings,
    at: datetime,
) -> Group:
    """A group before its first turn: counter at `INITIAL_COUNTER`, no cursor, no turns."""
    return Group(
        id=group_id,
        primary_agent_id=primary_agent_id,
        sleeptime_agent_ids=list(sleeptime_agent_ids),
        counter=INITIAL_COUNTER,
        cursor=None,
        turns=0,
        created_at=at,
        updated_at=at,
        **settings.model_dump(),
    )


# -- SPEC 5: the window a firing turn claims ----------------------------------------------


class WindowClaim(NamedTuple):
    """What a turn hands over: its runs (none if it claims nothing) and the cursor after."""

    runs: list[Run]
    cursor: str | None
    cursor_seq: int


def claim_window(
    group: Group,
    cursor_seq: int,
    turn: int,
    recorded: Sequence[Message],
    fired: bool,
    produced: bool,
    at: datetime,
    make_id: Callable[[str], str] = new_id,
) -> WindowClaim:
    """The window a turn claims: every primary message after the cursor (`cursor_seq`)
    up to the last message it recorded, as one run per sleeptime agent, in the group's
    order; the cursor moves to that last message.

    A turn that did not fire claims nothing, and so does a firing turn whose primary
    agent produced nothing (`produced`): it consumes the fire, creates no run and leaves
    the cursor where it was. Claiming and creating the runs are committed together.
    """
    if not (fired and produced and recorded):
        return WindowClaim([], group.cursor, cursor_seq)
    last = recorded[-1]
    runs = [
        Run(
            id=make_id("run"),
            group_id=group.id,
            agent_id=agent_id,
            status=RunStatus.CREATED,
            attempt=1,
            turn=turn,
            window_first_seq=cursor_seq + 1,
            window_last_seq=last.sequence,
            created_at=at,
            metadata={"position": position},
        )
        for position, agent_id in enumerate(group.sleeptime_agent_ids)
    ]
    return WindowClaim(runs, last.id, last.sequence)


# -- SPEC 6: a run found open after an interruption ---------------------------------------


class Requeue(NamedTuple):
    """Queue the run again, as this attempt."""

    attempt: int


class GiveUp(NamedTuple):
    """Fail the run as `interrupted`, with this error."""

    error: str


def after_interruption(attempt: int, max_attempts: int) -> Requeue | GiveUp:
    """What becomes of a run that was `running` when its actor or process died.

    At-least-once: it is queued again with attempt + 1, unless it already used the
    group's `max_attempts`; then it fails with stop reason `interrupted`.

    >>> after_interruption(1, 3)
    Requeue(attempt=2)
    """
    if attempt >= max_attempts:
        return GiveUp(f"interrupted {attempt} time(s), the group's max_attempts")
    return Requeue(attempt + 1)


# -- groups over their life: an agent joining with backfill -------------------------------


def backfill_windows(first_seq: int, last_seq: int, size: int) -> list[tuple[int, int]]:
    """The windows that cover primary sequences [first_seq, last_seq] exactly once, in
    order, each of at most `size` messages (primary sequences have no gaps).

    >>> backfill_windows(1, 5, 2)
    [(1, 2), (3, 4), (5, 5)]
    >>> backfill_windows(4, 3, 2)
    []
    """
    if size < 1:
        raise ValueError(f"a backfill window holds at least one message, not {size}")
    return [
        (start, min(start + size - 1, last_seq)) for start in range(first_seq, last_seq + 1, size)
    ]


def backfill_runs(
    group: Group,
    agent_id: str,
    windows: Sequence[tuple[int, int]],
    at: datetime,
    make_id: Callable[[str], str] = new_id,
) -> list[Run]:
    """The runs of an agent joining with backfill, one per window, in order.

    Each is tagged `{"backfill": True, "position": i, "backfill_through": last}` (`last`
    the cursor at the join, where the backfill ends) and carries the group's turn count
    at the join as its `turn`: a later firing creates the agent's next run with a higher
    turn, so per agent, runs still execute in creation order.
    """
    through = windows[-1][1] if windows else 0
    return [
        Run(
            id=make_id("run"),
            group_id=group.id,
            agent_id=agent_id,
            status=RunStatus.CREATED,
            attempt=1,
            turn=group.turns,
            window_first_seq=first,
            window_last_seq=last,
            created_at=at,
            metadata={"backfill": True, "position": position, "backfill_through": through},
        )
        for position, (first, last) in enumerate(windows)
    ]
