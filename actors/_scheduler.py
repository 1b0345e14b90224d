"""One timer thread for the whole runtime: run deadlines, restarts, passivation checks."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from messages._log import get_logger

log = get_logger("sleeptime.scheduler")

COMPACT_AT_LEAST = 64
"""Cancelled timers are swept out of the heap once they are this many, and more than the
live ones: memory stays within twice what is scheduled, at an amortized O(log n) cost."""


def _nothing() -> None:
    """What a cancelled timer would call: it drops its function at once."""


class Timer:
    """A scheduled call; `cancel()` makes sure it does not run, and frees it."""

    __slots__ = ("_queued", "_scheduler", "cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None], scheduler: Scheduler) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False
        self._scheduler = scheduler
        self._queued = True  # in the heap (changed under the scheduler's lock)

    def cancel(self) -> None:
        self._scheduler._cancel(self)


class Scheduler:
    """Calls functions after a delay, on its own thread; the functions must be quick.

    A cancelled timer leaves the heap soon (see `COMPACT_AT_LEAST`), so timers of runs
    that ended long before their deadline do not pile up.

    Example:
        >>> timer = scheduler.call_later(600.0, lambda: actor.tell(RunDeadline(...)))
        >>> timer.cancel()
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._cancelled = 0  # cancelled timers still in the heap
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sleeptime-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay), fn, self)
        with self._wake:
            heapq.heappush(self._heap, (timer.when, next(self._order), timer))
            # The timer thread sleeps until the earliest timer: wake it only if this one
            # is now the earliest (a run's deadline, minutes away, rarely is).
            if self._heap[0][2] is timer:
                self._wake.notify()
        return timer

    def pending(self) -> int:
        """How many timers are scheduled and not cancelled."""
        with self._wake:
            return len(self._heap) - self._cancelled

    def held(self) -> int:
        """How many timers the heap holds, cancelled ones not yet swept out included."""
        with self._wake:
            return len(self._heap)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(5)

    def _cancel(self, timer: Timer) -> None:
        with self._wake:
            if timer.cancelled:
                return
            timer.cancelled = True
            timer.fn = _nothing  # what it held (a message, an actor's address) is freed now
            if not timer._queued:
                return  # already taken off the heap to run
            self._cancelled += 1
            if self._cancelled >= COMPACT_AT_LEAST and self._cancelled > len(self._heap) // 2:
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed:
                    if self._heap and self._heap[0][0] <= self._clock():
                        break
                    timeout = self._heap[0][0] - self._clock() if self._heap else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                _, _, timer = heapq.heappop(self._heap)
                timer._queued = False
                if timer.cancelled:
                    self._cancelled -= 1
                    continue
                fn = timer.fn
            try:
                fn()
            except Exception:
                log.exception("scheduled_call_failed")
