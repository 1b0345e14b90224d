"""Group commit: one writer thread runs queued writes, many per transaction.

A caller submits a write and gets a future that resolves only after the transaction
holding it committed, so a call that returns has committed what it reports.

Two kinds of write go through it. An op, `op(connection)`, is any function, run as it
is; an op submitted with `keys` promises to touch only the rows those keys name, so the
merged writes around it need not be flushed before it runs. A `Write` says what it
changes as data: at most one guarded UPDATE that must hit exactly one row, then rows to
insert, then messages to append to agents' histories. The writes of one batch that touch
different rows are merged: one statement per kind for all of them (an executemany), which
is what makes a batch of a hundred turns cost a handful of statements instead of a
thousand. Those statements go through a `FastExecutor` (`_fastsql.py`): the SQL, values,
errors and rowcount of `Connection.execute`, with less of the writer's time per row.

A `Planned` write is decided in the writer thread, inside the transaction: its `plan`
reads what it needs (from the transaction's `Txn.scratch`, from what the owner knows is
committed, or from the database when `Txn.exact`) and returns the `Write` to merge. That is
how a read-modify-write such as a memory edit joins the merged statements instead of
costing a round trip of its own. `Txn.on_commit` callbacks run once the transaction
committed, before any caller hears of it: the owner's knowledge of what is committed moves
only there.

The writer keeps one connection for its whole life. A transaction that failed because
the connection was lost, before its COMMIT was sent, is run once more on a new
connection (nothing of it was stored); a failure during the COMMIT is reported, since its
outcome is unknown. On PostgreSQL, what this process may still write is decided per
transaction by its fence (the leases of its shards), not by its connection.

When a guard of a merged batch misses (a run that moved meanwhile), the batch is rolled
back and run again write by write in one transaction, and only the refused write fails.
When a statement fails, the batch is rolled back and its writes are run again one per
transaction, so one bad write never takes others down with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Delete, Engine, Insert, Update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from messages import RuntimeStopped, StoreUnavailable
from messages._futures import Reply, reject, resolve
from messages._log import get_logger
from persistence._fastsql import FastExecutor
from persistence._models import utcnow
from persistence._observed import NO_STORE_OBSERVER, StoreObserver

T = TypeVar("T")
Op = Callable[[Connection], T]
Rows = list[dict[str, Any]]
Numberer = Callable[[Connection, Rows, "Txn"], Rows]
Lease = tuple[int, int]
"""(shard, epoch): the lease a write is fenced by."""
Fence = Callable[[Connection, set[Lease]], dict[Lease, Exception]]

log = get_logger("sleeptime.committer")


class Write:
    """A write the committer may merge with the other writes of its batch.

    - `guard`: an UPDATE (or DELETE) and its parameters that must change exactly one
      row; if it does not, nothing of this write is stored and its future fails with `refusal()`;
    - `inserts`: (INSERT, rows) pairs, inserted in the order of the tables' dependencies;
    - `appends`: message rows without a sequence, numbered after their agent's stored
      history inside the transaction;
    - `keys`: the rows this write changes; writes sharing a key are never merged, so
      their order is kept;
    - `lease`: (shard, epoch), the lease of the group it writes for, if the committer
      fences writes (see `Committer`): refused unless this process still holds that shard
      at that epoch when the transaction runs;
    - `stamp`: rows (of `guard` or `inserts`) whose `"at"` is the time the writer takes
      the write, as it plans the writes around it: a time in the order of the commits,
      not of the queueing (the write's future resolves with that time, also in `at`);
    - `after`: futures of writes queued before this one that it depends on, and the
      error it fails with (nothing of it stored) if one of them failed. Queued earlier,
      each either failed already or commits in this write's transaction.
    """

    __slots__ = (
        "after",
        "appends",
        "at",
        "guard",
        "inserts",
        "keys",
        "lease",
        "refusal",
        "stamp",
    )

    def __init__(
        self,
        *,
        guard: tuple[Update | Delete, dict[str, Any]] | None = None,
        refusal: Callable[[], Exception] | None = None,
        inserts: Sequence[tuple[Insert, Rows]] = (),
        appends: Rows | None = None,
        keys: Sequence[str] = (),
        lease: Lease | None = None,
        stamp: Sequence[dict[str, Any]] = (),
        after: tuple[Sequence[Future[Any]], Callable[[], Exception]] | None = None,
    ) -> None:
        if (guard is None) != (refusal is None):
            raise ValueError("a guarded write needs a refusal, and a refusal needs a guard")
        self.guard = guard
        self.refusal = refusal
        self.inserts = [(statement, rows) for statement, rows in inserts if rows]
        self.appends = appends or []
        self.keys = keys
        self.lease = lease
        self.stamp = stamp
        self.after = after
        self.at: datetime | None = None

    def unmet(self) -> Exception | None:
        """The error this write fails with if a write it depends on failed, else None."""
        if self.after is None:
            return None
        futures, error = self.after
        for future in futures:
            if future.done() and future.exception() is not None:
                return error()
        return None

    def taken(self) -> datetime | None:
        """The writer takes this write now: stamp its rows; their time."""
        if self.stamp:
            self.at = at = utcnow()
            for row in self.stamp:
                row["at"] = at
        return self.at


class Txn:
    """What the work of one transaction shares.

    - `exact`: True when work runs write by write (after a merged batch was refused), so
      a plan must read the database rather than trust what it remembers;
    - `scratch`: state that holds until the transaction ends (e.g. a block's value after
      an earlier edit of the same transaction);
    - `on_commit(callback)`: run `callback` in the writer thread once the transaction
      committed (never if it rolls back).
    """

    __slots__ = ("_after", "exact", "scratch")

    def __init__(self, *, exact: bool) -> None:
        self.exact = exact
        self.scratch: dict[str, Any] = {}
        self._after: list[Callable[[], None]] = []

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._after.append(callback)

    def committed(self) -> None:
        for callback in self._after:
            callback()


class Planned(Generic[T]):
    """A write decided in the writer thread: `plan(connection, txn)` returns the `Write`
    to merge (or None: nothing to write) and what the caller's future resolves with.

    `keys` name every row the plan reads or its write changes, so it runs after any
    queued write that shares one. An exception a plan returns as its result reaches the
    caller without rolling anything back; one it raises fails the transaction.
    """

    __slots__ = ("keys", "lease", "plan")

    def __init__(
        self,
        plan: Callable[[Connection, Txn], tuple[Write | None, T]],
        keys: Sequence[str],
        lease: Lease | None = None,
    ) -> None:
        self.plan = plan
        self.keys = keys
        self.lease = lease


Work = Callable[[Connection], Any] | Write | Planned[Any]


class _GuardMissed(Exception):
    """A merged guard changed fewer rows than it had writes: run the batch one by one."""


class _Job:
    __slots__ = ("future", "keys", "lease", "work")

    def __init__(
        self,
        work: Work,
        future: Future[Any],
        keys: Sequence[str] | None,
        lease: Lease | None = None,
    ) -> None:
        self.work = work
        self.future = future
        # None: an op that may touch any row, so every write before it is flushed first.
        self.keys = work.keys if isinstance(work, Write | Planned) else keys
        self.lease = work.lease if isinstance(work, Write | Planned) else lease


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
        fence: Fence | None = None,
        observer: StoreObserver = NO_STORE_OBSERVER,
    ) -> None:
        """`insert_order`: the INSERTs in an order that respects foreign keys (parents
        first); `append`: the INSERT of messages and the function that numbers rows to
        append, (connection, rows, txn) -> rows with their `sequence`;
        `fence`: (connection, leases) -> {lease: error} for the (shard, epoch) leases
        this process no longer holds, run first in every transaction that writes under
        a lease (the work under a refused lease fails with its error, the rest commits);
        `observer`: told of every batch committed. An outage (the database out of reach)
        is logged as it begins (`store_unavailable`) and ends (`store_recovered`)."""
        self._engine = engine
        self._fast = FastExecutor(engine.dialect)
        self._translate = translate
        self._append = append
        self._rank = {id(statement): i for i, statement in enumerate(insert_order)}
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._connection: Connection | None = None  # the writer's own, held across batches
        self._fence = fence
        self._observer = observer
        self._away_since: float | None = None  # when an outage began (time.monotonic())
        self.transactions = 0
        self.ops = 0
        self.statements = 0
        self._thread = threading.Thread(target=self._loop, name="sleeptime-committer", daemon=True)
        self._thread.start()

    def submit(
        self,
        work: Op[T] | Write | Planned[T],
        keys: Sequence[str] | None = None,
        lease: Lease | None = None,
    ) -> Future[T]:
        """Queue `work`; its future resolves with its result once it is committed
        (an op's return value; None for a `Write`; a plan's result for a `Planned`).

        `keys` (ops only; the others carry their own): the only rows the op reads or
        changes, named as writes name them. Such an op runs where it stands in its batch,
        before the merged writes queued ahead of it unless one of them shares a key.
        `lease` (ops only): the (shard, epoch) the op writes under, fenced as a write's.
        """
        if (keys is not None or lease is not None) and isinstance(work, Write | Planned):
            raise ValueError(f"a {type(work).__name__} carries its own keys and lease")
        if isinstance(work, Write) and work.appends and self._append is None:
            raise ValueError("this committer was made without an appender")
        future: Future[T] = Reply()
        with self._close_lock:
            if self._closed:
                raise RuntimeStopped()
            self._queue.put(_Job(work, future, keys, lease))
        return future

    def run(self, work: Op[T] | Planned[T], keys: Sequence[str] | None = None) -> T:
        """Submit `work` and wait for its commit."""
        return self.submit(work, keys).result()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self._disconnect()

    def _serve(self) -> None:
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
        except _OutcomeUnknown as unknown:
            self._fail_all(live, unknown)
            return
        except _GuardMissed:
            try:
                outcomes = self._transaction(live, merged=False)
            except _OutcomeUnknown as unknown:
                self._fail_all(live, unknown)
                return
            except Exception:
                self._each_alone(live)
                return
        except Exception as error:
            if len(live) > 1 or not _unreachable(error):
                # Alone, and exactly: a merged plan may have trusted a wrong memory.
                self._each_alone(live)
                return
            self._fail(live[0], error)
            return
        for job, (ok, value) in zip(live, outcomes, strict=True):
            _settle(job, ok, value)

    def _each_alone(self, jobs: list[_Job]) -> None:
        for index, job in enumerate(jobs):
            try:
                ((ok, value),) = self._transaction([job], merged=False)
            except Exception as error:
                self._fail(job, error)
                if _unreachable(error):
                    # The database is out of reach: the others would only wait for the
                    # same answer, one connect timeout each.
                    for rest in jobs[index + 1 :]:
                        self._fail(rest, error)
                    return
                continue
            _settle(job, ok, value)

    def _fail_all(self, jobs: list[_Job], unknown: _OutcomeUnknown) -> None:
        """The batch's COMMIT may or may not have landed: running its writes again could
        apply them twice (or refuse one as if another had moved its row), so each fails
        as the outage it is; its caller reads back what the store holds before going on."""
        log.warning("commit_outcome_unknown", writes=len(jobs), error=str(unknown.error))
        for job in jobs:
            self._fail(job, unknown)

    def _fail(self, job: _Job, error: Exception) -> None:
        if isinstance(error, _OutcomeUnknown):
            error = error.error
        log.debug("write_failed", error=str(error), error_type=type(error).__name__)
        translated = self._translate(error)
        if self._away_since is None and isinstance(translated, StoreUnavailable):
            self._away_since = time.monotonic()
            log.warning("store_unavailable", error=str(translated))
        reject(job.future, translated)

    def _reached(self) -> None:
        """A transaction committed: an outage, if there was one, is over."""
        if self._away_since is not None:
            outage, self._away_since = time.monotonic() - self._away_since, None
            log.warning("store_recovered", outage_s=round(outage, 3))

    @property
    def queued(self) -> int:
        """Writes waiting for the writer thread (roughly: it may be taking some now)."""
        return self._queue.qsize()

    def _transaction(self, jobs: list[_Job], *, merged: bool) -> list[tuple[bool, Any]]:
        """Run the jobs in one transaction: (True, result) or (False, refusal) per job."""
        began = time.perf_counter()
        for attempt in (1, 2):
            connection = self._connect()
            txn = Txn(exact=not merged)
            transaction = connection.begin()
            try:
                refused = self._fenced(connection, jobs)
                live = [job for job in jobs if job.lease not in refused] if refused else jobs
                if merged:
                    done = self._merged(connection, live, txn)
                else:
                    done = [self._one(connection, job.work, txn) for job in live]
                outcomes = _with_refusals(jobs, refused, done)
            except BaseException as error:
                self._roll_back(transaction)
                if attempt == 1 and isinstance(error, DBAPIError) and error.connection_invalidated:
                    continue  # the connection was gone before COMMIT: nothing was stored
                raise
            try:
                transaction.commit()
            except BaseException as error:
                self._disconnect()  # a new connection next time
                if isinstance(error, Exception) and lost_connection(error):
                    raise _OutcomeUnknown(error) from error  # lost with its answer
                raise  # refused: nothing was stored
            self.transactions += 1
            self.ops += len(jobs)
            self._observer.batch_committed(len(jobs), time.perf_counter() - began)
            self._reached()
            txn.committed()
            return outcomes
        raise AssertionError("unreachable")

    def _fenced(self, connection: Connection, jobs: list[_Job]) -> dict[Lease, Exception]:
        """The leases of `jobs` this process no longer holds, with the error their work
        fails with; the lease rows stay locked until the transaction ends."""
        if self._fence is None:
            return {}
        leases = {job.lease for job in jobs if job.lease is not None}
        if not leases:
            return {}
        refused = self._fence(connection, leases)
        if refused:
            log.error("fenced_writes_refused", leases=sorted(refused))
        return refused

    def _connect(self) -> Connection:
        """The writer's connection: the one held, or a new one."""
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    def _roll_back(self, transaction: Any) -> None:
        try:
            transaction.rollback()
        except Exception:
            self._disconnect()
            return
        if self._connection is not None and self._connection.invalidated:
            self._disconnect()

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception as error:  # the connection is being given up anyway
                log.debug("close_failed", error=str(error))

    def _one(self, connection: Connection, work: Work, txn: Txn) -> tuple[bool, Any]:
        result = None
        if isinstance(work, Planned):
            planned, result = work.plan(connection, txn)
            if planned is None:
                return True, result
            work = planned
        elif not isinstance(work, Write):
            return True, work(connection)
        else:
            unmet = work.unmet()
            if unmet is not None:
                return False, unmet
            result = work.taken()
        if work.guard is not None:
            statement, params = work.guard
            self.statements += 1
            if self._fast.execute(connection, statement, [params]) != 1:
                assert work.refusal is not None
                return False, work.refusal()
        self._insert(connection, [work], txn)
        return True, result

    def _merged(self, connection: Connection, jobs: list[_Job], txn: Txn) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        segment: list[Write] = []
        keys: set[str] = set()
        for job in jobs:
            work = job.work
            if job.keys is None or not keys.isdisjoint(job.keys):
                # It may touch rows a queued write changes: those go first.
                self._flush(connection, segment, txn)
                segment, keys = [], set()
            keys.update(job.keys or ())
            if isinstance(work, Planned):
                planned, result = work.plan(connection, txn)
                if planned is not None:
                    segment.append(planned)
                outcomes.append((True, result))
            elif isinstance(work, Write):
                unmet = work.unmet()
                if unmet is not None:
                    outcomes.append((False, unmet))
                    continue
                segment.append(work)
                outcomes.append((True, work.taken()))
            else:
                outcomes.append((True, work(connection)))
        self._flush(connection, segment, txn)
        return outcomes

    def _flush(self, connection: Connection, writes: list[Write], txn: Txn) -> None:
        """Write rows changed by different writes: one statement per kind."""
        if not writes:
            return
        guards: dict[Update | Delete, list[dict[str, Any]]] = {}
        for write in writes:
            if write.guard is not None:
                guards.setdefault(write.guard[0], []).append(write.guard[1])
        for statement, params in guards.items():
            self.statements += 1
            if self._fast.execute(connection, statement, params) != len(params):
                raise _GuardMissed()
        self._insert(connection, writes, txn)

    def _insert(self, connection: Connection, writes: list[Write], txn: Txn) -> None:
        appends = [row for write in writes for row in write.appends]
        inserts: dict[Insert, Rows] = {}
        for write in writes:
            for statement, rows in write.inserts:
                inserts.setdefault(statement, []).extend(rows)
        if appends:
            assert self._append is not None
            statement, number = self._append
            inserts.setdefault(statement, []).extend(number(connection, appends, txn))
        for statement in sorted(inserts, key=lambda s: self._rank.get(id(s), len(self._rank))):
            self.statements += 1
            self._fast.execute(connection, statement, inserts[statement])


def _with_refusals(
    jobs: list[_Job], refused: dict[Lease, Exception], done: list[tuple[bool, Any]]
) -> list[tuple[bool, Any]]:
    """Every job's outcome in order: the fenced ones refused, the others as they ran."""
    if not refused:
        return done
    ran = iter(done)
    return [(False, refused[job.lease]) if job.lease in refused else next(ran) for job in jobs]


def _settle(job: _Job, ok: bool, value: Any) -> None:
    if ok:
        resolve(job.future, value)
    else:
        reject(job.future, value)


def _unreachable(error: Exception) -> bool:
    """Whether no other write could succeed now either: the database is out of reach."""
    if isinstance(error, _OutcomeUnknown):
        return True
    return lost_connection(error) or isinstance(error, StoreUnavailable)


class _OutcomeUnknown(Exception):
    """The connection was lost as the COMMIT went: the transaction may have landed."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def lost_connection(error: Exception) -> bool:
    """Whether the database could not be reached (trying again at once would not help).

    A SQLite file that cannot be written (read-only, on a read-only mount) is reachable:
    it refuses every write until someone changes it, so it is not an outage to wait out."""
    if not isinstance(error, DBAPIError):
        return False
    if str(getattr(error.orig, "sqlite_errorname", "")).startswith("SQLITE_READONLY"):
        return False
    return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)
