"""One timer thread for the whole runtime: run deadlines now, restarts and idling later."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("sleeptime.scheduler")


class Timer:
    """A scheduled call; `cancel()` makes sure it does not run."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Calls functions after a delay, on its own thread; the functions must be quick.

    Example:
        >>> timer = scheduler.call_later(600.0, lambda: actor.tell(RunDeadline(...)))
        >>> timer.cancel()
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sleeptime-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay), fn)
        with self._wake:
            heapq.heappush(self._heap, (timer.when, next(self._order), timer))
            self._wake.notify()
        return timer

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(5)

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
            if timer.cancelled:
                continue
            try:
                timer.fn()
            except Exception:
                log.exception("scheduled_call_failed")
