"""A bounded pool of daemon threads on which agents step (never a thread per run).

A step that overran its deadline can be abandoned: its thread is written off and a fresh
one takes its place, so a hung agent never shrinks the pool.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

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
        self._closed = False
        self.abandoned = 0
        for _ in range(workers):
            self._spawn()

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((fn, future))
        return future

    def abandon(self, future: Future[Any]) -> None:
        """Write off the thread running `future` (if it still runs) and start a new one."""
        if future.done():
            return
        with self._lock:
            if self._closed:
                return
            self.abandoned += 1
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
