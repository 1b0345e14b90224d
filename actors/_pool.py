"""A bounded pool of daemon threads on which agents step (never a thread per run).

A step that overran its deadline can be abandoned: a fresh thread takes its place at
once, so a hung agent never shrinks the pool, and the pool is one thread over its size
until some step returns, whereupon one thread leaves. So the pool holds `workers` threads
plus one per abandoned step that really has not returned yet, never more.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from messages._futures import Reply

T = TypeVar("T")


class StepPool:
    """Runs submitted callables on `workers` threads.

    Example:
        >>> pool = StepPool(8)
        >>> pool.submit(lambda: 42).result()
        42
    """

    def __init__(self, workers: int, name: str = "sleeptime-step") -> None:
        if workers < 1:
            raise ValueError("a step pool needs at least one worker")
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._excess = 0  # threads started for abandoned steps, to leave once a step returns
        self._given_up: weakref.WeakSet[Future[Any]] = weakref.WeakSet()  # abandoned once
        self._closed = False
        self.abandoned = 0
        for _ in range(workers):
            self._spawn()

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Reply()
        self._queue.put((fn, future))
        return future

    def abandon(self, future: Future[Any]) -> None:
        """Start a thread to stand in for the one running `future`, if it still runs.

        The first thread to finish a step afterwards leaves the pool (the abandoned one,
        or another if the abandoned step is still hung), so abandoning a step that then
        returns at once costs no thread for good. A step abandoned already is left as it is."""
        if future.done():
            return
        with self._lock:
            if self._closed or future in self._given_up:
                return
            self._given_up.add(future)
            self.abandoned += 1
            self._excess += 1
        self._spawn()

    def close(self) -> None:
        """Let idle workers exit; steps still running finish on their own (daemon threads)."""
        with self._lock:
            self._closed = True
            count = self._threads
        for _ in range(count):
            self._queue.put(None)

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                with self._lock:
                    self._threads -= 1
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)
            del fn, future, item  # a leaving thread keeps nothing of its last step alive
            with self._lock:
                if self._excess > 0:
                    self._excess -= 1
                    self._threads -= 1
                    return
