"""Persistence: the only package that speaks SQL (SQLAlchemy 2, SQLite or PostgreSQL).

Its users are the runtime's actors: the `Store` (every query, next to the tables it
touches), the records they hand it, and the helpers that read a database URL.

Example:
    >>> store = Store("sqlite:///sleeptime.db")
"""

from persistence._engine import parse_url, redact, sqlite_file
from persistence._leases import (
    DEFAULT_SHARDS,
    MAX_SHARDS,
    Leases,
    ShardBook,
    ShardOwner,
    serving_processes,
)
from persistence._models import utcnow
from persistence._observed import StoreObserver
from persistence._records import (
    AgentJoin,
    AgentLeave,
    GroupState,
    NewGroup,
    RetentionMarks,
    Transition,
    TurnRequest,
    TurnWrite,
)
from persistence._store import StaleTurn, Store

__all__ = [
    "DEFAULT_SHARDS",
    "MAX_SHARDS",
    "AgentJoin",
    "AgentLeave",
    "GroupState",
    "Leases",
    "NewGroup",
    "RetentionMarks",
    "ShardBook",
    "ShardOwner",
    "StaleTurn",
    "Store",
    "StoreObserver",
    "Transition",
    "TurnRequest",
    "TurnWrite",
    "parse_url",
    "redact",
    "serving_processes",
    "sqlite_file",
    "utcnow",
]
