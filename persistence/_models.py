"""The tables, declared once as SQLAlchemy 2 typed models."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC and returns aware UTC, the same on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous: pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, one function instead of three (this type's, its `DateTime`'s and
        the dialect's text formatting), writing the same text: every row of every turn
        carries a few datetimes. Any other storage format or dialect: SQLAlchemy's own."""
        general = super().bind_processor(dialect)
        impl = getattr(self.dialect_impl(dialect), "impl", None)
        if dialect.name != "sqlite" or getattr(impl, "_storage_format", None) != _SQLITE_FORMAT:
            return general
        assert general is not None

        def process(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is not datetime:  # a subclass, or not a datetime: as SQLAlchemy does
                return general(value)
            if value.tzinfo is None:
                raise ValueError("naive datetimes are ambiguous: pass an aware UTC datetime")
            v = value.astimezone(UTC)
            return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 (the dialect's own)
                v.year,
                v.month,
                v.day,
                v.hour,
                v.minute,
                v.second,
                v.microsecond,
            )

        return process


_SQLITE_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)
"""How SQLAlchemy's SQLite `DATETIME` writes a datetime (its default `storage_format`)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class GroupRow(Base):
    __tablename__ = "groups"
    __table_args__ = (Index("ix_groups_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    primary_agent_id: Mapped[str] = mapped_column(String(64))
    frequency: Mapped[int | None]
    counter: Mapped[int]
    turns: Mapped[int]
    cursor: Mapped[str | None] = mapped_column(String(64))
    cursor_seq: Mapped[int]
    preamble: Mapped[str | None] = mapped_column(Text)
    transcript_max_messages: Mapped[int | None]
    run_timeout: Mapped[float]
    max_attempts: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_turn_at: Mapped[datetime | None]
    messages_pruned_through: Mapped[int] = mapped_column(server_default="0")
    """Primary messages with a sequence up to this one were removed by retention."""
    turns_pruned_through: Mapped[int] = mapped_column(server_default="0")
    """The messages of turns up to this one were removed by retention."""


class AgentRow(Base):
    __tablename__ = "agents"
    __table_args__ = (Index("ix_agents_group", "group_id", "position"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(64), ForeignKey("groups.id"))
    role: Mapped[str] = mapped_column(String(16))
    position: Mapped[int]
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    added_turn: Mapped[int] = mapped_column(server_default="0")
    """The group's turns when the agent joined (0 for the agents it was created with)."""
    coverage_from_seq: Mapped[int] = mapped_column(server_default="1")
    """The first primary message sequence this sleeptime agent's windows cover."""
    removed_at: Mapped[datetime | None]
    removed_turn: Mapped[int | None]
    """Set when a sleeptime agent was taken out of its live group (its rows stay)."""
    runs_pruned_through_seq: Mapped[int] = mapped_column(server_default="0")
    """Its runs whose windows end at or before this primary sequence were pruned."""
    history_pruned_through: Mapped[int] = mapped_column(server_default="0")
    """Its own messages with a sequence up to this one were pruned."""


class BlockRow(Base):
    __tablename__ = "blocks"
    __table_args__ = (Index("ix_blocks_group", "group_id", "agent_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(64), ForeignKey("groups.id"))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    position: Mapped[int]
    label: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(Text)
    limit: Mapped[int]
    read_only: Mapped[bool]
    description: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int]
    updated_at: Mapped[datetime]


class BlockVersionRow(Base):
    """One value a block had: who made it (`source`: application, run, agent, runtime) and
    how (`change`: created, set, edited, deleted, imported); a run's edit names its tool call.
    `agent` is a primary agent's memory tool during a turn (no run); `source` is text, so
    it took no migration (see messages._blocks)."""

    __tablename__ = "block_versions"
    __table_args__ = (
        Index("ux_block_versions_block", "block_id", "version", unique=True),
        Index("ix_block_versions_group", "group_id", "id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    block_id: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    value: Mapped[str | None] = mapped_column(Text)
    change: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[str | None] = mapped_column(String(64))
    tool: Mapped[str | None] = mapped_column(String(64))
    tool_call_id: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime]


class PruneRow(Base):
    """What one `prune` call removed from one group (counts by kind), and how it was asked."""

    __tablename__ = "prunes"
    __table_args__ = (Index("ix_prunes_group", "group_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    group_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]
    settings: Mapped[dict[str, Any]]
    removed: Mapped[dict[str, Any]]


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ux_messages_agent_seq", "agent_id", "sequence", unique=True),
        Index("ix_messages_run", "run_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[list[Any]]
    name: Mapped[str | None] = mapped_column(String(200))
    tool_calls: Mapped[list[Any] | None]
    tool_call_id: Mapped[str | None] = mapped_column(String(200))
    turn: Mapped[int | None]
    run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_agent", "agent_id", "turn"),
        Index("ix_runs_group", "group_id", "turn", "position"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_created", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    stop_reason: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int]
    turn: Mapped[int]
    window_first_seq: Mapped[int]
    window_last_seq: Mapped[int]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    run_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)


class RunEventRow(Base):
    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run", "run_id", "id"),)

    # BIGINT on PostgreSQL; on SQLite only INTEGER is the 64-bit auto-incrementing rowid.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime]
    attempt: Mapped[int]
    reason: Mapped[str | None] = mapped_column(Text)
    epoch: Mapped[int | None] = mapped_column(BigInteger)
    """The lease epoch of the run's shard the event was written under (0 on SQLite;
    None before revision 0004): along a shard's events it never goes down."""


class TurnRequestRow(Base):
    """The answer to a turn taken with a request id, written in the turn's transaction.

    `result` holds what the caller was told, by reference to the stored turn: the ids of
    the messages it returned, `fired`, the run ids, and the primary agent's `error` (None
    if it did not fail). The primary key refuses a second turn for one request.
    """

    __tablename__ = "turn_requests"

    group_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    turn: Mapped[int]
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class ShardSettingRow(Base):
    """Settings fixed when a database is first served by leases (the shard count)."""

    __tablename__ = "shard_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ShardLeaseRow(Base):
    """Who owns each shard, at which fencing epoch, until when (the database's clock)."""

    __tablename__ = "shard_leases"

    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    member: Mapped[str | None] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None]
    holder: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)


class ShardMemberRow(Base):
    """The runtime processes sharing the shards, each until its membership expires."""

    __tablename__ = "shard_members"

    member: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime]
