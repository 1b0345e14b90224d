"""One runtime owns a database's groups at a time.

The lock is one the operating system or the server frees when its holder dies, even by
SIGKILL, so a crashed runtime never blocks the next start: an exclusive `flock` on a file
beside a SQLite database, a session-level advisory lock on PostgreSQL (held by a
connection of its own for the runtime's whole life).
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import URL, Connection, Engine, NullPool, create_engine, text
from sqlalchemy.exc import DBAPIError

from messages import DatabaseInUse, StoreUnavailable
from persistence._engine import CONNECT_TIMEOUT_S, redact, sqlite_file

# The advisory lock key: any 64-bit number, the same for every sleeptime runtime.
ADVISORY_KEY = 0x5_1EE9_713E


def _holder() -> str:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"pid {os.getpid()} on {socket.gethostname()[:16]} since {started}"


class Ownership:
    """Holds the database until `release()` (or until this process dies)."""

    def __init__(self, url: URL) -> None:
        self._url = url
        self._file: int | None = None
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        path = sqlite_file(url)
        if path is not None:
            self._lock_file(Path(f"{path}.lock"))
        else:
            self._lock_server()

    def _lock_file(self, path: Path) -> None:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another runtime"
            os.close(descriptor)
            raise DatabaseInUse(redact(self._url), holder) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, _holder().encode())
        self._file = descriptor

    def _lock_server(self) -> None:
        engine = create_engine(
            self._url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": f"sleeptime-runtime owner ({_holder()})",
            },
        )
        try:
            connection = engine.connect()
            got = connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}
            ).scalar()
            connection.commit()
        except DBAPIError as error:
            engine.dispose()
            raise StoreUnavailable(redact(self._url), str(error.orig).strip()) from error
        if not got:
            holder = connection.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND (l.classid::bigint << 32 | l.objid::bigint) = :key"
                ),
                {"key": ADVISORY_KEY},
            ).scalar()
            connection.close()
            engine.dispose()
            name = str(holder or "another runtime").removeprefix("sleeptime ")
            raise DatabaseInUse(redact(self._url), name)
        self._engine, self._connection = engine, connection

    def release(self) -> None:
        """Let the next runtime own the database."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            os.close(self._file)
            self._file = None
        if self._connection is not None:
            try:
                self._connection.close()  # ends the session, and with it the lock
            except DBAPIError:
                pass  # the server is gone, and the lock with it
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
