"""Engines for one database URL: a single writer and a pool of readers.

SQLite runs in WAL mode so readers never wait for the writer; the writer starts every
transaction with BEGIN IMMEDIATE so a read-modify-write cannot be overtaken. PostgreSQL
goes through psycopg 3; connections are checked before use, so a restarted server is
reconnected to on the next call.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import ConnectionPoolEntry

from messages import StoreUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 5


def redact(url: str | URL) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def parse_url(url: str) -> URL:
    """The URL, with plain `postgresql://` meaning the psycopg 3 driver; or StoreUnavailable."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise StoreUnavailable(
            url, f"not a database URL ({error}); use e.g. sqlite:///sleeptime.db"
        ) from error
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def in_memory(database: str) -> bool:
    """Whether a SQLite URL's database is in memory rather than in a file."""
    return database in ("", ":memory:") or database.startswith("file::memory:")


def sqlite_file(url: URL) -> str | None:
    """The database file of a SQLite URL (None for any other database, or in memory)."""
    if not is_sqlite(url) or in_memory(url.database or ""):
        return None
    return url.database


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit that returned survives power loss, not only a process crash.
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_manual_transactions(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide where a transaction begins.
    dbapi_connection.isolation_level = None


def refuse_writes(engine: Engine) -> None:
    """Make every connection `engine` opens from now on refuse to change the database.

    The store's readers hold no ownership: so that only the owner's writer can write,
    they are made unable to.
    """
    sqlite = is_sqlite(engine.url)

    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        if sqlite:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.close()
        else:
            # psycopg then begins each transaction as BEGIN READ ONLY: nothing is set on
            # the server's session, which a transaction-mode pooler (pgbouncer) would
            # hand to the next client, the writer included.
            dbapi_connection.read_only = True

    event.listen(engine, "connect", on_connect)


def make_engines(url: str, readers: int = 8) -> tuple[Engine, Engine]:
    """Return (writer, reader) engines for `url`, or raise StoreUnavailable saying why.

    The reader pool keeps `readers` connections open (more are opened at peaks, and closed
    after): size it to the threads that read at once, or each peak pays a reconnect. Each
    read transaction sees one moment (on a server: REPEATABLE READ).
    """
    parsed = parse_url(url)
    shown = redact(parsed)
    if is_sqlite(parsed):
        if in_memory(parsed.database or ""):
            raise StoreUnavailable(
                url,
                "in-memory SQLite cannot be shared by the runtime's threads; use a file "
                "such as sqlite:///sleeptime.db",
            )
        options: dict[str, Any] = {}
    else:
        parsed, options = _server_options(parsed, "sleeptime-runtime")
    try:
        writer = create_engine(parsed, pool_size=1, max_overflow=0, **options)
        # A read of several statements sees one moment: SQLite's transactions are
        # snapshots already; on a server, REPEATABLE READ (a read-only transaction cannot
        # meet a serialization failure, so nothing is ever retried for it).
        consistent = {} if is_sqlite(parsed) else {"isolation_level": "REPEATABLE READ"}
        reader = create_engine(parsed, pool_size=readers, max_overflow=24, **options, **consistent)
    except (NoSuchModuleError, ImportError, ArgumentError) as error:
        hint = driver_hint(parsed)
        raise StoreUnavailable(shown, f"no driver for this URL: {error}{hint}") from error
    if is_sqlite(parsed):
        for engine in (writer, reader):
            event.listen(engine, "connect", _sqlite_manual_transactions)
            event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(writer, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        event.listen(reader, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    try:
        with writer.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as error:
        writer.dispose()
        reader.dispose()
        detail = str(error.orig).strip() or type(error.orig).__name__
        raise StoreUnavailable(shown, detail) from error
    return writer, reader


def make_lease_engine(url: str) -> Engine:
    """A small engine of a server database for the lease keeper, apart from the writer,
    so renewing a lease never waits behind a batch of writes."""
    parsed, options = _server_options(parse_url(url), "sleeptime-leases")
    return create_engine(parsed, pool_size=2, max_overflow=2, **options)


def _server_options(url: URL, name: str) -> tuple[URL, dict[str, Any]]:
    """The engine options of a server database, and its URL without the runtime's own
    query parameter: `prepare_threshold` (psycopg's name), the executions of a statement
    before psycopg prepares it on the server, `none` for never. Prepared statements save
    about a tenth of the database's work per turn, but a transaction-mode pooler older
    than pgbouncer 1.21 cannot carry them from one server connection to the next: add
    `?prepare_threshold=none` to a URL that goes through one."""
    connect: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": name}
    asked = url.query.get("prepare_threshold")
    if asked is not None:
        value = asked if isinstance(asked, str) else asked[-1]
        try:
            threshold = None if value.lower() in ("none", "off", "") else int(value)
        except ValueError:
            raise StoreUnavailable(
                redact(url), f"prepare_threshold must be a number or none, not {value!r}"
            ) from None
        connect["prepare_threshold"] = threshold
        url = url.difference_update_query(["prepare_threshold"])
    # A server connection can go stale (a restart): check it before each use.
    return url, {"pool_pre_ping": True, "connect_args": connect}


def driver_hint(url: URL) -> str:
    """What to install for the PostgreSQL driver `url` names, in parentheses; else "".

    Plain `postgresql://` means psycopg 3 here (`parse_url`), the driver the runtime is tested
    with and the `postgres` extra installs; a URL naming another driver needs that driver.
    """
    if url.get_backend_name() != "postgresql":
        return ""
    psycopg3 = "pip install 'sleeptime-runtime[postgres]'"
    driver = url.get_driver_name()
    if driver == "psycopg":
        return f" ({psycopg3}, which brings psycopg 3)"
    if driver == "psycopg2":
        return f" (pip install psycopg2-binary; or write postgresql:// for psycopg 3: {psycopg3})"
    return f" (the runtime is tested with psycopg 3: write postgresql:// and {psycopg3})"
