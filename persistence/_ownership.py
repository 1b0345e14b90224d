"""Who may write a database: one process per SQLite file; shard leases on PostgreSQL.

- SQLite: one runtime owns the file, under an exclusive `flock` on the database file
  itself, so every name of the file (a symlink, a hard link, a relative path) meets the
  same lock, and the operating system frees it when its holder dies, even by SIGKILL.
  Linux keeps `flock` locks apart from the POSIX locks SQLite takes, but a process loses
  *all* its POSIX locks on a file when it closes *any* descriptor of it: that would let
  another process delete the write-ahead log under a live owner. So each process opens a
  database file once, shares that descriptor between its stores, and closes it only when
  the last of them is done.
- PostgreSQL: several runtimes share the database, each owning the groups of the shards
  it holds leases on (`persistence._leases`); every write is fenced by its shard's lease,
  so nothing here locks the database as a whole.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

from sqlalchemy import URL

from messages import DatabaseInUse, StoreUnavailable
from messages._log import get_logger
from persistence._engine import redact, sqlite_file

log = get_logger("sleeptime.ownership")

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
_STARTED = datetime.now(UTC).strftime(_SHOWN)  # when this process loaded the runtime


def _holder(pid: int, host: str, since: str) -> str:
    return f"pid {pid} on {host} since {since}"


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
    """The right of this process to write a database, until `release()` (or its death).

    Made before any connection to the database is opened: a SQLite file is locked at
    once (DatabaseInUse, naming who holds it, if another runtime owns it), since through
    another name of the file (a hard link) SQLite would use another write-ahead log, and
    might write. On PostgreSQL nothing is locked: the shards' leases say who writes what.

    Example:
        >>> ownership = Ownership(url)
        >>> writer, reader = make_engines(url)
    """

    def __init__(self, url: URL) -> None:
        self._url = url
        self._file: DatabaseFile | None = None
        path = sqlite_file(url)
        if path is not None:
            file = DatabaseFile(path, create=True, url=redact(url))
            try:
                file.lock()
            except BaseException:
                file.close()
                raise
            self._file = file

    @staticmethod
    def describe_this_process() -> str:
        """This process as other processes read it: pid, host, and since when."""
        return _holder(os.getpid(), socket.gethostname(), _STARTED)

    def release(self) -> None:
        """Let the next runtime own a SQLite file (nothing to do on PostgreSQL)."""
        if self._file is not None:
            self._file.unlock()
            self._file.close()
            self._file = None
