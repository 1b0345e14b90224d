"""Every stored row of a database, read behind the runtime's back, to show nothing changed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from persistence._engine import parse_url
from persistence._models import Base

Dump = dict[str, list[tuple[Any, ...]]]
LIVENESS = {"shard_leases", "shard_members"}
"""Tables a live runtime renews on its own (leases, membership): bookkeeping, not data."""


class TableDump:
    """Reads every table of the database at `url`, each in primary key order (but the
    leases and memberships a live runtime renews by itself).

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
                if table.name not in LIVENESS
            }

    def close(self) -> None:
        self._engine.dispose()
