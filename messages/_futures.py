"""The futures the runtime's threads hand each other, and completing them safely.

`Reply` is a `concurrent.futures.Future` (the same methods, the same errors, accepted
wherever one is) built for the hot path: a turn and its run pass through about seven, and
the standard future allocates a `Condition` each (an `RLock`, a deque, a waiters' list,
five bound methods) and takes it three times. A `Reply` holds two plain locks: its gate,
locked while pending and released once done, so a waiter blocks on it and passes it on;
and its guard, held for the few instructions of a state change. (One guard shared by
every reply was a convoy: dozens of threads completing unrelated replies queued behind
whichever of them the interpreter had switched out while it held the guard.)
`concurrent.futures.wait` reads the standard future's private fields and cannot wait on
it: `wait_all` waits on any mix of futures. `Flag` is a `threading.Event` built the same
way, for the two flags every run gets (its cancel flag and its step's deadline).

`if not future.done(): future.set_result(x)` is a race: the caller can cancel between the
check and the set, and the set then raises `InvalidStateError` in the thread that was
only trying to report. `resolve` and `reject` are the one place that completes a caller's
future; a future already done (cancelled, or completed by someone else) is left alone.

Example:
    >>> reply: Future[int] = Reply()
    >>> resolve(reply, 7)                 # False if the caller had given up
    True
    >>> reply.result(timeout=1)
    7
"""

from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, TypeVar

T = TypeVar("T")

_PENDING, _RUNNING, _CANCELLED, _NOTIFIED, _FINISHED = range(5)  # _NOTIFIED: cancelled, and
# the worker was told (`set_running_or_notify_cancel`), as the standard future tells them apart
_NAMES = ("pending", "running", "cancelled", "cancelled", "finished")
_LOG = logging.getLogger("concurrent.futures")  # where the standard future reports too


class Reply(Future[T]):
    """A future with the standard one's behaviour and a fraction of its weight."""

    __slots__ = ("_callbacks", "_error", "_gate", "_guard", "_status", "_value")

    def __init__(self) -> None:  # (the base's __init__ would build what this one avoids)
        self._gate = _thread.allocate_lock()
        self._gate.acquire()  # held while pending: waiters block on it
        # Guards the state changes; held for a few instructions, never while waiting or
        # calling back.
        self._guard = _thread.allocate_lock()
        self._status = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], object]] | None = None

    def __repr__(self) -> str:
        return f"<Reply at {id(self):#x} state={_NAMES[self._status]}>"

    # -- the caller's side ----------------------------------------------------------------

    def cancel(self) -> bool:
        with self._guard:
            if self._status in (_RUNNING, _FINISHED):
                return False
            if self._status in (_CANCELLED, _NOTIFIED):
                return True
            self._status = _CANCELLED
            callbacks = self._open_gate()
        self._call_back(callbacks)
        return True

    def cancelled(self) -> bool:
        return self._status in (_CANCELLED, _NOTIFIED)

    def running(self) -> bool:
        return self._status == _RUNNING

    def done(self) -> bool:
        return self._status >= _CANCELLED

    def result(self, timeout: float | None = None) -> T:
        if not self._wait(timeout):
            raise TimeoutError()
        if self._status != _FINISHED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._wait(timeout):
            raise TimeoutError()
        if self._status != _FINISHED:
            raise CancelledError()
        return self._error

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        with self._guard:
            if self._status < _CANCELLED:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        self._call_back([fn])

    # -- the worker's side ----------------------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        with self._guard:
            if self._status == _CANCELLED:
                self._status = _NOTIFIED
                return False
            if self._status == _PENDING:
                self._status = _RUNNING
                return True
        raise RuntimeError(f"{self!r} in unexpected state")

    def set_result(self, result: T) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    # -- inside ---------------------------------------------------------------------------

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with self._guard:
            if self._status >= _CANCELLED:
                raise InvalidStateError(f"{_NAMES[self._status]}: {self!r}")
            self._value, self._error, self._status = value, error, _FINISHED
            callbacks = self._open_gate()
        self._call_back(callbacks)

    def _open_gate(self) -> list[Callable[[Future[T]], object]] | None:
        """Let the waiters through; the callbacks to call (with the guard held)."""
        self._gate.release()
        callbacks, self._callbacks = self._callbacks, None
        return callbacks

    def _call_back(self, callbacks: list[Callable[[Future[T]], object]] | None) -> None:
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                _LOG.exception("exception calling callback for %r", self)

    def _wait(self, timeout: float | None) -> bool:
        """Whether it is done within `timeout` seconds (None: however long it takes)."""
        if self._status >= _CANCELLED:
            return True
        gate = self._gate
        if timeout is None:
            gate.acquire()
        elif not (gate.acquire(timeout=timeout) if timeout > 0 else gate.acquire(False)):
            return False
        gate.release()  # the next waiter's turn
        return True


class Flag(threading.Event):
    """A `threading.Event` with one plain lock as its gate (locked while down)."""

    __slots__ = ("_gate", "_guard", "_up")

    def __init__(self) -> None:  # (the base's __init__ would build a Condition)
        self._gate = _thread.allocate_lock()
        self._gate.acquire()
        self._guard = _thread.allocate_lock()
        self._up = False

    def __repr__(self) -> str:
        return f"<Flag at {id(self):#x}: {'set' if self._up else 'unset'}>"

    def _at_fork_reinit(self) -> None:
        self._gate = _thread.allocate_lock()
        self._guard = _thread.allocate_lock()
        if not self._up:
            self._gate.acquire()

    def is_set(self) -> bool:
        return self._up

    def set(self) -> None:
        with self._guard:
            if not self._up:
                self._up = True
                self._gate.release()

    def clear(self) -> None:
        with self._guard:
            if self._up:
                self._up = False
                self._gate.acquire()  # (a waiter passing through holds it a moment at most)

    def wait(self, timeout: float | None = None) -> bool:
        if self._up:
            return True
        gate = self._gate
        if timeout is None:
            gate.acquire()
        elif not (gate.acquire(timeout=timeout) if timeout > 0 else gate.acquire(False)):
            return self._up
        gate.release()
        return True


def wait_all(futures: Sequence[Future[Any]], timeout: float | None = None) -> list[Future[Any]]:
    """Wait until every future is done or `timeout` seconds passed; those not done, in
    order (`concurrent.futures.wait` for any mix of standard futures and replies).

    The waiting thread is woken once, by the last of them to complete, not once per
    future (waking a thread costs more than anything else a hand-off does)."""
    pending = [future for future in futures if not future.done()]
    if pending:
        _AllDone(pending).wait(timeout)
    return [future for future in futures if not future.done()]


class _AllDone:
    """A flag raised once each of some futures is done (counted by their callbacks)."""

    __slots__ = ("_done", "_guard", "_left")

    def __init__(self, futures: Sequence[Future[Any]]) -> None:
        self._done = Flag()
        self._guard = _thread.allocate_lock()
        self._left = len(futures)
        for future in futures:
            future.add_done_callback(self._one_done)  # (at once, if done meanwhile)

    def _one_done(self, _: Future[Any]) -> None:
        with self._guard:
            self._left -= 1
            last = self._left == 0
        if last:
            self._done.set()

    def wait(self, timeout: float | None) -> None:
        self._done.wait(timeout)


def resolve(future: Future[T], value: T) -> bool:
    """Give `future` its result; False if it was already done or cancelled."""
    try:
        future.set_result(value)
    except InvalidStateError:
        return False
    return True


def reject(future: Future[T], error: BaseException) -> bool:
    """Give `future` its exception; False if it was already done or cancelled."""
    try:
        future.set_exception(error)
    except InvalidStateError:
        return False
    return True
