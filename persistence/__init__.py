"""Persistence: the only package that speaks SQL (SQLAlchemy 2, SQLite or PostgreSQL).

Example:
    >>> store = Store("sqlite:///sleeptime.db")
"""

from persistence._committer import Committer, Planned, Txn, Write
from persistence._engine import make_engines, parse_url, redact, sqlite_file
from persistence._models import utcnow
from persistence._records import GroupState, NewGroup, Transition, TurnWrite
from persistence._store import StaleTurn, Store

__all__ = [
    "Committer",
    "GroupState",
    "NewGroup",
    "Planned",
    "StaleTurn",
    "Store",
    "Transition",
    "TurnWrite",
    "Txn",
    "Write",
    "make_engines",
    "parse_url",
    "redact",
    "sqlite_file",
    "utcnow",
]
