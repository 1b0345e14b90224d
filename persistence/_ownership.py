"""One runtime owns a database at a time.

The lock is one the operating system or the server frees when its holder dies, even by
SIGKILL, so a crashed runtime never blocks the next start.

- SQLite: an exclusive `flock` on the database file itself, so every name of the file
  (a symlink, a hard link, a relative path) meets the same lock. Linux keeps `flock` locks
  apart from the POSIX locks SQLite takes, but a process loses *all* its POSIX locks on a
  file when it closes *any* descriptor of it: that would let another process delete the
  write-ahead log under a live owner. So each process opens a database file once, shares
  that descriptor between its stores, and closes it only when the last of them is done.
- PostgreSQL: a session-level advisory lock held by the writer's own connection. Every
  new connection of the writer takes it before its first use, so one that reconnects
  after a server restart holds it again, or finds another runtime holding it: then the
  ownership is lost for good, and every later write fails with `OwnershipLost`.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import URL, Connection, Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from messages import DatabaseInUse, OwnershipLost, StoreUnavailable
from persistence._engine import is_sqlite, redact, sqlite_file

log = structlog.get_logger("sleeptime.ownership")

ADVISORY_KEY = 0x5_1EE9_713E
"""The advisory lock key: any 64-bit number, the same for every sleeptime runtime."""
CHECK_INTERVAL_S = 1.0
"""How long an owner on PostgreSQL may write nothing before it checks its connection
(reconnecting, and so taking its lock again, after a server restart)."""
OWN_SESSION_WAIT_S = 5.0
"""How long a reconnecting writer waits for its own earlier session (one the server is
still ending, e.g. after pg_terminate_backend) to let go of the lock."""
APPLICATION_NAME_BYTES = 63  # PostgreSQL cuts application_name to this many bytes

_serials = count(1)


_COMPACT = "%Y%m%dT%H%M%SZ"  # in application_name, where bytes are few
_SHOWN = "%Y-%m-%d %H:%M:%SZ"


def _holder(pid: int, host: str, since: str) -> str:
    return f"pid {pid} on {host} since {since}"


# -- PostgreSQL ---------------------------------------------------------------------------

_NAMED = re.compile(r"sleeptime (\d+)\.\d+ (\d{8}T\d{6}Z) (.*)")


def application_name(pid: int, serial: int, since: str, host: str) -> str:
    """The writer's application_name: who owns the database, in at most 63 bytes.

    `serial` tells apart the owners one process had; the host, last, is what gets cut.
    """
    head = f"sleeptime {pid}.{serial} {since} "
    room = APPLICATION_NAME_BYTES - len(head.encode())
    return head + host.encode()[:room].decode(errors="ignore")


def describe_holder(name: str | None, backend: int | None, client: str | None) -> str:
    """Who holds the lock, from the holder's application_name (or its session)."""
    found = _NAMED.fullmatch(name or "")
    if found is not None:
        pid, since, host = found.groups()
        shown = datetime.strptime(since, _COMPACT).strftime(_SHOWN)
        return _holder(int(pid), host or "an unnamed host", shown)
    if backend is None:
        return "another runtime"
    return f"server session {backend} from {client or 'a local socket'}"


_FIND_HOLDER = (
    "SELECT a.application_name, a.pid, a.client_addr::text FROM pg_locks l "
    "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.objsubid = 1 AND (l.classid::bigint << 32 | l.objid::bigint) = %(key)s"
)


def _try_lock(dbapi_connection: Any, name: str) -> tuple[str | None, int | None, str | None] | None:
    """Take the lock on this session (named `name`): None if taken, else who holds it
    as (application_name, server pid, client address), all None if nobody could be seen."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('application_name', %(name)s, false), pg_try_advisory_lock(%(key)s)",
            {"name": name, "key": ADVISORY_KEY},
        )
        taken = cursor.fetchone()[1]
        found = None if taken else cursor.execute(_FIND_HOLDER, {"key": ADVISORY_KEY}).fetchone()
    dbapi_connection.commit()  # keeps the name; a session lock outlives its transaction
    if taken:
        return None
    return found or (None, None, None)


class _ServerLock:
    """The advisory lock, taken by each new connection of the writer engine."""

    def __init__(self, url: URL, writer: Engine) -> None:
        """Take the lock now, through `writer`: DatabaseInUse if another runtime has it."""
        self._url = redact(url)
        self._writer = writer
        since = datetime.now(UTC).strftime(_COMPACT)
        self._name = application_name(os.getpid(), next(_serials), since, socket.gethostname())
        self._taken = False  # once: a refusal is DatabaseInUse before, OwnershipLost after
        self._lost: str | None = None  # who took the database, once it is lost for good
        self._mutex = threading.Lock()
        event.listen(writer, "checkout", self._checkout)
        try:
            with writer.connect():
                pass  # take it now, so a second start fails at once
        except DBAPIError as error:
            self.release()
            raise StoreUnavailable(self._url, str(error.orig).strip()) from error
        except BaseException:
            self.release()
            raise

    def _checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, _: PoolProxiedConnection
    ) -> None:
        """Before any use of a writer connection: it holds the lock, or it is not used.

        Raising here makes the pool throw the connection away (closing it).
        """
        if record.info.get("sleeptime_owner"):
            return  # this connection took it; the lock lives as long as its session
        with self._mutex:
            if self._lost is not None:
                raise OwnershipLost(self._url, self._lost)
            self._take(dbapi_connection)
            if self._taken:
                log.info("ownership_retaken", url=self._url)
            self._taken = True
            record.info["sleeptime_owner"] = True

    def _take(self, dbapi_connection: Any) -> None:
        deadline = time.monotonic() + OWN_SESSION_WAIT_S
        while True:
            holder = _try_lock(dbapi_connection, self._name)
            if holder is None:
                return
            # Our own earlier session on its way out, or a holder gone by the time we
            # looked: not (yet) another owner, so try again for a moment.
            ours = holder[0] == self._name or holder == (None, None, None)
            if not ours or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        who = describe_holder(*holder)
        if not self._taken:
            raise DatabaseInUse(self._url, who)
        if holder[0] == self._name:
            raise StoreUnavailable(self._url, "a dead connection of this runtime still holds it")
        self._lost = f"its lock is held by {who}"
        log.critical("ownership_lost", url=self._url, holder=who)
        raise OwnershipLost(self._url, self._lost)

    def release(self) -> None:
        # The lock itself goes with the writer's connections, when the engine is disposed.
        if event.contains(self._writer, "checkout", self._checkout):
            event.remove(self._writer, "checkout", self._checkout)


# -- SQLite -------------------------------------------------------------------------------


class _OpenFile:
    """A database file as this process holds it open for locking: one descriptor for
    every store of the process on that file, closed when the last one is done."""

    __slots__ = ("descriptor", "holder", "spares", "users")

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.users = 0
        self.holder: str | None = None  # set while a store of this process owns it
        self.spares: list[int] = []  # descriptors opened in a race, closed with this one


_open_files: dict[tuple[int, int], _OpenFile] = {}
_open_files_mutex = threading.Lock()


class DatabaseFile:
    """This process's use of a SQLite database file, by whatever name it was opened.

    A read-only store holds one too, so that an owner of the same process stopping never
    closes the descriptor (and with it SQLite's locks) under it.
    """

    def __init__(self, path: str, *, create: bool = False, url: str = "") -> None:
        """Raises StoreUnavailable if the file cannot be opened (or made, with `create`)."""
        self._url = url or path
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        with _open_files_mutex:
            try:
                known = os.stat(path)
                key = (known.st_dev, known.st_ino)
            except FileNotFoundError:
                key = None
            if key is None or key not in _open_files:
                try:
                    descriptor = os.open(path, flags, 0o644)
                except OSError as error:
                    raise StoreUnavailable(
                        self._url, f"unable to open database file {path}: {error.strerror}"
                    ) from error
                found = os.fstat(descriptor)
                key = (found.st_dev, found.st_ino)
                if key in _open_files:  # the name was given to another file meanwhile
                    _open_files[key].spares.append(descriptor)
                else:
                    _open_files[key] = _OpenFile(descriptor)
                if found.st_nlink > 1:
                    # SQLite names its write-ahead log after the name it was given.
                    log.warning("database_has_several_names", path=path, links=found.st_nlink)
            self._key = key
            self._file: _OpenFile | None = _open_files[key]
            self._file.users += 1

    def lock(self) -> None:
        """Own the file, or raise DatabaseInUse naming who does."""
        assert self._file is not None
        with _open_files_mutex:
            if self._file.holder is not None:  # this process: flock would say yes again
                raise DatabaseInUse(self._url, self._file.holder)
            try:
                fcntl.flock(self._file.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DatabaseInUse(self._url, _file_holder(self._key)) from None
            since = datetime.now(UTC).strftime(_SHOWN)
            self._file.holder = _holder(os.getpid(), socket.gethostname(), since)

    def unlock(self) -> None:
        """Let another runtime own the file (this store still uses it)."""
        with _open_files_mutex:
            if self._file is not None and self._file.holder is not None:
                fcntl.flock(self._file.descriptor, fcntl.LOCK_UN)
                self._file.holder = None

    def close(self) -> None:
        """Done with the file: its descriptor is closed once no store of this process
        uses it (closing it earlier would drop SQLite's locks of the other stores)."""
        with _open_files_mutex:
            file, self._file = self._file, None
            if file is None:
                return
            file.users -= 1
            if file.users == 0:
                del _open_files[self._key]
                for descriptor in (file.descriptor, *file.spares):
                    os.close(descriptor)  # ends the lock as well, if still held


def _file_holder(key: tuple[int, int]) -> str:
    """Who holds the flock on the file: a process of this machine, from /proc/locks."""
    device, inode = key
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 2164 fd:01:1310795 0 EOF" ("->" marks a waiter)
        if len(fields) >= 6 and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"]:
            pid, where = fields[4], fields[5]
            if where == wanted and pid.isdigit() and int(pid) > 0:
                since = _process_start(int(pid))
                return _holder(int(pid), socket.gethostname(), since or "an unknown time")
    return "another process"


def _process_start(pid: int) -> str | None:
    """When the process started (the owner's since, as near as another process can tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return datetime.fromtimestamp(started, UTC).strftime(_SHOWN)


# -- both ---------------------------------------------------------------------------------


class Ownership:
    """Holds the database until `release()` (or until this process dies).

    Made before any connection to the database is opened: a SQLite file is locked at
    once, since through another name of the file (a hard link) SQLite would use another
    write-ahead log, and might write. A server database is taken by `attach(writer)`,
    whose connections (the only ones that write) then hold the lock. Both raise
    DatabaseInUse, naming who holds it, when another runtime owns the database.

    Example:
        >>> ownership = Ownership(url)
        >>> writer, reader = make_engines(url)
        >>> ownership.attach(writer)
        >>> committer = Committer(writer, heartbeat=ownership.heartbeat)
    """

    def __init__(self, url: URL) -> None:
        self._url = url
        self._file: DatabaseFile | None = None
        self._server: _ServerLock | None = None
        path = sqlite_file(url)
        if path is not None:
            file = DatabaseFile(path, create=True, url=redact(url))
            try:
                file.lock()
            except BaseException:
                file.close()
                raise
            self._file = file

    def attach(self, writer: Engine) -> None:
        """Make `writer`'s connections hold the lock of a server database, and take it
        now (nothing to do for a SQLite file, locked already)."""
        if not is_sqlite(self._url):
            self._server = _ServerLock(self._url, writer)

    @property
    def heartbeat(self) -> tuple[float, Callable[[Connection], object]] | None:
        """(seconds, op) for the writer to run when it had nothing to write that long:
        on PostgreSQL it reconnects a writer whose session died (a server restart), which
        takes the lock again at once rather than at the next write. None on SQLite."""
        if self._server is None:
            return None
        return CHECK_INTERVAL_S, _ping

    def release(self) -> None:
        """Let the next runtime own the database (call it once the writer's connections
        are closed: on PostgreSQL they hold the lock)."""
        if self._file is not None:
            self._file.unlock()
            self._file.close()
            self._file = None
        if self._server is not None:
            self._server.release()
            self._server = None


def _ping(connection: Connection) -> object:
    # The session is the lock: a live connection still holds it.
    return connection.exec_driver_sql("SELECT 1").scalar()
