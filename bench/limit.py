"""The limit: a turn's rows written with plain sqlite3, batched, with no logic at all.

Per turn the runtime commits 2 primary-agent messages, 1 group row update, 1 run row and
its `created` event, then 2 run status updates (running, completed) with their 2 events.
Here the same rows go into tables of the same columns and indexes as the runtime's, from
one thread, `batch` turns per transaction with executemany, with the runtime's SQLite
settings (WAL, synchronous=FULL): about what SQLite itself takes on this machine, the
ceiling for the runtime's durable turns/s.

    >>> result = write_turns(Path("limit.db"), groups=100, turns=5_000)
    >>> result.turns_per_s
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE groups (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    primary_agent_id VARCHAR(64) NOT NULL,
    frequency INTEGER,
    counter INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    cursor VARCHAR(64),
    cursor_seq INTEGER NOT NULL,
    updated_at DATETIME NOT NULL,
    last_turn_at DATETIME
);
CREATE TABLE messages (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    agent_id VARCHAR(64) NOT NULL,
    group_id VARCHAR(64) NOT NULL,
    sequence INTEGER NOT NULL,
    role VARCHAR(16) NOT NULL,
    content JSON NOT NULL,
    name VARCHAR(200),
    tool_calls JSON,
    tool_call_id VARCHAR(200),
    turn INTEGER,
    run_id VARCHAR(64),
    created_at DATETIME NOT NULL
);
CREATE UNIQUE INDEX ux_messages_agent_seq ON messages (agent_id, sequence);
CREATE INDEX ix_messages_run ON messages (run_id);
CREATE TABLE runs (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    group_id VARCHAR(64) NOT NULL,
    agent_id VARCHAR(64) NOT NULL,
    position INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL,
    stop_reason VARCHAR(16),
    attempt INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    window_first_seq INTEGER NOT NULL,
    window_last_seq INTEGER NOT NULL,
    created_at DATETIME NOT NULL,
    started_at DATETIME,
    completed_at DATETIME,
    error TEXT,
    metadata JSON NOT NULL
);
CREATE INDEX ix_runs_agent ON runs (agent_id, turn);
CREATE INDEX ix_runs_group ON runs (group_id, turn, position);
CREATE INDEX ix_runs_status ON runs (status);
CREATE TABLE run_events (
    id INTEGER NOT NULL PRIMARY KEY,
    run_id VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL,
    at DATETIME NOT NULL,
    attempt INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX ix_run_events_run ON run_events (run_id, id);
"""

_INSERT_MESSAGE = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, NULL, 'null', NULL, ?, ?, ?)"
_MOVE_GROUP = (
    "UPDATE groups SET turns = ?, counter = 0, cursor = ?, cursor_seq = ?, updated_at = ?, "
    "last_turn_at = ? WHERE id = ?"
)
_INSERT_RUN = (
    "INSERT INTO runs VALUES (?, ?, ?, 0, 'created', NULL, 1, ?, ?, ?, ?, NULL, NULL, NULL, "
    "'{\"position\": 0}')"
)
_INSERT_EVENT = (
    "INSERT INTO run_events (run_id, status, at, attempt, reason) VALUES (?, ?, ?, 1, ?)"
)
_START_RUN = "UPDATE runs SET status = 'running', attempt = 1, started_at = ? WHERE id = ?"
_END_RUN = (
    "UPDATE runs SET status = 'completed', attempt = 1, completed_at = ?, "
    "stop_reason = 'end_turn', error = NULL WHERE id = ?"
)
USER_CONTENT = json.dumps([{"type": "text", "text": "my favorite color is coral"}])
REPLY_CONTENT = json.dumps([{"type": "text", "text": "ok"}])
# About the size of the transcript the runtime stores in a sleeptime agent's history.
TRANSCRIPT_CONTENT = json.dumps([{"type": "text", "text": "x" * 700}])


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the runtime's settings: WAL, synchronous=FULL, explicit BEGIN."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


@dataclass(slots=True)
class _Group:
    id: str
    primary_agent_id: str
    sleeptime_agent_id: str
    turns: int = 0
    sequence: int = 0
    history: int = 0


@dataclass(frozen=True, slots=True)
class LimitResult:
    """What the limit writer did: turns, seconds, transactions and rows per table."""

    turns: int
    seconds: float
    transactions: int
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(" ")


def create_groups(connection: sqlite3.Connection, count: int) -> list[_Group]:
    """`count` groups at turn 0, committed."""
    groups = [_Group(_id("group"), _id("agent"), _id("agent")) for _ in range(count)]
    now = _now()
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO groups VALUES (?, ?, 1, -1, 0, NULL, 0, ?, NULL)",
        [(g.id, g.primary_agent_id, now) for g in groups],
    )
    connection.execute("COMMIT")
    return groups


def _batch(
    groups: list[_Group], first_turn: int, turns: int, history: bool
) -> dict[str, list[tuple[Any, ...]]]:
    """The parameters of every statement for turns [first_turn, first_turn + turns)."""
    rows: dict[str, list[tuple[Any, ...]]] = {
        "messages": [],
        "groups": [],
        "runs": [],
        "events": [],
        "starts": [],
        "ends": [],
    }
    for index in range(first_turn, first_turn + turns):
        group = groups[index % len(groups)]
        group.turns += 1
        now = _now()
        user_id, reply_id, run_id = _id("message"), _id("message"), _id("run")
        first = group.sequence + 1
        group.sequence += 2
        primary = (group.primary_agent_id, group.id)
        rows["messages"] += [
            (user_id, *primary, first, "user", USER_CONTENT, group.turns, None, now),
            (reply_id, *primary, first + 1, "assistant", REPLY_CONTENT, group.turns, None, now),
        ]
        rows["groups"].append((group.turns, reply_id, group.sequence, now, now, group.id))
        rows["runs"].append(
            (run_id, group.id, group.sleeptime_agent_id, group.turns, first, first + 1, now)
        )
        rows["events"] += [
            (run_id, "created", now, "created"),
            (run_id, "running", now, "started"),
            (run_id, "completed", now, "end_turn"),
        ]
        rows["starts"].append((now, run_id))
        rows["ends"].append((now, run_id))
        if history:
            sleeptime = (group.sleeptime_agent_id, group.id)
            seq = group.history
            rows["messages"] += [
                (
                    _id("message"),
                    *sleeptime,
                    seq + 1,
                    "user",
                    TRANSCRIPT_CONTENT,
                    None,
                    run_id,
                    now,
                ),
                (
                    _id("message"),
                    *sleeptime,
                    seq + 2,
                    "assistant",
                    REPLY_CONTENT,
                    None,
                    run_id,
                    now,
                ),
            ]
            group.history += 2
    return rows


def write_turns(
    path: Path, *, groups: int, turns: int, batch: int = 500, history: bool = False
) -> LimitResult:
    """Write `turns` turns over `groups` groups (round robin) into a new database at `path`.

    With `history`, each turn also stores the 2 messages the runtime keeps in the sleeptime
    agent's history (its transcript and its reply).
    """
    connection = connect(path)
    try:
        connection.executescript(SCHEMA)
        members = create_groups(connection, groups)
        transactions = 0
        started = time.perf_counter()
        for first in range(0, turns, batch):
            rows = _batch(members, first, min(batch, turns - first), history)
            connection.execute("BEGIN")
            connection.executemany(_INSERT_MESSAGE, rows["messages"])
            connection.executemany(_MOVE_GROUP, rows["groups"])
            connection.executemany(_INSERT_RUN, rows["runs"])
            connection.executemany(_INSERT_EVENT, rows["events"])
            connection.executemany(_START_RUN, rows["starts"])
            connection.executemany(_END_RUN, rows["ends"])
            connection.execute("COMMIT")
            transactions += 1
        seconds = time.perf_counter() - started
        counted = count_rows(connection)
    finally:
        connection.close()
    return LimitResult(turns=turns, seconds=seconds, transactions=transactions, rows=counted)


def count_rows(connection: sqlite3.Connection) -> dict[str, int]:
    """Rows per table, plus the turns the group rows count and the completed runs."""
    counts = {
        table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("groups", "messages", "runs", "run_events")
    }
    counts["group_turns"] = connection.execute("SELECT sum(turns) FROM groups").fetchone()[0]
    counts["completed_runs"] = connection.execute(
        "SELECT count(*) FROM runs WHERE status = 'completed'"
    ).fetchone()[0]
    return counts
