"""Group commit: one writer thread runs queued write operations, many per transaction.

A caller submits `op(connection)` and gets a future that resolves only after the
transaction holding that op committed, so a call that returns has committed what it
reports. When an op fails, the batch is rolled back and its ops are run again one per
transaction, so one bad op never takes others down with it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine

from messages import RuntimeStopped

T = TypeVar("T")
Op = Callable[[Connection], T]

log = structlog.get_logger("sleeptime.committer")


class _Job:
    __slots__ = ("future", "op")

    def __init__(self, op: Op[Any], future: Future[Any]) -> None:
        self.op = op
        self.future = future


class Committer:
    """The single writer of one database.

    Example:
        >>> committer.submit(lambda connection: connection.execute(...)).result()
    """

    def __init__(
        self,
        engine: Engine,
        translate: Callable[[Exception], Exception] = lambda error: error,
        max_batch: int = 512,
    ) -> None:
        self._engine = engine
        self._translate = translate
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.transactions = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._loop, name="sleeptime-committer", daemon=True)
        self._thread.start()

    def submit(self, op: Op[T]) -> Future[T]:
        """Queue `op`; its future resolves with op's result once it is committed."""
        future: Future[T] = Future()
        with self._close_lock:
            if self._closed:
                raise RuntimeStopped()
            self._queue.put(_Job(op, future))
        return future

    def run(self, op: Op[T]) -> T:
        """Submit `op` and wait for its commit."""
        return self.submit(op).result()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._transaction(live)
        except Exception as error:
            if len(live) > 1:
                for job in live:
                    self._retry_alone(job)
                return
            log.debug("write_failed", error=str(error), error_type=type(error).__name__)
            live[0].future.set_exception(self._translate(error))
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _retry_alone(self, job: _Job) -> None:
        try:
            (result,) = self._transaction([job])
        except Exception as error:
            log.debug("write_failed", error=str(error), error_type=type(error).__name__)
            job.future.set_exception(self._translate(error))
        else:
            job.future.set_result(result)

    def _transaction(self, jobs: list[_Job]) -> list[Any]:
        with self._engine.begin() as connection:
            results = [job.op(connection) for job in jobs]
        self.transactions += 1
        self.ops += len(jobs)
        return results
