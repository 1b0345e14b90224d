"""The store: every query the runtime makes, next to the tables it touches.

Reads run on a pool of reader connections in the caller's thread. Writes are functions
run by the single `Committer`, one function per transactional operation of the spec.
Statements are SQLAlchemy Core, built once at import: the hot path pays for neither ORM
bookkeeping nor statement compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from functools import partial
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import (
    URL,
    Connection,
    RowMapping,
    Table,
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
    Blocks,
    Group,
    GroupNotFound,
    Message,
    NotOwner,
    Run,
    RunEvent,
    RunNotFound,
    RunStatus,
    StoreRejected,
    StoreUnavailable,
    TransitionRefused,
    TurnResult,
)
from messages._ids import new_id
from messages._text import STORED, storable
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
from persistence._models import (
    AgentRow,
    BlockRow,
    BlockVersionRow,
    GroupRow,
    MessageRow,
    PruneRow,
    RunEventRow,
    RunRow,
    TurnRequestRow,
    utcnow,
)
from persistence._observed import NO_STORE_OBSERVER, StoreObserver
from persistence._ownership import DatabaseFile, Ownership
from persistence._records import (
    AgentJoin,
    AgentLeave,
    GroupState,
    NewGroup,
    Transition,
    TurnRequest,
    TurnWrite,
)

T = TypeVar("T")
OPEN_STATUSES = (RunStatus.CREATED.value, RunStatus.RUNNING.value)
MAX_REMEMBERED_HISTORIES = 1_000_000  # agents whose history end the writer remembers

groups = cast(Table, GroupRow.__table__)
agents = cast(Table, AgentRow.__table__)
blocks = cast(Table, BlockRow.__table__)
messages = cast(Table, MessageRow.__table__)
runs = cast(Table, RunRow.__table__)
run_events = cast(Table, RunEventRow.__table__)
turn_requests = cast(Table, TurnRequestRow.__table__)
block_versions = cast(Table, BlockVersionRow.__table__)
prunes = cast(Table, PruneRow.__table__)

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
            self.book.add(dict.fromkeys(range(shards), 0))
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
        return self._guard(lambda: self.leases.owner(shard))  # type: ignore[union-attr]

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
            found = connection.execute(_LAST_SEQUENCES, {"agent_ids": unknown}).all()
            next_by_agent.update((agent_id, last + 1) for agent_id, last in found)
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
        def run() -> T:
            with self._reader.connect() as connection:
                return query(connection)

        return self._guard(run)

    # -- groups and agents ----------------------------------------------------------------

    def create_group(self, new: NewGroup) -> Future[None]:
        ordered = sorted(new.agents, key=lambda a: a.role != "primary")

        def op(connection: Connection) -> None:
            connection.execute(insert(groups), [_group_values(new.group)])
            connection.execute(insert(agents), [_agent_values(a, i) for i, a in enumerate(ordered)])
            connection.execute(
                insert(blocks), [_block_values(b, i) for i, b in enumerate(new.blocks)]
            )

        return self.committer.submit(op, lease=self.lease_of(new.group.id))

    def get_group(self, group_id: str) -> Group:
        return self._read(lambda c: _load_group(c, group_id)[0])

    def group_state(self, group_id: str) -> GroupState:
        """The group with its agents and the end of its primary history."""

        def query(connection: Connection) -> GroupState:
            group, cursor_seq, members = _load_group(connection, group_id)
            last = connection.execute(_LAST_SEQUENCE, {"agent_id": group.primary_agent_id})
            return GroupState(
                group=group,
                cursor_seq=cursor_seq,
                last_seq=last.scalar() or 0,
                primary=members[0],
                sleeptime=members[1:],
            )

        return self._read(query)

    def count_groups(self) -> int:
        """How many groups are stored."""
        statement = select(func.count()).select_from(groups)
        return int(self._read(lambda c: c.execute(statement).scalar_one()))

    def list_groups(self) -> list[Group]:
        def query(connection: Connection) -> list[Group]:
            ids = connection.execute(select(groups.c.id).order_by(groups.c.created_at)).scalars()
            return [_load_group(connection, group_id)[0] for group_id in ids]

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

    def edit_block(self, block_id: str, change: Callable[[Block], str]) -> Block:
        """Apply `change` to the block's current value in one transaction.

        An exception raised by `change` (a refused memory tool call) comes back to the
        caller and nothing is written. The edit is planned in the writer thread against
        the block as the transaction sees it, and written guarded by its version, merged
        with the other writes of its batch.
        """
        cache = self._block_cache

        def plan(connection: Connection, txn: Txn) -> tuple[Write | None, Block | Exception]:
            current = self._current_block(connection, txn, block_id)
            try:
                value = change(current)
            except Exception as refused:  # returned, not raised: the batch must not roll back
                return None, refused
            edited = current.model_copy(update={"value": value, "version": current.version + 1})
            txn.scratch[f"block:{block_id}"] = edited
            if cache is not None:
                txn.on_commit(partial(cache.edited, edited))
            params = {
                "block_id": block_id,
                "value": value,
                "version": edited.version,
                "expected": current.version,
                "at": utcnow(),
            }
            write = Write(
                guard=(_WRITE_BLOCK, params),
                refusal=lambda: StoreRejected(
                    self.url, f"block {block_id} changed under the writer"
                ),
                keys=[block_id],
            )
            return write, edited

        lease = self.lease_of(self._group_of_block(block_id))
        try:
            outcome = self.committer.run(Planned(plan, keys=[block_id], lease=lease))
        except BaseException:
            if cache is not None:
                cache.forget(block_id)  # it may have committed all the same
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _group_of_block(self, block_id: str) -> str:
        known = None if self._block_cache is None else self._block_cache.committed(block_id)
        if known is not None:
            return known.group_id
        found = self._read(lambda c: c.execute(_GROUP_OF_BLOCK, {"block_id": block_id}).scalar())
        if found is None:
            raise StoreRejected(self.url, f"no block {block_id}")
        return str(found)

    def _current_block(self, connection: Connection, txn: Txn, block_id: str) -> Block:
        """The block as this transaction sees it: after its own earlier edits, else as
        last committed (known to the owner, or read when the transaction must be exact)."""
        edited: Block | None = txn.scratch.get(f"block:{block_id}")
        if edited is not None:
            return edited
        if not txn.exact and self._block_cache is not None:
            committed = self._block_cache.committed(block_id)
            if committed is not None:
                return committed
        return _block(connection.execute(_LOCK_BLOCK, {"block_id": block_id}).mappings().one())

    # -- messages -------------------------------------------------------------------------

    def list_messages(self, agent_id: str) -> list[Message]:
        """An agent's whole history, oldest first."""

        def query(connection: Connection) -> list[Message]:
            rows = connection.execute(_SELECT_HISTORY, {"agent_id": agent_id}).mappings().all()
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
        event_rows = [
            {
                "run_id": r.id,
                "status": r.status.value,
                "at": r.created_at,
                "attempt": r.attempt,
                "reason": "created",
                "epoch": lease[1],
            }
            for r in turn.runs
        ]
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

    def apply_transition(self, change: Transition) -> Future[None]:
        """Write one status change; its future fails with TransitionRefused (and nothing
        of it is stored) unless the stored run is at `change.old` and
        `change.expected_attempt`."""
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
            )
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
    ) -> list[Run]:
        """Runs oldest first (or newest first), filtered by agent, group and status."""
        statement = select(runs).where(*_run_filters(agent_id, group_id, statuses))
        order = [runs.c.created_at, runs.c.turn, runs.c.position]
        statement = statement.order_by(*(c.desc() for c in order) if newest_first else order)
        if limit is not None:
            statement = statement.limit(limit)
        return self._read(lambda c: [_run(r) for r in c.execute(statement).mappings()])

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

    def run_events(self, run_id: str) -> list[RunEvent]:
        def query(connection: Connection) -> list[RunEvent]:
            if connection.execute(_SELECT_RUN, {"run_id": run_id}).first() is None:
                raise RunNotFound(run_id)
            rows = connection.execute(_SELECT_EVENTS, {"run_id": run_id}).mappings()
            return [_run_event(r) for r in rows]

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
        statement = select(groups.c.messages_pruned_through).where(groups.c.id == group_id)
        found = self._read(lambda c: c.execute(statement).first())
        if found is None:
            raise GroupNotFound(group_id)
        return int(found[0])

    def join_agent(self, join: AgentJoin) -> Future[None]:
        """Add a sleeptime agent to a live group, with its own block (and that block's
        first version) and its backfill runs, in one transaction; StaleTurn if the group
        moved meanwhile (see `AgentJoin`)."""
        lease = self.lease_of(join.group_id)

        def op(connection: Connection) -> None:
            _move_group_between_turns(
                connection, join.group_id, join.expected_turns, join.at, join.expected_pruned
            )
            agent_at = connection.execute(
                select(func.max(agents.c.position)).where(agents.c.group_id == join.group_id)
            ).scalar()
            block_at = connection.execute(
                select(func.max(blocks.c.position)).where(blocks.c.group_id == join.group_id)
            ).scalar()
            connection.execute(insert(agents), [_agent_values(join.agent, (agent_at or 0) + 1)])
            connection.execute(
                insert(blocks),
                [_block_values(join.persona, 0 if block_at is None else block_at + 1)],
            )
            connection.execute(
                insert(block_versions),
                [block_created_version(join.persona, join.persona_source, join.at)],
            )
            if join.runs:
                connection.execute(_INSERT_RUNS, [_run_values(r) for r in join.runs])
                connection.execute(
                    _INSERT_EVENTS,
                    [
                        {
                            "run_id": r.id,
                            "status": r.status.value,
                            "at": r.created_at,
                            "attempt": r.attempt,
                            "reason": "created",
                            "epoch": lease[1],
                        }
                        for r in join.runs
                    ],
                )

        future = self.committer.submit(op, lease=lease)
        future.add_done_callback(self._layout_changed)
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
        future.add_done_callback(self._layout_changed)
        return future

    def _layout_changed(self, done: Future[Any]) -> None:
        """A group's blocks were added or removed (or may have been): the owner's cache
        of blocks reads them again (as after a move of shards)."""
        if self._block_cache is not None:
            self._block_cache.clear()


def _view(url: URL) -> DatabaseFile | None:
    """A read-only store's hold on a SQLite file (see `DatabaseFile`), if it can be had."""
    path = sqlite_file(url)
    if path is None:
        return None
    try:
        return DatabaseFile(path, url=redact(url))
    except StoreUnavailable:  # a file it cannot open is one this process has no lock on
        return None


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


def _move_group_between_turns(
    connection: Connection,
    group_id: str,
    turns: int,
    at: datetime,
    pruned_through: int | None = None,
) -> None:
    """Mark the group changed, if it is still at `turns` (and, if given, its primary
    history still pruned through `pruned_through`): else GroupNotFound or StaleTurn."""
    conditions = [groups.c.id == group_id, groups.c.turns == turns]
    if pruned_through is not None:
        conditions.append(groups.c.messages_pruned_through == pruned_through)
    moved = connection.execute(update(groups).where(*conditions).values(updated_at=at))
    if moved.rowcount == 1:
        return
    if connection.execute(_SELECT_GROUP, {"group_id": group_id}).first() is None:
        raise GroupNotFound(group_id)
    raise StaleTurn(f"group {group_id} moved past turn {turns} (or was pruned) meanwhile")


def block_created_version(block: Block, source: str, at: datetime) -> dict[str, Any]:
    """The `block_versions` row of a block as created: version 1, change `created`, made
    by `source` (`application` for a value the caller gave, `runtime` for a default)."""
    return {
        "block_id": block.id,
        "group_id": block.group_id,
        "agent_id": block.agent_id,
        "label": block.label,
        "version": block.version,
        "value": block.value,
        "change": "created",
        "source": source,
        "run_id": None,
        "tool": None,
        "tool_call_id": None,
        "at": at,
    }


# -- rows <-> models ----------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _from_row(model: type[M], row: RowMapping, **extra: Any) -> M:
    """The model whose fields are the row's columns of the same names (plus `extra`).

    Read back as stored (context STORED): rows written before the text rule stay readable.
    """
    values = {**{k: row[k] for k in model.model_fields if k in row}, **extra}
    return model.model_validate(values, context=STORED)


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
