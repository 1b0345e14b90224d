"""Every stored row of a database, read behind the runtime's back, to show nothing changed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from persistence._engine import parse_url
from persistence._models import Base

Dump = dict[str, list[tuple[Any, ...]]]
LEASE_TABLES = frozenset({"shard_leases", "shard_members"})
"""Renewed in the background (PostgreSQL) whatever the calls do: not read."""


class TableDump:
    """Reads every table of the database at `url`, each in primary key order (but the
    leases, which their keeper renews on its own).

    Example:
        >>> tables = TableDump(db_url)
        >>> before = tables.read(); ...; assert tables.read() == before
    """

    def __init__(self, url: str) -> None:
        self._engine = create_engine(parse_url(url), poolclass=NullPool)

    def read(self) -> Dump:
        with self._engine.connect() as connection:
            return {
                table.name: [
                    tuple(row)
                    for row in connection.execute(select(table).order_by(*table.primary_key))
                ]
                for table in Base.metadata.sorted_tables
                if table.name not in LEASE_TABLES
            }

    def close(self) -> None:
        self._engine.dispose()
