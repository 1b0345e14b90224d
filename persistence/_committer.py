"""Group commit: one writer thread runs queued writes, many per transaction.

A caller submits a write and gets a future that resolves only after the transaction
holding it committed, so a call that returns has committed what it reports.

Two kinds of write go through it. An op, `op(connection)`, is any function, run as it
is. A `Write` says what it changes as data: at most one guarded UPDATE that must hit
exactly one row, then rows to insert, then messages to append to agents' histories. The
writes of one batch that touch different rows are merged: one statement per kind for all
of them (an executemany), which is what makes a batch of a hundred turns cost a handful
of statements instead of a thousand.

When a guard of a merged batch misses (a run that moved meanwhile), the batch is rolled
back and run again write by write in one transaction, and only the refused write fails.
When a statement fails, the batch is rolled back and its writes are run again one per
transaction, so one bad write never takes others down with it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine, Insert, Update

from messages import RuntimeStopped

T = TypeVar("T")
Op = Callable[[Connection], T]
Rows = list[dict[str, Any]]
Numberer = Callable[[Connection, Rows], Rows]

log = structlog.get_logger("sleeptime.committer")


class Write:
    """A write the committer may merge with the other writes of its batch.

    - `guard`: an UPDATE and its parameters that must change exactly one row; if it does
      not, nothing of this write is stored and its future fails with `refusal()`;
    - `inserts`: (INSERT, rows) pairs, inserted in the order of the tables' dependencies;
    - `appends`: message rows without a sequence, numbered after their agent's stored
      history inside the transaction;
    - `keys`: the rows this write changes; writes sharing a key are never merged, so
      their order is kept.
    """

    __slots__ = ("appends", "guard", "inserts", "keys", "refusal")

    def __init__(
        self,
        *,
        guard: tuple[Update, dict[str, Any]] | None = None,
        refusal: Callable[[], Exception] | None = None,
        inserts: Sequence[tuple[Insert, Rows]] = (),
        appends: Rows | None = None,
        keys: Sequence[str] = (),
    ) -> None:
        if (guard is None) != (refusal is None):
            raise ValueError("a guarded write needs a refusal, and a refusal needs a guard")
        self.guard = guard
        self.refusal = refusal
        self.inserts = [(statement, rows) for statement, rows in inserts if rows]
        self.appends = appends or []
        self.keys = keys


class _GuardMissed(Exception):
    """A merged guard changed fewer rows than it had writes: run the batch one by one."""


class _Job:
    __slots__ = ("future", "work")

    def __init__(self, work: Op[Any] | Write, future: Future[Any]) -> None:
        self.work = work
        self.future = future


class Committer:
    """The single writer of one database.

    Example:
        >>> committer.submit(lambda connection: connection.execute(...)).result()
        >>> committer.submit(Write(inserts=[(insert(table), rows)])).result()
    """

    def __init__(
        self,
        engine: Engine,
        translate: Callable[[Exception], Exception] = lambda error: error,
        insert_order: Sequence[Insert] = (),
        append: tuple[Insert, Numberer] | None = None,
        max_batch: int = 512,
    ) -> None:
        """`insert_order`: the INSERTs in an order that respects foreign keys (parents
        first); `append`: the INSERT of messages and the function that numbers rows to
        append, (connection, rows) -> rows with their `sequence`."""
        self._engine = engine
        self._translate = translate
        self._append = append
        self._rank = {id(statement): i for i, statement in enumerate(insert_order)}
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.transactions = 0
        self.ops = 0
        self.statements = 0
        self._thread = threading.Thread(target=self._loop, name="sleeptime-committer", daemon=True)
        self._thread.start()

    def submit(self, work: Op[T] | Write) -> Future[T]:
        """Queue `work`; its future resolves with its result once it is committed
        (an op's return value; None for a `Write`)."""
        if isinstance(work, Write) and work.appends and self._append is None:
            raise ValueError("this committer was made without an appender")
        future: Future[T] = Future()
        with self._close_lock:
            if self._closed:
                raise RuntimeStopped()
            self._queue.put(_Job(work, future))
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
            outcomes = self._transaction(live, merged=True)
        except _GuardMissed:
            try:
                outcomes = self._transaction(live, merged=False)
            except Exception:
                self._each_alone(live)
                return
        except Exception as error:
            if len(live) > 1:
                self._each_alone(live)
                return
            self._fail(live[0], error)
            return
        for job, (ok, value) in zip(live, outcomes, strict=True):
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    def _each_alone(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                ((ok, value),) = self._transaction([job], merged=False)
            except Exception as error:
                self._fail(job, error)
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    def _fail(self, job: _Job, error: Exception) -> None:
        log.debug("write_failed", error=str(error), error_type=type(error).__name__)
        job.future.set_exception(self._translate(error))

    def _transaction(self, jobs: list[_Job], *, merged: bool) -> list[tuple[bool, Any]]:
        """Run the jobs in one transaction: (True, result) or (False, refusal) per job."""
        outcomes: list[tuple[bool, Any]] = []
        with self._engine.begin() as connection:
            if merged:
                outcomes = self._merged(connection, jobs)
            else:
                outcomes = [self._one(connection, job.work) for job in jobs]
        self.transactions += 1
        self.ops += len(jobs)
        return outcomes

    def _one(self, connection: Connection, work: Op[Any] | Write) -> tuple[bool, Any]:
        if not isinstance(work, Write):
            return True, work(connection)
        if work.guard is not None:
            statement, params = work.guard
            self.statements += 1
            if connection.execute(statement, params).rowcount != 1:
                assert work.refusal is not None
                return False, work.refusal()
        self._insert(connection, [work])
        return True, None

    def _merged(self, connection: Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        segment: list[Write] = []
        keys: set[str] = set()
        for job in jobs:
            work = job.work
            if isinstance(work, Write) and keys.isdisjoint(work.keys):
                segment.append(work)
                keys.update(work.keys)
                outcomes.append((True, None))
                continue
            self._flush(connection, segment)
            segment, keys = [], set()
            if isinstance(work, Write):
                segment.append(work)
                keys.update(work.keys)
                outcomes.append((True, None))
            else:
                outcomes.append((True, work(connection)))
        self._flush(connection, segment)
        return outcomes

    def _flush(self, connection: Connection, writes: list[Write]) -> None:
        """Write rows changed by different writes: one statement per kind."""
        if not writes:
            return
        guards: dict[Update, list[dict[str, Any]]] = {}
        for write in writes:
            if write.guard is not None:
                guards.setdefault(write.guard[0], []).append(write.guard[1])
        for statement, params in guards.items():
            self.statements += 1
            if connection.execute(statement, params).rowcount != len(params):
                raise _GuardMissed()
        self._insert(connection, writes)

    def _insert(self, connection: Connection, writes: list[Write]) -> None:
        appends = [row for write in writes for row in write.appends]
        inserts: dict[Insert, Rows] = {}
        for write in writes:
            for statement, rows in write.inserts:
                inserts.setdefault(statement, []).extend(rows)
        if appends:
            assert self._append is not None
            statement, number = self._append
            self.statements += 1
            inserts.setdefault(statement, []).extend(number(connection, appends))
        for statement in sorted(inserts, key=lambda s: self._rank.get(id(s), len(self._rank))):
            self.statements += 1
            connection.execute(statement, inserts[statement])
