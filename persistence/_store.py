"""The store: every query the runtime makes, next to the tables it touches.

Reads run on a pool of reader connections in the caller's thread. Writes are functions
run by the single `Committer`, one function per transactional operation of the spec.
Statements are SQLAlchemy Core, built once at import: the hot path pays for neither ORM
bookkeeping nor statement compilation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    RowMapping,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from messages import (
    Agent,
    AgentNotFound,
    Block,
    BlockExists,
    BlockNotFound,
    Blocks,
    BlockVersion,
    BlockVersionNotFound,
    Group,
    GroupNotFound,
    Message,
    MessageNotFound,
    NotOwner,
    PruneSettings,
    Run,
    RunEvent,
    RunEventNotFound,
    RunNotFound,
    RunStatus,
    StoreRejected,
    StoreUnavailable,
    TransitionRefused,
    TurnResult,
)
from messages._blocks import BlockChange, BlockSource, view_not_found
from messages._ids import new_id
from messages._text import STORED, storable
from persistence import _retention as retention
from persistence import _schema as schema
from persistence._block_cache import BlockCache, visible_to
from persistence._committer import Committer, Planned, Txn, Write, lost_connection
from persistence._engine import (
    make_engines,
    make_lease_engine,
    parse_url,
    redact,
    refuse_writes,
    sqlite_file,
)
from persistence._leases import DEFAULT_SHARDS, Leases, ShardBook, ShardOwner, fence_for
from persistence._models import utcnow
from persistence._observed import NO_STORE_OBSERVER, StoreObserver
from persistence._ownership import DatabaseFile, Ownership
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
from persistence._tables import (
    agents,
    block_versions,
    blocks,
    groups,
    messages,
    prunes,
    run_events,
    runs,
    turn_requests,
)

T = TypeVar("T")
OPEN_STATUSES = (RunStatus.CREATED.value, RunStatus.RUNNING.value)
MAX_REMEMBERED_HISTORIES = 1_000_000  # agents whose history end the writer remembers


_MOVE_GROUP = (
    update(groups)
    .where(groups.c.id == bindparam("group_id"), groups.c.turns == bindparam("expected_turns"))
    .values(
        turns=bindparam("turns"),
        counter=bindparam("counter"),
        cursor=bindparam("cursor"),
        cursor_seq=bindparam("cursor_seq"),
        updated_at=bindparam("at"),
        last_turn_at=bindparam("at"),
    )
)
_INSERT_MESSAGES = insert(messages)
_INSERT_RUNS = insert(runs)
_INSERT_EVENTS = insert(run_events)
_INSERT_TURN_REQUESTS = insert(turn_requests)
_SELECT_TURN_REQUEST = select(turn_requests.c.turn, turn_requests.c.result).where(
    turn_requests.c.group_id == bindparam("group_id"),
    turn_requests.c.request_id == bindparam("request_id"),
)
_SELECT_MESSAGES = select(messages).where(
    messages.c.id.in_(bindparam("message_ids", expanding=True))
)
_SELECT_WINDOW = (
    select(messages)
    .where(
        messages.c.agent_id == bindparam("agent_id"),
        messages.c.sequence.between(bindparam("first"), bindparam("last")),
    )
    .order_by(messages.c.sequence)
)
_SELECT_HISTORY = (
    select(messages)
    .where(messages.c.agent_id == bindparam("agent_id"))
    .order_by(messages.c.sequence)
)
_SELECT_RECENT = (
    select(messages)
    .where(messages.c.agent_id == bindparam("agent_id"))
    .order_by(messages.c.sequence.desc())
    .limit(bindparam("limit"))
)
_LAST_SEQUENCE = select(func.max(messages.c.sequence)).where(
    messages.c.agent_id == bindparam("agent_id")
)
_LAST_SEQUENCES = (
    select(messages.c.agent_id, func.max(messages.c.sequence))
    .where(messages.c.agent_id.in_(bindparam("agent_ids", expanding=True)))
    .group_by(messages.c.agent_id)
)
_HISTORY_PRUNED = select(agents.c.id, agents.c.history_pruned_through).where(
    agents.c.id.in_(bindparam("agent_ids", expanding=True)), agents.c.history_pruned_through > 0
)
_SELECT_AGENT = select(agents).where(agents.c.id == bindparam("agent_id"))
_SELECT_GROUP = select(groups).where(groups.c.id == bindparam("group_id"))
_SELECT_GROUP_AGENTS = (
    select(agents).where(agents.c.group_id == bindparam("group_id")).order_by(agents.c.position)
)
_SELECT_GROUP_BLOCKS = (
    select(blocks).where(blocks.c.group_id == bindparam("group_id")).order_by(blocks.c.position)
)
_GROUP_OF_BLOCK = select(blocks.c.group_id).where(blocks.c.id == bindparam("block_id"))
_LOCK_BLOCK = select(blocks).where(blocks.c.id == bindparam("block_id")).with_for_update()
_WRITE_BLOCK = (
    update(blocks)
    .where(blocks.c.id == bindparam("block_id"), blocks.c.version == bindparam("expected"))
    .values(value=bindparam("value"), version=bindparam("version"), updated_at=bindparam("at"))
)
# Each status change is guarded by the statuses it may leave and by the attempt it belongs
# to, so the database itself refuses a second start, any change after a terminal status and
# a late write from an earlier attempt, whoever asks; the stored attempt never goes back.
_START_RUN = (
    update(runs)
    .where(
        runs.c.id == bindparam("run_id"),
        runs.c.status == RunStatus.CREATED.value,
        runs.c.attempt == bindparam("expected_attempt"),
    )
    .values(status=bindparam("status"), started_at=bindparam("at"))
)
_END_RUN = (
    update(runs)
    .where(
        runs.c.id == bindparam("run_id"),
        # Spelled as OR, not IN: an expanding IN could not be merged into one executemany.
        or_(*(runs.c.status == s for s in OPEN_STATUSES)),
        runs.c.attempt == bindparam("expected_attempt"),
    )
    .values(
        status=bindparam("status"),
        completed_at=bindparam("at"),
        stop_reason=bindparam("stop_reason"),
        error=bindparam("error"),
    )
)
_REQUEUE_RUN = (
    update(runs)
    .where(
        runs.c.id == bindparam("run_id"),
        runs.c.status == RunStatus.RUNNING.value,
        runs.c.attempt == bindparam("expected_attempt"),
    )
    .values(status=bindparam("status"), attempt=bindparam("attempt"))
)
_SELECT_RUN = select(runs).where(runs.c.id == bindparam("run_id"))
_RUN_STATUS = select(runs.c.status).where(runs.c.id == bindparam("run_id"))
# A block's versions are written with the block, in its transaction: the unique
# (block_id, version) refuses a second writer of one version.
_INSERT_BLOCK_VERSIONS = insert(block_versions)
_INSERT_BLOCKS = insert(blocks)
_DELETE_BLOCK = delete(blocks).where(
    blocks.c.id == bindparam("block_id"), blocks.c.version == bindparam("expected")
)
_SELECT_EVENTS = (
    select(run_events).where(run_events.c.run_id == bindparam("run_id")).order_by(run_events.c.id)
)


class StaleTurn(Exception):
    """The stored turn count moved under a writer: someone else drove this group."""


class Store:
    """The database of one runtime.

    Example:
        >>> store = Store("sqlite:///sleeptime.db")
        >>> store.get_group(group_id).counter
    """

    def __init__(
        self,
        url: str,
        *,
        read_only: bool = False,
        auto_upgrade: bool = True,
        readers: int = 8,
        shards: int = DEFAULT_SHARDS,
        lease_s: float = 10.0,
        address: str | None = None,
        observer: StoreObserver = NO_STORE_OBSERVER,
    ) -> None:
        """Connect, take ownership of the database (unless read-only) and ready its schema.

        A SQLite file is owned whole by one process, which holds every shard. On
        PostgreSQL this store joins the processes sharing the database: `leases` then
        acquires shards (`shards` is the count a new database gets; `lease_s` how long
        a lease lasts unrenewed; `address` where callers can reach this process), and
        every write for a group is fenced by its shard's lease.

        `observer` is told of the store's errors, its writer's batches and outages.

        Raises StoreUnavailable (cannot connect), DatabaseInUse (another runtime owns the
        SQLite file) or SchemaMismatch (a schema this code cannot use as it is).
        """
        self._observer = observer
        self._snapshots = threading.local()  # `snapshot()`'s connection, per thread
        parsed = parse_url(url)
        self.url = redact(parsed)
        self.book = ShardBook(shards)
        self.leases: Leases | None = None
        self._lease_engine = None
        # Before anything opens the database: a SQLite file is locked here.
        self._ownership = None if read_only else Ownership(parsed)
        self._viewed = _view(parsed) if read_only else None
        try:
            self._writer, self._reader = make_engines(url, readers=readers)
        except BaseException:
            self._let_go()
            raise
        refuse_writes(self._reader)  # only the writer writes: it alone holds the ownership
        # Only the owner sees every change to the blocks, so only the owner may cache them.
        self._block_cache = None if read_only else BlockCache()
        self._next_sequence: dict[str, int] = {}  # agent id -> next to append (writer thread)
        try:
            if self._ownership is None:
                self._guard(lambda: schema.require_current(self._writer))
            else:
                # Processes starting together on PostgreSQL migrate one after the other.
                self._guard(lambda: schema.prepare(self._writer, auto_upgrade=auto_upgrade))
        except BaseException:
            self._release()
            raise
        fence = None
        if sqlite_file(parsed) is None:
            try:
                self._lease_engine = make_lease_engine(url)
            except BaseException:
                self._release()
                raise
            self.leases = Leases(
                self._lease_engine,
                member=new_id("member"),
                holder=Ownership.describe_this_process(),
                lease_s=lease_s,
                address=address,
            )
        if self.leases is not None and not read_only:
            fence = fence_for(self.leases, self.book)
        else:  # a SQLite file has one process; a reader writes nothing: both see all
            if self.leases is not None:  # a reader of the shards the writers fixed
                leases = self.leases
                try:
                    stored = self._guard(leases.stored_shards)
                except BaseException:
                    self._release()
                    raise
                self.book.shards = stored or shards
            self.book.add(dict.fromkeys(range(self.book.shards), 0))
        self.committer = Committer(
            self._writer,
            translate=self._translate,
            insert_order=(_INSERT_MESSAGES, _INSERT_RUNS, _INSERT_EVENTS, _INSERT_TURN_REQUESTS),
            append=(_INSERT_MESSAGES, self._number),
            fence=fence,
            observer=observer,
        )

    def shard_of(self, group_id: str) -> int:
        return self.book.shard_of(group_id)

    def serves(self, group_id: str) -> bool:
        """Whether this process takes work for the group (it holds its shard, and is not
        handing it over)."""
        return self.book.serves(self.shard_of(group_id))

    def lease_of(self, group_id: str) -> tuple[int, int]:
        """(shard, epoch) a write for the group is made under: the epoch this process
        holds the group's shard at (-1 if it does not: the write will be refused)."""
        shard = self.shard_of(group_id)
        epoch = self.book.epoch(shard)
        return shard, -1 if epoch is None else epoch

    def owner_of(self, group_id: str) -> ShardOwner:
        """Who holds the group's shard, as the database says (this process on SQLite)."""
        shard = self.shard_of(group_id)
        if self.leases is None:
            holder = Ownership.describe_this_process()
            epoch = self.book.epoch(shard)
            return ShardOwner(
                shard=shard,
                member=None if epoch is None else "local",
                holder=holder,
                address=None,
                epoch=epoch or 0,
                expires_at=None,
                expired=False,
            )
        leases = self.leases
        owner = self._guard(lambda: leases.owner(shard))
        if owner.member == leases.member and not self.book.serves(shard):
            # Ours in the table, but being handed over (or lost): between owners, as the
            # next owner will see it. Named as ours, a caller would come back here.
            return replace(owner, member=None, holder=None, address=None)
        return owner

    def not_owner(self, group_id: str) -> NotOwner:
        """The error for a call about a group this process does not serve, naming the
        owner if it can be read."""
        shard = self.shard_of(group_id)
        try:
            owner = self.owner_of(group_id)
        except Exception:  # the error names no owner rather than hiding the real one
            return NotOwner(group_id, shard)
        if owner.member is None or owner.expired:
            return NotOwner(group_id, shard)
        return NotOwner(group_id, shard, owner.holder, owner.address)

    def take_shards(self) -> dict[int, int]:
        """Join and take every free shard ({shard: epoch}), for a store used without a
        runtime (a tool, a test): a runtime's lease keeper does this, fairly, itself.
        Nothing is renewed: the leases lapse after `lease_s` unless something renews them.
        On SQLite this process holds every shard already."""
        if self.leases is not None:
            self.book.shards = self._guard(lambda: self.leases.setup(self.book.shards))  # type: ignore[union-attr]
            taken = self._guard(lambda: self.leases.acquire(self.book.shards))  # type: ignore[union-attr]
            self.book.add(taken)
            self.shards_moved()
        return self.book.held()

    def shards_moved(self) -> None:
        """Shards were acquired or lost: forget what only the owner of a group may
        remember (its blocks, where its agents' histories end); read it again."""
        if self._block_cache is not None:
            self._block_cache.clear()
        self.committer.submit(lambda connection: self._next_sequence.clear())

    def close(self) -> None:
        """Commit what is queued, then release every connection and the ownership."""
        self.committer.close()
        self._release()

    def _release(self) -> None:
        self._writer.dispose()
        self._reader.dispose()
        if self._lease_engine is not None:
            self._lease_engine.dispose()
        self._let_go()

    def _let_go(self) -> None:
        if self._ownership is not None:
            self._ownership.release()
            self._ownership = None
        if self._viewed is not None:
            self._viewed.close()
            self._viewed = None

    @staticmethod
    def migrate(url: str) -> tuple[str | None, str]:
        """Upgrade the database at `url` to this code's schema; return (from, to) revisions.

        On a SQLite file it takes the file's ownership for the time it runs; on
        PostgreSQL concurrent migrations wait for each other. Never under a live runtime
        of an older version.
        """
        parsed = parse_url(url)
        ownership = Ownership(parsed)
        try:
            writer, reader = make_engines(url)
        except BaseException:
            ownership.release()
            raise
        reader.dispose()
        try:
            schema.check(writer, auto_upgrade=True)
            try:
                return schema.upgrade(writer)
            except DBAPIError as error:
                raise StoreUnavailable(redact(parsed), str(error.orig).strip()) from error
        finally:
            writer.dispose()
            ownership.release()

    def _number(
        self, connection: Connection, rows: list[dict[str, Any]], txn: Txn
    ) -> list[dict[str, Any]]:
        """Number runs' messages after their agents' stored histories, inside the writing
        transaction: the single writer makes that the truth, whatever an actor guessed (a
        restarted incarnation may not see the previous one's last messages yet).

        Where each history ends is read once per agent, then remembered as each
        transaction commits (only this writer appends). A remembered end that is wrong
        (a commit whose outcome was unknown) collides with the unique sequence and the
        write is run again exactly, reading the database.
        """
        agent_ids = list(dict.fromkeys(row["agent_id"] for row in rows))
        next_by_agent: dict[str, int] | None = txn.scratch.get("next_sequence")
        if next_by_agent is None:
            next_by_agent = txn.scratch["next_sequence"] = {}
            txn.on_commit(partial(self._appended, next_by_agent))
        known = {} if txn.exact else self._next_sequence
        unknown = []
        for agent_id in agent_ids:
            if agent_id not in next_by_agent:
                if agent_id in known:
                    next_by_agent[agent_id] = known[agent_id]
                else:
                    unknown.append(agent_id)
        if unknown:
            next_by_agent.update(dict.fromkeys(unknown, 1))
            # Retention may have removed a history's last messages: it goes on after them.
            pruned = connection.execute(_HISTORY_PRUNED, {"agent_ids": unknown}).all()
            next_by_agent.update((agent_id, mark + 1) for agent_id, mark in pruned)
            found = connection.execute(_LAST_SEQUENCES, {"agent_ids": unknown}).all()
            for agent_id, last in found:
                next_by_agent[agent_id] = max(next_by_agent[agent_id], last + 1)
        numbered = []
        for row in rows:
            agent_id = row["agent_id"]
            numbered.append({**row, "sequence": next_by_agent[agent_id]})
            next_by_agent[agent_id] += 1
        return numbered

    def _appended(self, next_by_agent: dict[str, int]) -> None:
        """A transaction that appended messages committed (called in the writer thread)."""
        if len(self._next_sequence) + len(next_by_agent) > MAX_REMEMBERED_HISTORIES:
            self._next_sequence.clear()
        self._next_sequence.update(next_by_agent)

    # -- errors and reads -----------------------------------------------------------------

    def _translate(self, error: Exception) -> Exception:
        """Connection trouble is StoreUnavailable (try again later); a statement the
        database refuses is StoreRejected (trying again would not help)."""
        if isinstance(error, DBAPIError):
            detail = str(error.orig).strip() or type(error.orig).__name__
            failure: Exception = (
                StoreUnavailable(self.url, detail)
                if lost_connection(error)
                else StoreRejected(self.url, detail)
            )
            self._observer.store_error(failure)
            return failure
        return error

    def _guard(self, action: Callable[[], T]) -> T:
        try:
            return action()
        except DBAPIError as error:
            raise self._translate(error) from error

    def _read(self, query: Callable[[Connection], T]) -> T:
        pinned: Connection | None = getattr(self._snapshots, "connection", None)
        if pinned is not None:  # inside `snapshot()` on this thread: its transaction
            return self._guard(lambda: query(pinned))

        def run() -> T:
            with self._reader.connect() as connection:
                return query(connection)

        return self._guard(run)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read this thread makes meanwhile sees the database at one moment.

        One read-only transaction holds them all (SQLite: its WAL snapshot; PostgreSQL:
        the readers' REPEATABLE READ), so reads made one after the other agree while
        the writer commits (a run read as `running` is not found with a `completed` event
        read a moment later). Nested snapshots are the outer one. Keep it short: a long
        snapshot holds back SQLite's checkpoints and PostgreSQL's vacuum."""
        if getattr(self._snapshots, "connection", None) is not None:
            yield
            return
        connection = self._guard(self._reader.connect)
        try:
            with connection.begin():
                self._snapshots.connection = connection
                try:
                    yield
                finally:
                    self._snapshots.connection = None
        except DBAPIError as error:
            raise self._translate(error) from error
        finally:
            connection.close()

    # -- groups and agents ----------------------------------------------------------------

    def create_group(self, new: NewGroup) -> Future[None]:
        ordered = sorted(new.agents, key=lambda a: a.role != "primary")

        def op(connection: Connection) -> None:
            connection.execute(insert(groups), [_group_values(new.group)])
            connection.execute(insert(agents), [_agent_values(a, i) for i, a in enumerate(ordered)])
            connection.execute(
                insert(blocks), [_block_values(b, i) for i, b in enumerate(new.blocks)]
            )
            if new.blocks:
                connection.execute(
                    _INSERT_BLOCK_VERSIONS,
                    [
                        _version_values(
                            b, "created", new.block_sources.get(b.id, "application"), at=at
                        )
                        for b in new.blocks
                    ],
                )

        at = utcnow()
        return self.committer.submit(op, lease=self.lease_of(new.group.id))

    def get_group(self, group_id: str) -> Group:
        return self._read(lambda c: _load_group(c, group_id)[0])

    def group_state(self, group_id: str) -> GroupState:
        """The group with its agents and the end of its primary history."""

        def query(connection: Connection) -> GroupState:
            group, cursor_seq, members = _load_group(connection, group_id)
            last = connection.execute(_LAST_SEQUENCE, {"agent_id": group.primary_agent_id})
            last_seq = last.scalar()
            if last_seq is None:  # none stored, or retention removed them all
                pruned = select(groups.c.messages_pruned_through).where(groups.c.id == group_id)
                last_seq = connection.execute(pruned).scalar() or 0
            return GroupState(
                group=group,
                cursor_seq=cursor_seq,
                last_seq=last_seq,
                primary=members[0],
                sleeptime=members[1:],
            )

        return self._read(query)

    def count_groups(self) -> int:
        """How many groups are stored."""
        statement = select(func.count()).select_from(groups)
        return int(self._read(lambda c: c.execute(statement).scalar_one()))

    def list_groups(
        self,
        statuses: Sequence[str] | None = None,
        primary_kind: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Group]:
        """Groups oldest first (created_at, then id), with the given statuses and primary
        agent kind; `limit` of them after the group `after` (GroupNotFound if none)."""
        key = (groups.c.created_at, groups.c.id)

        def query(connection: Connection) -> list[Group]:
            statement = select(groups)
            if statuses is not None:
                statement = statement.where(groups.c.status.in_(list(statuses)))
            if primary_kind is not None:
                statement = statement.join(agents, agents.c.id == groups.c.primary_agent_id).where(
                    agents.c.kind == primary_kind
                )
            if after is not None:
                found = connection.execute(select(*key).where(groups.c.id == after)).first()
                if found is None:
                    raise GroupNotFound(after)
                statement = statement.where(_after(key, tuple(found)))
            statement = statement.order_by(*key)
            if limit is not None:
                statement = statement.limit(limit)
            rows = connection.execute(statement).mappings().all()
            members = _sleeptime_members(connection, [row["id"] for row in rows])
            return [
                _from_row(Group, row, sleeptime_agent_ids=members.get(row["id"], []))
                for row in rows
            ]

        return self._read(query)

    def update_group(self, group_id: str, values: Mapping[str, Any]) -> Future[None]:
        def op(connection: Connection) -> None:
            result = connection.execute(
                update(groups)
                .where(groups.c.id == group_id)
                .values({"updated_at": utcnow(), **values})
            )
            if result.rowcount != 1:
                raise GroupNotFound(group_id)

        return self.committer.submit(op, lease=self.lease_of(group_id))

    def fail_group(self, group_id: str, reason: str) -> Future[None]:
        """Mark the group failed: it takes no more turns."""
        return self.update_group(group_id, {"status": "failed", "failure_reason": storable(reason)})

    def get_agent(self, agent_id: str) -> Agent:
        def query(connection: Connection) -> Agent:
            row = connection.execute(_SELECT_AGENT, {"agent_id": agent_id}).mappings().first()
            if row is None:
                raise AgentNotFound(agent_id)
            return _agent(row)

        return self._read(query)

    # -- memory blocks --------------------------------------------------------------------

    def get_blocks(self, agent_id: str) -> Blocks:
        """The group's shared blocks then the agent's own, in creation order.

        The owning store answers from its cache of committed blocks once it has read the
        group (see `_block_cache`); a read-only store, and one that does not serve the
        group (another process owns it and edits its blocks), always asks the database.
        """
        cache = self._block_cache
        if cache is not None and (cached := cache.blocks_of(agent_id)) is not None:
            return cached
        epoch = 0 if cache is None else cache.epoch

        def query(connection: Connection) -> tuple[str, list[Block]]:
            agent = connection.execute(_SELECT_AGENT, {"agent_id": agent_id}).mappings().first()
            if agent is None:
                raise AgentNotFound(agent_id)
            rows = connection.execute(_SELECT_GROUP_BLOCKS, {"group_id": agent["group_id"]})
            return agent["group_id"], [_block(r) for r in rows.mappings()]

        group_id, group_blocks = self._read(query)
        if cache is None or not self.serves(group_id):
            return visible_to(agent_id, group_blocks)
        return cache.remember(agent_id, group_id, group_blocks, epoch)

    def edit_block(
        self,
        block_id: str,
        change: Callable[[Block], str],
        *,
        run_id: str | None = None,
        tool: str | None = None,
        tool_call_id: str | None = None,
    ) -> Block:
        """Apply `change` to the block's current value in one transaction, with the
        version it makes in the block's history (an edit by a run's memory tool: source
        `run`, with `run_id`, `tool` and `tool_call_id`; without a run, by a primary agent
        during its turn: source `agent`).

        An exception raised by `change` (a refused memory tool call) comes back to the
        caller and nothing is written; so does BlockNotFound for a block deleted
        meanwhile. The edit is planned in the writer thread against the block as the
        transaction sees it, and written guarded by its version, merged with the other
        writes of its batch.
        """
        source: BlockSource = "agent" if run_id is None else "run"
        by = (run_id, tool, tool_call_id)
        return self._change_block(block_id, change, "edited", source, by)

    def _change_block(
        self,
        block_id: str,
        change: Callable[[Block], str],
        how: BlockChange,
        source: BlockSource,
        by: tuple[str | None, str | None, str | None] = (None, None, None),
        missing: Callable[[], Exception] | None = None,
    ) -> Block:
        """A new value for a block and its version row, in one transaction (see
        `edit_block`); `missing()` is the error if the block is gone."""
        cache = self._block_cache
        editing_run = by[0] if source == "run" else None

        def plan(connection: Connection, txn: Txn) -> tuple[Write | None, Block | Exception]:
            if editing_run is not None:
                # In order with the run's status changes (they share its key): an edit
                # queued behind the run's cancel, timeout or re-queue is refused.
                status = connection.execute(_RUN_STATUS, {"run_id": editing_run}).scalar()
                if status != RunStatus.RUNNING.value:
                    ended = str(status or "deleted")
                    return None, TransitionRefused(editing_run, ended, "edited")
            current = self._current_block(connection, txn, block_id)
            if current is None:
                gone = missing() if missing is not None else None
                return None, gone or BlockNotFound(None, "its group", block_id=block_id)
            try:
                value = change(current)
            except Exception as refused:  # returned, not raised: the batch must not roll back
                return None, refused
            edited = current.model_copy(update={"value": value, "version": current.version + 1})
            txn.scratch[f"block:{block_id}"] = edited
            if cache is not None:
                txn.on_commit(partial(cache.edited, edited))
            at = utcnow()
            params = {
                "block_id": block_id,
                "value": value,
                "version": edited.version,
                "expected": current.version,
                "at": at,
            }
            run_id, tool, tool_call_id = by
            version = _version_values(
                edited, how, source, at=at, run_id=run_id, tool=tool, tool_call_id=tool_call_id
            )
            write = Write(
                guard=(_WRITE_BLOCK, params),
                refusal=lambda: StoreRejected(
                    self.url, f"block {block_id} changed under the writer"
                ),
                inserts=[(_INSERT_BLOCK_VERSIONS, [version])],
                keys=[block_id],
            )
            return write, edited

        lease = self.lease_of(self._group_of_block(block_id, missing))
        try:
            keys = [block_id] if editing_run is None else [block_id, editing_run]
            outcome = self.committer.run(Planned(plan, keys=keys, lease=lease))
        except BaseException:
            if cache is not None:
                cache.forget(block_id)  # it may have committed all the same
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _group_of_block(self, block_id: str, missing: Callable[[], Exception] | None = None) -> str:
        known = None if self._block_cache is None else self._block_cache.committed(block_id)
        if known is not None:
            return known.group_id
        found = self._read(lambda c: c.execute(_GROUP_OF_BLOCK, {"block_id": block_id}).scalar())
        if found is None:
            raise (
                missing()
                if missing is not None
                else BlockNotFound(None, "its group", block_id=block_id)
            )
        return str(found)

    def _current_block(self, connection: Connection, txn: Txn, block_id: str) -> Block | None:
        """The block as this transaction sees it: after its own earlier writes (None once
        deleted), else as last committed (known to the owner, or read when the transaction
        must be exact); None if there is no such block."""
        key = f"block:{block_id}"
        if key in txn.scratch:
            written: Block | None = txn.scratch[key]
            return written
        if not txn.exact and self._block_cache is not None:
            committed = self._block_cache.committed(block_id)
            if committed is not None:
                return committed
        row = connection.execute(_LOCK_BLOCK, {"block_id": block_id}).mappings().first()
        return None if row is None else _block(row)

    # -- memory blocks from the application (issue 19) -----------------------------------

    def block_view(self, view_id: str) -> tuple[str, str | None]:
        """(group id, agent id) of the blocks `view_id` names: an agent's view (its
        group's shared blocks, then its own), or a group's (agent id None: the shared
        blocks only). Raises AgentNotFound or GroupNotFound (`view_not_found`)."""
        cache = self._block_cache
        if cache is not None and (known := cache.group_of(view_id)) is not None:
            return known, view_id

        def query(connection: Connection) -> tuple[str, str | None]:
            found = connection.execute(
                select(agents.c.group_id).where(agents.c.id == view_id)
            ).scalar()
            if found is not None:
                return str(found), view_id
            if connection.execute(_SELECT_GROUP, {"group_id": view_id}).first() is not None:
                return view_id, None
            raise view_not_found(view_id)

        return self._read(query)

    def shared_blocks(self, group_id: str) -> Blocks:
        """The group's shared blocks, in creation order (from the owner's cache, as
        `get_blocks`)."""
        cache = self._block_cache
        if cache is not None and (cached := cache.shared_of(group_id)) is not None:
            return cached
        epoch = 0 if cache is None else cache.epoch

        def query(connection: Connection) -> list[Block]:
            rows = connection.execute(_SELECT_GROUP_BLOCKS, {"group_id": group_id}).mappings()
            found = [_block(r) for r in rows]
            if (
                not found
                and connection.execute(_SELECT_GROUP, {"group_id": group_id}).first() is None
            ):
                raise GroupNotFound(group_id)
            return found

        group_blocks = self._read(query)
        if cache is None or not self.serves(group_id):
            return visible_to(None, group_blocks)
        return cache.remember(None, group_id, group_blocks, epoch)

    def set_block(self, block: Block, value: str, where: str) -> Block:
        """Give the block a new value (source `application`, change `set`), with its
        version, in one transaction; BlockNotFound (naming `where`) if it was deleted."""
        return self._change_block(
            block.id,
            lambda current: value,
            "set",
            "application",
            missing=lambda: BlockNotFound(block.label, where),
        )

    def create_block(self, block: Block, where: str) -> Block:
        """Add a block (version 1, source `application`) to its group, after the group's
        other blocks, in one transaction. BlockExists (nothing written) if its label is
        in the view it goes to: for a shared block, any block of the group; for an
        agent's own block, the shared ones and that agent's."""
        cache = self._block_cache
        layout = _layout_key(block.group_id)

        def plan(connection: Connection, txn: Txn) -> tuple[Write | None, Block | Exception]:
            rows = connection.execute(
                select(blocks.c.label, blocks.c.agent_id, blocks.c.position).where(
                    blocks.c.group_id == block.group_id
                )
            ).all()
            if (
                not rows
                and connection.execute(_SELECT_GROUP, {"group_id": block.group_id}).first() is None
            ):
                return None, GroupNotFound(block.group_id)
            if any(
                label == block.label and (block.agent_id is None or owner in (None, block.agent_id))
                for label, owner, _ in rows
            ):
                return None, BlockExists(block.label, where)
            at = utcnow()
            position = max((p for _, _, p in rows), default=-1) + 1
            row = {**block.model_dump(), "position": position, "updated_at": at}
            txn.scratch[f"block:{block.id}"] = block
            if cache is not None:
                txn.on_commit(partial(cache.added, block))
            version = _version_values(block, "created", "application", at=at)
            write = Write(
                inserts=[(_INSERT_BLOCKS, [row]), (_INSERT_BLOCK_VERSIONS, [version])],
                keys=[layout, block.id],
            )
            return write, block

        return self._layout_change(block.group_id, block.id, Planned(plan, [layout, block.id]))

    def delete_block(self, block: Block, where: str) -> Block:
        """Remove the block (returned as it was last committed), with a last version
        (change `deleted`, value None), in one transaction; its history stays.
        BlockNotFound (naming `where`) if it is gone already."""
        cache = self._block_cache
        layout = _layout_key(block.group_id)

        def plan(connection: Connection, txn: Txn) -> tuple[Write | None, Block | Exception]:
            current = self._current_block(connection, txn, block.id)
            if current is None:
                return None, BlockNotFound(block.label, where)
            at = utcnow()
            txn.scratch[f"block:{block.id}"] = None
            if cache is not None:
                txn.on_commit(partial(cache.removed, current))
            last = current.model_copy(update={"version": current.version + 1})
            version = _version_values(last, "deleted", "application", at=at, deleted=True)
            write = Write(
                guard=(_DELETE_BLOCK, {"block_id": block.id, "expected": current.version}),
                refusal=lambda: StoreRejected(
                    self.url, f"block {block.id} changed under the writer"
                ),
                inserts=[(_INSERT_BLOCK_VERSIONS, [version])],
                keys=[layout, block.id],
            )
            return write, current

        return self._layout_change(block.group_id, block.id, Planned(plan, [layout, block.id]))

    def _layout_change(
        self, group_id: str, block_id: str, planned: Planned[Block | Exception]
    ) -> Block:
        """Run a creation or deletion under the group's lease; on an unknown outcome the
        owner forgets the group's layout and the block (the next read asks the database)."""
        planned.lease = self.lease_of(group_id)
        try:
            outcome = self.committer.run(planned)
        except BaseException:
            if self._block_cache is not None:
                self._block_cache.forget(block_id)
                self._block_cache.forget_group(group_id)
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def block_history(
        self,
        group_id: str,
        agent_id: str | None,
        label: str,
        where: str,
        limit: int | None = None,
        after: int | None = None,
    ) -> list[BlockVersion]:
        """Every version of the blocks labelled `label` in a view (an agent's, or with
        `agent_id` None the group's shared blocks), deleted ones included, oldest first:
        at most `limit`, after the version with id `after`. BlockNotFound if no block of
        that label is, or ever was, in the view; BlockVersionNotFound if `after` names
        no version of it (a wrong id, or one removed by retention since)."""
        in_view = [block_versions.c.group_id == group_id, block_versions.c.label == label]
        if agent_id is None:
            in_view.append(block_versions.c.agent_id.is_(None))
        else:
            in_view.append(
                or_(block_versions.c.agent_id.is_(None), block_versions.c.agent_id == agent_id)
            )
        statement = select(block_versions).where(*in_view)
        if after is not None:
            statement = statement.where(block_versions.c.id > after)
        statement = statement.order_by(block_versions.c.id)
        if limit is not None:
            statement = statement.limit(limit)

        def query(connection: Connection) -> list[BlockVersion]:
            rows = connection.execute(statement).mappings().all()
            if after is not None:
                cursor = select(block_versions.c.id).where(*in_view, block_versions.c.id == after)
                if connection.execute(cursor).first() is None:
                    in_view_now(connection)  # BlockNotFound first, for an unknown label
                    raise BlockVersionNotFound(str(after))
            if rows:
                return [_from_row(BlockVersion, r) for r in rows]
            in_view_now(connection)  # (a block whose history was pruned away: no versions)
            return []

        def in_view_now(connection: Connection) -> None:
            """Raise BlockNotFound unless a block of the label has versions in the view,
            or is in it."""
            if connection.execute(select(block_versions.c.id).where(*in_view).limit(1)).first():
                return
            found = connection.execute(_SELECT_GROUP_BLOCKS, {"group_id": group_id}).mappings()
            labels = visible_to(agent_id, [_block(r) for r in found]).labels()
            if label not in labels:
                raise BlockNotFound(label, where, labels)

        return self._read(query)

    def group_blocks(self, group_id: str) -> list[Block]:
        """Every block of the group, shared and agents' own, in creation order, as
        stored (for checks)."""
        return self._read(
            lambda c: [
                _block(r)
                for r in c.execute(_SELECT_GROUP_BLOCKS, {"group_id": group_id}).mappings()
            ]
        )

    def block_versions(self, group_id: str) -> list[tuple[str, int, str | None, str]]:
        """(block id, version, value, change) of every stored version of the group's
        blocks, in the order they were written (for checks)."""
        statement = (
            select(
                block_versions.c.block_id,
                block_versions.c.version,
                block_versions.c.value,
                block_versions.c.change,
            )
            .where(block_versions.c.group_id == group_id)
            .order_by(block_versions.c.id)
        )
        return self._read(lambda c: [(r[0], r[1], r[2], r[3]) for r in c.execute(statement)])

    # -- messages -------------------------------------------------------------------------

    def list_messages(
        self, agent_id: str, limit: int | None = None, after: str | None = None
    ) -> list[Message]:
        """An agent's history, oldest first: all of it, or `limit` messages after the
        message `after` (MessageNotFound if it is not one of the agent's)."""

        def query(connection: Connection) -> list[Message]:
            statement = _SELECT_HISTORY
            if after is not None:
                cursor = connection.execute(
                    select(messages.c.sequence).where(
                        messages.c.id == after, messages.c.agent_id == agent_id
                    )
                ).scalar()
                if cursor is None:
                    if connection.execute(_SELECT_AGENT, {"agent_id": agent_id}).first() is None:
                        raise AgentNotFound(agent_id)
                    raise MessageNotFound(after)
                statement = statement.where(messages.c.sequence > cursor)
            if limit is not None:
                statement = statement.limit(limit)
            rows = connection.execute(statement, {"agent_id": agent_id}).mappings().all()
            if (
                not rows
                and connection.execute(_SELECT_AGENT, {"agent_id": agent_id}).first() is None
            ):
                raise AgentNotFound(agent_id)
            return [_message(r) for r in rows]

        return self._read(query)

    def recent_messages(self, agent_id: str, limit: int) -> list[Message]:
        """The last `limit` messages of an agent's history, oldest first."""
        if limit <= 0:
            return []
        rows = self._read(
            lambda c: (
                c.execute(_SELECT_RECENT, {"agent_id": agent_id, "limit": limit}).mappings().all()
            )
        )
        return [_message(r) for r in reversed(rows)]

    def window(self, agent_id: str, first_seq: int, last_seq: int) -> list[Message]:
        """The messages of one agent with sequence in [first_seq, last_seq], oldest first."""
        return self._read(
            lambda c: [
                _message(r)
                for r in c.execute(
                    _SELECT_WINDOW, {"agent_id": agent_id, "first": first_seq, "last": last_seq}
                ).mappings()
            ]
        )

    def last_sequence(self, agent_id: str) -> int:
        return self._read(lambda c: c.execute(_LAST_SEQUENCE, {"agent_id": agent_id}).scalar() or 0)

    # -- turns ----------------------------------------------------------------------------

    def record_turn(self, turn: TurnWrite) -> Future[None]:
        """Store a turn's messages, counter, cursor and runs in one transaction."""
        moved = {
            "group_id": turn.group_id,
            "expected_turns": turn.expected_turns,
            "turns": turn.turns,
            "counter": turn.counter,
            "cursor": turn.cursor,
            "cursor_seq": turn.cursor_seq,
            "at": turn.at,
        }
        rows = [_message_values(m) for m in turn.messages]
        run_rows = [_run_values(r) for r in turn.runs]
        lease = self.lease_of(turn.group_id)
        event_rows = _created_events(turn.runs, lease[1])
        request_rows = [] if turn.request is None else [_turn_request_values(turn)]

        return self.committer.submit(
            Write(
                guard=(_MOVE_GROUP, moved),
                refusal=lambda: StaleTurn(
                    f"group {turn.group_id} is no longer at turn {turn.expected_turns}"
                ),
                inserts=[
                    (_INSERT_MESSAGES, rows),
                    (_INSERT_RUNS, run_rows),
                    (_INSERT_EVENTS, event_rows),
                    (_INSERT_TURN_REQUESTS, request_rows),
                ],
                keys=[turn.group_id, *(r.id for r in turn.runs)],
                lease=lease,
            )
        )

    def find_turn_request(self, group_id: str, request_id: str) -> TurnRequest | None:
        """The answer to the group's turn taken with `request_id`, or None if there is none.

        The result is the first call's: the same turn, `fired`, run ids and messages (read
        back from the turn's stored messages, by id)."""

        def query(connection: Connection) -> TurnRequest | None:
            found = connection.execute(
                _SELECT_TURN_REQUEST, {"group_id": group_id, "request_id": request_id}
            ).first()
            if found is None:
                return None
            turn, answer = found
            message_ids: list[str] = answer["message_ids"]
            by_id = {}
            if message_ids:
                rows = connection.execute(_SELECT_MESSAGES, {"message_ids": message_ids})
                by_id = {r["id"]: _message(r) for r in rows.mappings()}
            result = TurnResult(
                group_id=group_id,
                turn=turn,
                messages=[by_id[i] for i in message_ids if i in by_id],
                fired=answer["fired"],
                run_ids=answer["run_ids"],
            )
            return TurnRequest(request_id=request_id, result=result, error=answer["error"])

        return self._read(query)

    def request_ids(self, group_id: str) -> list[tuple[str, int]]:
        """(request id, turn) of each turn of the group taken with a request id."""
        statement = (
            select(turn_requests.c.request_id, turn_requests.c.turn)
            .where(turn_requests.c.group_id == group_id)
            .order_by(turn_requests.c.turn)
        )
        return self._read(lambda c: [(r[0], r[1]) for r in c.execute(statement).all()])

    # -- runs -----------------------------------------------------------------------------

    def apply_transition(
        self, change: Transition, after: Sequence[Future[Any]] = ()
    ) -> Future[datetime | None]:
        """Write one status change; its future resolves with the time stored (the
        writer's, as it takes the change: after every write queued before it, a memory
        edit of the run's included, `change.at` being when it was asked for), or fails
        with TransitionRefused (and nothing of it is stored) unless the stored run is at
        `change.old` and `change.expected_attempt`.

        `after`: the futures of writes queued before this one that it must not outlive
        (the ends of the agent's earlier runs, for a start): if one of them failed, this
        one fails too, with StoreUnavailable, and nothing of it is stored."""
        params = {
            "run_id": change.run_id,
            "status": change.new.value,
            "attempt": change.attempt,
            "expected_attempt": change.expected_attempt,
            "at": change.at,
            "stop_reason": None if change.stop_reason is None else change.stop_reason.value,
            # An agent's error text may hold what no database stores (a NUL, a surrogate).
            "error": None if change.error is None else storable(change.error),
        }
        if change.new is RunStatus.RUNNING:
            statement = _START_RUN
        elif change.new.terminal:
            statement = _END_RUN
        else:
            statement = _REQUEUE_RUN
        lease = None if change.group_id is None else self.lease_of(change.group_id)
        event = {
            "run_id": change.run_id,
            "status": change.new.value,
            "at": change.at,
            "attempt": change.attempt,
            "reason": None if change.reason is None else storable(change.reason),
            "epoch": None if lease is None else lease[1],
        }
        return self.committer.submit(
            Write(
                guard=(statement, params),
                refusal=lambda: TransitionRefused(
                    change.run_id, change.old.value, change.new.value, change.expected_attempt
                ),
                inserts=[(_INSERT_EVENTS, [event])],
                appends=[_message_values(m) for m in change.messages],
                keys=[change.run_id],
                lease=lease,
                stamp=[params, event],
                after=None if not after else (after, self._earlier_end_missing),
            )
        )

    def _earlier_end_missing(self) -> StoreUnavailable:
        return StoreUnavailable(
            self.url, "the end of an earlier run of the agent was not recorded; started later"
        )

    def store_messages(self, stored: Sequence[Message]) -> Future[None]:
        """Append messages to agents' histories (e.g. those of a run refused late).

        Messages of an agent no longer stored (its group was deleted meanwhile) are
        dropped, in the writing transaction: a late run never brings rows back."""
        lease = self.lease_of(stored[0].group_id) if stored else None
        rows = [_message_values(m) for m in stored]

        def plan(connection: Connection, txn: Txn) -> tuple[Write | None, None]:
            wanted = list(dict.fromkeys(row["agent_id"] for row in rows))
            alive = set(
                connection.execute(select(agents.c.id).where(agents.c.id.in_(wanted))).scalars()
            )
            kept = [row for row in rows if row["agent_id"] in alive]
            return (Write(appends=kept) if kept else None), None

        return self.committer.submit(Planned(plan, keys=(), lease=lease))

    def get_run(self, run_id: str) -> Run:
        def query(connection: Connection) -> Run:
            row = connection.execute(_SELECT_RUN, {"run_id": run_id}).mappings().first()
            if row is None:
                raise RunNotFound(run_id)
            return _run(row)

        return self._read(query)

    def get_runs(self, run_ids: Iterable[str]) -> dict[str, Run]:
        wanted = list(dict.fromkeys(run_ids))

        def query(connection: Connection) -> dict[str, Run]:
            found: dict[str, Run] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = connection.execute(select(runs).where(runs.c.id.in_(chunk))).mappings()
                found.update((r["id"], _run(r)) for r in rows)
            return found

        return self._read(query)

    def list_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        after: str | None = None,
    ) -> list[Run]:
        """Runs oldest first (or newest first), filtered by agent, group and status; with
        `after`, those that come after that run in this order (RunNotFound if none).

        The order is (created_at, turn, position, id): total, so a keyset page never
        repeats or skips a run that was there when the previous page was read."""
        order = (runs.c.created_at, runs.c.turn, runs.c.position, runs.c.id)

        def query(connection: Connection) -> list[Run]:
            statement = select(runs).where(*_run_filters(agent_id, group_id, statuses))
            if after is not None:
                found = connection.execute(select(*order).where(runs.c.id == after)).first()
                if found is None:
                    raise RunNotFound(after)
                statement = statement.where(_after(order, tuple(found), newest_first))
            statement = statement.order_by(*(c.desc() for c in order) if newest_first else order)
            if limit is not None:
                statement = statement.limit(limit)
            return [_run(r) for r in connection.execute(statement).mappings()]

        return self._read(query)

    def count_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
    ) -> int:
        """How many runs `list_runs` would return with these filters (no limit)."""
        statement = (
            select(func.count())
            .select_from(runs)
            .where(*_run_filters(agent_id, group_id, statuses))
        )
        return int(self._read(lambda c: c.execute(statement).scalar_one()))

    def open_runs(self) -> list[Run]:
        """Every run not yet terminal, per agent in creation order."""
        statement = (
            select(runs)
            .where(runs.c.status.in_(OPEN_STATUSES))
            .order_by(runs.c.agent_id, runs.c.turn, runs.c.position)
        )
        return self._read(lambda c: [_run(r) for r in c.execute(statement).mappings()])

    def event_histories(self, group_id: str) -> dict[str, list[tuple[str, int, datetime]]]:
        """Every run of the group with its recorded events, (status, attempt, at), in the
        order they were written; statuses as stored, so a damaged one can be reported."""
        statement = (
            select(run_events.c.run_id, run_events.c.status, run_events.c.attempt, run_events.c.at)
            .join(runs, runs.c.id == run_events.c.run_id)
            .where(runs.c.group_id == group_id)
            .order_by(run_events.c.run_id, run_events.c.id)
        )
        histories: dict[str, list[tuple[str, int, datetime]]] = {}
        for run_id, status, attempt, at in self._read(lambda c: c.execute(statement).all()):
            histories.setdefault(run_id, []).append((status, attempt, at))
        return histories

    def event_epochs(self, group_id: str) -> list[tuple[int, int | None]]:
        """(event id, lease epoch) of every run event of the group, in writing order."""
        statement = (
            select(run_events.c.id, run_events.c.epoch)
            .join(runs, runs.c.id == run_events.c.run_id)
            .where(runs.c.group_id == group_id)
            .order_by(run_events.c.id)
        )
        return self._read(lambda c: [(int(r[0]), r[1]) for r in c.execute(statement).all()])

    def turn_numbers(self, agent_id: str) -> list[tuple[int, int | None, str]]:
        """(sequence, turn, id) of each message of an agent, oldest first."""
        statement = (
            select(messages.c.sequence, messages.c.turn, messages.c.id)
            .where(messages.c.agent_id == agent_id)
            .order_by(messages.c.sequence)
        )
        return self._read(lambda c: [(r[0], r[1], r[2]) for r in c.execute(statement).all()])

    def run_events(
        self, run_id: str, limit: int | None = None, after: int | None = None
    ) -> list[RunEvent]:
        """The run's events oldest first; `limit` of them after the event with id `after`
        (RunEventNotFound if the run has none with that id)."""

        def query(connection: Connection) -> list[RunEvent]:
            if connection.execute(_SELECT_RUN, {"run_id": run_id}).first() is None:
                raise RunNotFound(run_id)
            statement = _SELECT_EVENTS
            if after is not None:
                mine = (run_events.c.id == after, run_events.c.run_id == run_id)
                if connection.execute(select(run_events.c.id).where(*mine)).first() is None:
                    raise RunEventNotFound(str(after))
                statement = statement.where(run_events.c.id > after)
            if limit is not None:
                statement = statement.limit(limit)
            rows = connection.execute(statement, {"run_id": run_id}).mappings()
            return [_run_event(r) for r in rows]

        return self._read(query)

    # -- retention ------------------------------------------------------------------------

    def prune_batch(
        self, group_id: str, settings: PruneSettings, step: str, prune_id: int | None
    ) -> Future[tuple[dict[str, int], bool, int | None]]:
        """One batch of a prune of the group (`step`: runs, messages, block_versions or
        turn_requests; see `persistence._retention`), in one transaction through the
        writer, fenced by the group's lease: it removes up to `settings.batch_size` rows
        of its kind, moves the marks and adds its counts to the group's `prunes` row
        (`prune_id`, made by the first batch). Resolves with (counts by kind, whether
        more may remain, the `prunes` row id)."""
        plan = dict(retention.BATCHES)[step]

        def op(connection: Connection) -> tuple[dict[str, int], bool, int | None]:
            counts, more = plan(connection, group_id, settings, settings.batch_size, True)
            if not any(counts.values()):
                return counts, False, prune_id
            recorded = retention.record_prune(connection, group_id, settings, counts, prune_id)
            return counts, more, recorded

        return self.committer.submit(op, lease=self.lease_of(group_id))

    def prune_group(self, group_id: str, settings: PruneSettings) -> tuple[dict[str, int], int]:
        """Prune the group batch by batch (see `prune_batch`), each step until nothing of
        its kind is left to remove; return (rows removed by kind, batches committed).

        Raises ShardLost if this process loses the group's shard meanwhile: the batches
        committed before stay done."""
        total: dict[str, int] = {}
        batches = 0
        prune_id: int | None = None
        for step, _ in retention.BATCHES:
            more = True
            while more:
                counts, more, prune_id = self.prune_batch(
                    group_id, settings, step, prune_id
                ).result()
                if any(counts.values()):
                    batches += 1
                for kind, count in counts.items():
                    total[kind] = total.get(kind, 0) + count
        return total, batches

    def prune_counts(self, group_id: str, settings: PruneSettings) -> dict[str, int]:
        """What a prune of the group would remove now, by kind (nothing is removed)."""

        def query(connection: Connection) -> dict[str, int]:
            total: dict[str, int] = {}
            for _, plan in retention.BATCHES:
                counts, _ = plan(connection, group_id, settings, None, False)
                for kind, count in counts.items():
                    total[kind] = total.get(kind, 0) + count
            return total

        return self._read(query)

    def retention_marks(self, group_id: str) -> RetentionMarks:
        """The group's cursor sequence and what retention removed of it (its marks)."""

        def query(connection: Connection) -> RetentionMarks:
            row = connection.execute(
                select(
                    groups.c.cursor_seq,
                    groups.c.messages_pruned_through,
                    groups.c.turns_pruned_through,
                ).where(groups.c.id == group_id)
            ).first()
            if row is None:
                raise GroupNotFound(group_id)
            marks = connection.execute(
                select(agents.c.id, agents.c.runs_pruned_through_seq).where(
                    agents.c.group_id == group_id
                )
            ).all()
            return RetentionMarks(
                cursor_seq=row[0],
                messages_pruned_through=row[1],
                turns_pruned_through=row[2],
                runs_pruned_through_seq={str(a): int(m) for a, m in marks},
            )

        return self._read(query)

    # -- groups over their life ----------------------------------------------------------

    def group_agents(self, group_id: str) -> list[Agent]:
        """Every agent the group ever had, in the group's order: the primary, then the
        sleeptime agents, those taken out of it (`removed_at` set) included."""

        def query(connection: Connection) -> list[Agent]:
            if connection.execute(_SELECT_GROUP, {"group_id": group_id}).first() is None:
                raise GroupNotFound(group_id)
            rows = connection.execute(_SELECT_GROUP_AGENTS, {"group_id": group_id}).mappings()
            return [_agent(r) for r in rows]

        return self._read(query)

    def messages_pruned_through(self, group_id: str) -> int:
        """The last primary message sequence retention removed (0: none): what is
        stored of the group's primary history starts after it."""
        return self._read(lambda connection: _pruned_through(connection, group_id))

    def join_agent(self, join: AgentJoin) -> Future[tuple[Agent, list[Run]]]:
        """Add a sleeptime agent to a live group, with its own block (and that block's
        first version) and its backfill runs, in one transaction; StaleTurn if the group
        moved meanwhile (see `AgentJoin`). Resolves to the agent and the runs written."""
        lease = self.lease_of(join.group_id)

        def op(connection: Connection) -> tuple[Agent, list[Run]]:
            _move_group_between_turns(connection, join.group_id, join.expected_turns, join.at)
            agent, planned = join.agent, join.runs
            if join.backfill is not None:
                agent, planned = join.backfill(_pruned_through(connection, join.group_id))
            agent_at = connection.execute(
                select(func.max(agents.c.position)).where(agents.c.group_id == join.group_id)
            ).scalar()
            block_at = connection.execute(
                select(func.max(blocks.c.position)).where(blocks.c.group_id == join.group_id)
            ).scalar()
            connection.execute(insert(agents), [_agent_values(agent, (agent_at or 0) + 1)])
            connection.execute(
                insert(blocks),
                [_block_values(join.persona, 0 if block_at is None else block_at + 1)],
            )
            connection.execute(
                insert(block_versions),
                [_version_values(join.persona, "created", join.persona_source, at=join.at)],
            )
            if planned:
                connection.execute(_INSERT_RUNS, [_run_values(r) for r in planned])
                connection.execute(_INSERT_EVENTS, _created_events(planned, lease[1]))
            return agent, planned

        future = self.committer.submit(op, lease=lease)
        future.add_done_callback(partial(self._layout_changed, join.group_id))
        return future

    def leave_agent(self, leave: AgentLeave) -> Future[Agent]:
        """Take a sleeptime agent out of its live group: `removed_at` / `removed_turn` set,
        every row of it kept; StaleTurn if the group moved meanwhile."""

        def op(connection: Connection) -> Agent:
            _move_group_between_turns(connection, leave.group_id, leave.turns, leave.at)
            changed = connection.execute(
                update(agents)
                .where(
                    agents.c.id == leave.agent_id,
                    agents.c.group_id == leave.group_id,
                    agents.c.role == "sleeptime",
                    agents.c.removed_at.is_(None),
                )
                .values(removed_at=leave.at, removed_turn=leave.turns)
            )
            if changed.rowcount != 1:
                raise StaleTurn(f"agent {leave.agent_id} is no member of group {leave.group_id}")
            row = connection.execute(_SELECT_AGENT, {"agent_id": leave.agent_id}).mappings().one()
            return _agent(row)

        return self.committer.submit(op, lease=self.lease_of(leave.group_id))

    def delete_group(self, group_id: str) -> Future[list[str]]:
        """Remove the group and everything of it, in one transaction: its agents, their
        messages, its runs and their events, its blocks and their versions, its turn
        requests and its prune records. Resolves with the ids of the agents it had;
        GroupNotFound (nothing removed) if there is no such group."""

        def op(connection: Connection) -> list[str]:
            agent_ids = list(
                connection.execute(
                    select(agents.c.id).where(agents.c.group_id == group_id)
                ).scalars()
            )
            group_runs = select(runs.c.id).where(runs.c.group_id == group_id)
            connection.execute(delete(run_events).where(run_events.c.run_id.in_(group_runs)))
            connection.execute(delete(runs).where(runs.c.group_id == group_id))
            if agent_ids:  # by agent (indexed): every message is in one agent's history
                connection.execute(delete(messages).where(messages.c.agent_id.in_(agent_ids)))
            connection.execute(delete(block_versions).where(block_versions.c.group_id == group_id))
            connection.execute(delete(blocks).where(blocks.c.group_id == group_id))
            connection.execute(delete(turn_requests).where(turn_requests.c.group_id == group_id))
            connection.execute(delete(prunes).where(prunes.c.group_id == group_id))
            connection.execute(delete(agents).where(agents.c.group_id == group_id))
            if connection.execute(delete(groups).where(groups.c.id == group_id)).rowcount != 1:
                raise GroupNotFound(group_id)  # rolled back: nothing of it was removed
            for agent_id in agent_ids:  # (the writer thread's own memory)
                self._next_sequence.pop(agent_id, None)
            return agent_ids

        future: Future[list[str]] = self.committer.submit(op, lease=self.lease_of(group_id))
        future.add_done_callback(partial(self._group_deleted, group_id))
        return future

    def _group_deleted(self, group_id: str, done: Future[Any]) -> None:
        """Gone: its blocks leave the owner's cache; unsure, its next read asks again."""
        if self._block_cache is None:
            return
        if done.cancelled() or done.exception() is not None:
            self._block_cache.forget_group(group_id)
        else:
            self._block_cache.drop_group(group_id)

    def _layout_changed(self, group_id: str, done: Future[Any]) -> None:
        """A group's blocks were added or removed (or may have been): the owner's cache
        reads that group's blocks again."""
        if self._block_cache is not None:
            self._block_cache.forget_group(group_id)


def _view(url: URL) -> DatabaseFile | None:
    """A read-only store's hold on a SQLite file (see `DatabaseFile`), if it can be had."""
    path = sqlite_file(url)
    if path is None:
        return None
    try:
        return DatabaseFile(path, url=redact(url))
    except StoreUnavailable:  # a file it cannot open is one this process has no lock on
        return None


def _after(
    key: Sequence[ColumnElement[Any]], values: Sequence[Any], descending: bool = False
) -> ColumnElement[bool]:
    """Rows after `values` in the order of the `key` columns (a keyset page): spelled as
    OR of ANDs, which every backend plans and types as plain comparisons."""
    alternatives = []
    for index, column in enumerate(key):
        beyond = column < values[index] if descending else column > values[index]
        alternatives.append(
            and_(*(key[i] == values[i] for i in range(index)), beyond) if index else beyond
        )
    return or_(*alternatives)


def _run_filters(
    agent_id: str | None, group_id: str | None, statuses: Sequence[RunStatus | str] | None
) -> list[Any]:
    found: list[Any] = []
    if agent_id is not None:
        found.append(runs.c.agent_id == agent_id)
    if group_id is not None:
        found.append(runs.c.group_id == group_id)
    if statuses is not None:
        found.append(runs.c.status.in_([RunStatus(s).value for s in statuses]))
    return found


def _pruned_through(connection: Connection, group_id: str) -> int:
    """The last primary message sequence retention removed of the group (0: none)."""
    statement = select(groups.c.messages_pruned_through).where(groups.c.id == group_id)
    found = connection.execute(statement).first()
    if found is None:
        raise GroupNotFound(group_id)
    return int(found[0])


def _move_group_between_turns(
    connection: Connection, group_id: str, turns: int, at: datetime
) -> None:
    """Mark the group changed, if it is still at `turns`: else GroupNotFound or StaleTurn."""
    moved = connection.execute(
        update(groups).where(groups.c.id == group_id, groups.c.turns == turns).values(updated_at=at)
    )
    if moved.rowcount == 1:
        return
    if connection.execute(_SELECT_GROUP, {"group_id": group_id}).first() is None:
        raise GroupNotFound(group_id)
    raise StaleTurn(f"group {group_id} moved past turn {turns} meanwhile")


# -- rows <-> models ----------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _from_row(model: type[M], row: RowMapping, **extra: Any) -> M:
    """The model whose fields are the row's columns of the same names (plus `extra`).

    Read back as stored (context STORED): rows written before the text rule stay readable.
    """
    names = _FIELDS.get(model)
    if names is None:
        names = _FIELDS[model] = tuple(model.model_fields)
    values = {**{k: row[k] for k in names if k in row}, **extra}
    return model.model_validate(values, context=STORED)


_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {}
"""Each model's field names (pydantic's `model_fields` does some work at every read)."""


def _sleeptime_members(connection: Connection, group_ids: Sequence[str]) -> dict[str, list[str]]:
    """Each group's sleeptime agents still in it, in position order: a query per 500
    groups, not per group."""
    found: dict[str, list[str]] = {}
    for chunk in retention.chunks(group_ids):
        rows = connection.execute(
            select(agents.c.group_id, agents.c.id)
            .where(
                agents.c.group_id.in_(chunk),
                agents.c.role == "sleeptime",
                agents.c.removed_at.is_(None),
            )
            .order_by(agents.c.group_id, agents.c.position)
        )
        for group_id, agent_id in rows:
            found.setdefault(group_id, []).append(agent_id)
    return found


def _load_group(connection: Connection, group_id: str) -> tuple[Group, int, list[Agent]]:
    row = connection.execute(_SELECT_GROUP, {"group_id": group_id}).mappings().first()
    if row is None:
        raise GroupNotFound(group_id)
    members = [
        _agent(r)
        for r in connection.execute(_SELECT_GROUP_AGENTS, {"group_id": group_id}).mappings()
        if r["removed_at"] is None  # a sleeptime agent taken out of the group is no member
    ]
    sleeptime_ids = [a.id for a in members if a.role == "sleeptime"]
    return _from_row(Group, row, sleeptime_agent_ids=sleeptime_ids), row["cursor_seq"], members


def _group_values(group: Group) -> dict[str, Any]:
    values = group.model_dump(exclude={"sleeptime_agent_ids"})
    return {**values, "cursor_seq": 0, "updated_at": group.created_at}


def _agent(row: RowMapping) -> Agent:
    return _from_row(Agent, row)


def _agent_values(agent: Agent, position: int) -> dict[str, Any]:
    return {**agent.model_dump(), "position": position}


def _block(row: RowMapping) -> Block:
    return _from_row(Block, row)


def _block_values(block: Block, position: int) -> dict[str, Any]:
    return {**block.model_dump(), "position": position, "updated_at": utcnow()}


def _layout_key(group_id: str) -> str:
    """The key of a group's set of blocks: writes that add or remove one run in order."""
    return f"blocks-of:{group_id}"


def _version_values(
    block: Block,
    change: BlockChange,
    source: BlockSource,
    *,
    at: datetime,
    run_id: str | None = None,
    tool: str | None = None,
    tool_call_id: str | None = None,
    deleted: bool = False,
) -> dict[str, Any]:
    """The `block_versions` row of the block as it is now (`deleted`: its last version,
    without a value)."""
    return {
        "block_id": block.id,
        "group_id": block.group_id,
        "agent_id": block.agent_id,
        "label": block.label,
        "version": block.version,
        "value": None if deleted else block.value,
        "change": change,
        "source": source,
        "run_id": run_id,
        "tool": tool,
        # A model's tool call id is the agent's text: kept storable, within its column.
        "tool_call_id": None if tool_call_id is None else storable(tool_call_id)[:200],
        "at": at,
    }


def _created_events(created: Sequence[Run], epoch: int) -> list[dict[str, Any]]:
    """The first event of each run just created, written under the lease at `epoch`."""
    return [
        {
            "run_id": r.id,
            "status": r.status.value,
            "at": r.created_at,
            "attempt": r.attempt,
            "reason": "created",
            "epoch": epoch,
        }
        for r in created
    ]


def _message(row: RowMapping) -> Message:
    return _from_row(Message, row)


def _message_values(message: Message) -> dict[str, Any]:
    """The message's row: what `model_dump(mode="json")` gives (content parts without
    their None fields), but `created_at` as it is, for its column type to store.

    Read from the fields as they are, several times cheaper than dumping: every field of
    a message, a part and a tool call is a str, an int or None, the same in JSON
    (tests/test_message_rows.py compares the two).
    """
    values = dict(vars(message))
    values["content"] = [
        {name: value for name, value in vars(part).items() if value is not None}
        for part in message.content
    ]
    if message.tool_calls is not None:
        values["tool_calls"] = [dict(vars(call)) for call in message.tool_calls]
    return values


def _run_event(row: RowMapping) -> RunEvent:
    return RunEvent(
        run_id=row["run_id"],
        status=RunStatus(row["status"]),
        at=row["at"],
        attempt=row["attempt"],
        reason=row["reason"],
        id=row["id"],
    )


def _turn_request_values(turn: TurnWrite) -> dict[str, Any]:
    """The row of a turn's request: what its caller was told, by reference to the turn."""
    assert turn.request is not None
    result = turn.request.result
    answer = {
        "message_ids": [m.id for m in result.messages],
        "fired": result.fired,
        "run_ids": result.run_ids,
        # An agent's error text may hold what no database stores (a NUL, a surrogate).
        "error": None if turn.request.error is None else storable(turn.request.error),
    }
    return {
        "group_id": turn.group_id,
        "request_id": turn.request.request_id,
        "turn": turn.turns,
        "result": answer,
        "created_at": turn.at,
    }


def _run(row: RowMapping) -> Run:
    return _from_row(Run, row)


def _run_values(run: Run) -> dict[str, Any]:
    values = run.model_dump(exclude={"metadata"})
    return {**values, "position": run.metadata.get("position", 0), "metadata": run.metadata}
