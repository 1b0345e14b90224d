"""Admission: the runtime's bounds on turns, in flight per runtime and queued per group.

Every turn (`step`, `stream`, `record_turn`, from either API) is admitted before it is sent
to its group. It takes a place in its group's queue, or is refused with `GroupBusy` when
the group already has `max_queued_turns` turns queued; then it needs one of the runtime's
`max_turns_in_flight` permits. A turn that finds none waits for one, first come first
served: the permit of a turn that ends passes straight to the oldest waiter. A caller that
gives up (timeout, cancellation) withdraws its ticket, which frees its place and any permit
it was given; once sent, a turn keeps both until its reply is done, whatever its caller
does. So no place and no permit is ever lost.

Waiting is the caller's business: the admission calls back (in the thread that freed the
permit) and holds no thread of its own, so a thread can wait on an event and a coroutine
on its loop.

Example:
    >>> ticket = admission.admit("group-1")          # GroupBusy if the group is full
    >>> if not ticket.granted:
    ...     ticket.when_granted(permit.set)            # a thread: permit = threading.Event()
    >>> if ticket.send():                             # False if it was withdrawn meanwhile
    ...     reply.add_done_callback(ticket.end)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from messages import GroupBusy


class Verdict(Enum):
    """What a turn that asks to be admitted gets."""

    GRANTED = "granted"
    """A permit at once: send it."""
    WAIT = "wait"
    """A place in its group's queue, and a wait for a permit."""
    BUSY = "busy"
    """Nothing: its group is full (`GroupBusy`)."""


def decide_admission(
    queued: int, in_flight: int, max_queued: int | None, max_in_flight: int | None
) -> Verdict:
    """Whether a turn is admitted, given its group's queued turns and the runtime's turns
    in flight (None: no bound)."""
    if max_queued is not None and queued >= max_queued:
        return Verdict.BUSY
    if max_in_flight is not None and in_flight >= max_in_flight:
        return Verdict.WAIT
    return Verdict.GRANTED


def permit_wait(permit_timeout: float | None, deadline: float | None) -> float | None:
    """How long a caller waits for a permit: `permit_timeout`, cut to its own deadline
    (`time.monotonic()`); None for ever."""
    if deadline is None:
        return permit_timeout
    remaining = max(0.0, deadline - time.monotonic())
    return remaining if permit_timeout is None else min(permit_timeout, remaining)


class _State(Enum):
    WAITING = 0  # has a place in its group's queue, waits for a permit
    GRANTED = 1  # holds a permit, not sent yet
    SENT = 2  # sent: its place and permit are freed when its reply is done
    DONE = 3  # ended or withdrawn: holds nothing


class TurnTicket:
    """One turn's admission, from `admit` until its turn ends or its caller withdraws."""

    __slots__ = ("_admission", "_on_grant", "_state", "group_id")

    def __init__(self, admission: TurnAdmission, group_id: str, granted: bool) -> None:
        self._admission = admission
        self.group_id = group_id
        self._state = _State.GRANTED if granted else _State.WAITING
        self._on_grant: Callable[[], None] | None = None

    @property
    def granted(self) -> bool:
        """Whether it holds a permit (sent or not)."""
        return self._state in (_State.GRANTED, _State.SENT)

    def when_granted(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once it holds a permit: now if it does, else in the thread
        that frees one. It must not block; a waiter that is gone withdraws the ticket."""
        self._admission._when_granted(self, callback)

    def send(self) -> bool:
        """It is (being) sent: from now on only `end` frees it (calling it again changes
        nothing). False if it was withdrawn or holds no permit: then it must not be sent."""
        return self._admission._send(self)

    def withdraw(self) -> None:
        """Its caller gives up before sending: free its place and permit (none once sent)."""
        self._admission._withdraw(self)

    def end(self, _reply: Any = None) -> None:
        """Its turn ended (its reply is done): free its place and permit. Idempotent, and
        usable as a future's done callback."""
        self._admission._end(self)


class TurnAdmission:
    """The bounds on turns in flight per runtime and queued per group (None: no bound).

    `permit_timeout` is how long a caller waits for a permit before `RuntimeBusy` (None:
    for ever); the admission keeps it for the callers, it never waits itself. Safe to use
    from any thread.
    """

    def __init__(
        self,
        max_in_flight: int | None,
        max_queued: int | None,
        permit_timeout: float | None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.permit_timeout = permit_timeout
        self._lock = threading.Lock()
        self._in_flight = 0
        self._queued: dict[str, int] = {}
        self._waiting: deque[TurnTicket] = deque()  # oldest first; withdrawn ones skipped
        self._waiting_count = 0

    def admit(self, group_id: str) -> TurnTicket:
        """Take a place in the group's queue and a permit, or a place in the permits'
        line. Raises GroupBusy when the group already has `max_queued` turns queued."""
        with self._lock:
            queued = self._queued.get(group_id, 0)
            verdict = decide_admission(queued, self._in_flight, self.max_queued, self.max_in_flight)
            if verdict is Verdict.BUSY:
                assert self.max_queued is not None
                raise GroupBusy(group_id, self.max_queued)
            self._queued[group_id] = queued + 1
            ticket = TurnTicket(self, group_id, granted=verdict is Verdict.GRANTED)
            if verdict is Verdict.GRANTED:
                self._in_flight += 1
            else:
                self._waiting.append(ticket)
                self._waiting_count += 1
            return ticket

    def counts(self) -> dict[str, int]:
        """Turns holding a permit, and turns waiting for one."""
        with self._lock:
            return {"turns_in_flight": self._in_flight, "turns_waiting": self._waiting_count}

    def queued(self, group_id: str) -> int:
        """The group's turns admitted and not ended (waiting, in flight)."""
        with self._lock:
            return self._queued.get(group_id, 0)

    # -- the tickets' side ----------------------------------------------------------------

    def _when_granted(self, ticket: TurnTicket, callback: Callable[[], None]) -> None:
        with self._lock:
            if ticket._state is _State.WAITING:
                ticket._on_grant = callback
                return
            granted = ticket._state is _State.GRANTED
        if granted:
            callback()

    def _send(self, ticket: TurnTicket) -> bool:
        with self._lock:
            if ticket._state is _State.GRANTED:
                ticket._state = _State.SENT
            return ticket._state is _State.SENT

    def _withdraw(self, ticket: TurnTicket) -> None:
        with self._lock:
            state = ticket._state
            if state is _State.WAITING:
                self._waiting_count -= 1
                self._leave(ticket)  # left in the line, skipped when its turn comes
                return
            if state is not _State.GRANTED:
                return  # sent (its reply frees it) or done already
            self._leave(ticket)
            granted = self._release()
        if granted is not None:
            granted()

    def _end(self, ticket: TurnTicket) -> None:
        with self._lock:
            if ticket._state is not _State.SENT:
                return
            self._leave(ticket)
            granted = self._release()
        if granted is not None:
            granted()

    def _leave(self, ticket: TurnTicket) -> None:
        """With the lock held: the ticket holds nothing any more; its group has one less."""
        ticket._state = _State.DONE
        ticket._on_grant = None
        left = self._queued[ticket.group_id] - 1
        if left:
            self._queued[ticket.group_id] = left
        else:
            del self._queued[ticket.group_id]

    def _release(self) -> Callable[[], None] | None:
        """With the lock held: a permit is free. It passes to the oldest waiter, whose
        callback (if it asked for one yet) is returned, to be called without the lock."""
        while self._waiting:
            ticket = self._waiting.popleft()
            if ticket._state is _State.WAITING:
                break
        else:
            self._in_flight -= 1
            return None
        self._waiting_count -= 1
        ticket._state = _State.GRANTED
        callback, ticket._on_grant = ticket._on_grant, None
        return callback
