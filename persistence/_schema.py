"""The database schema, kept by the Alembic migrations shipped in this package.

On start a fresh database is migrated to the newest revision; an older one is upgraded
(or refused, if the caller asked for no automatic upgrade, with the command that does
it); one newer than this code is refused. A database made before migrations existed
(tables but no revision) holds revision 0001's schema and is stamped so.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, inspect

from messages import SchemaMismatch

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"
MIGRATION_LOCK = 0x5_1EE9_713E
"""The advisory lock key migrations on PostgreSQL take for their transaction."""
UPGRADE_HINT = "upgrade it with `sleeptime migrate --db URL` (or Runtime.migrate(url))"


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; pre-migration databases count as the first one."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and inspect(connection).has_table("groups"):
        return FIRST_REVISION
    return revision


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except CommandError:
        return False


def check(engine: Engine, *, auto_upgrade: bool) -> str | None:
    """Raise SchemaMismatch unless the schema can be used; return the revision to leave.

    Returns None when the database is at the newest revision already.
    """
    head = head_revision()
    with engine.connect() as connection:
        current = current_revision(connection)
    if current == head:
        return None
    if current is not None and not _known(current):
        raise SchemaMismatch(
            f"the database is at schema revision {current}, newer than this code "
            f"(newest {head}): upgrade sleeptime-runtime, or use a database of this version"
        )
    if current is not None and not auto_upgrade:
        raise SchemaMismatch(
            f"the database is at schema revision {current}, older than this code ({head}): "
            + UPGRADE_HINT
        )
    return current or "empty"


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate to the newest revision in one transaction; return (from, to).

    On PostgreSQL the transaction first takes an advisory lock (freed when it ends), so
    processes starting together on a fresh database migrate it once, one after another.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        before = current_revision(connection)
        if before == head_revision():
            return before, before
        config = _config(connection)
        if (
            before == FIRST_REVISION
            and MigrationContext.configure(connection).get_current_revision() is None
        ):
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")
    return before, head_revision()


def upgrade_to(engine: Engine, revision: str) -> None:
    """Migrate to a given revision (for tests of the migrations themselves)."""
    with engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def prepare(engine: Engine, *, auto_upgrade: bool) -> None:
    """Make the schema usable: migrate a fresh or older database, refuse a newer one."""
    if check(engine, auto_upgrade=auto_upgrade) is not None:
        upgrade(engine)


def require_current(engine: Engine) -> None:
    """For read-only use: refuse any database not exactly at this code's revision."""
    head = head_revision()
    with engine.connect() as connection:
        current = current_revision(connection)
    if current != head:
        state = "has no sleeptime schema" if current is None else f"is at revision {current}"
        raise SchemaMismatch(
            f"the database {state}, and this code reads revision {head}"
            + ("" if current is None or not _known(current) else f": {UPGRADE_HINT}")
        )
