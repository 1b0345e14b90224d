"""Shards and their leases: which runtime process owns which groups, fenced by epochs.

Groups map to a fixed number of virtual shards (`shard_of`, a stable hash of the group
id). On PostgreSQL several runtime processes share a database, each owning some shards
under leases kept in the `shard_leases` table: the owner (a member id), a fencing epoch
that only grows (every acquisition bumps it), and an expiry on the database's clock,
renewed in the background. A member that stops renewing (dead, or paused) loses its
shards once their leases expire; whoever takes one over bumps its epoch.

Fencing: a transaction that writes for a group first locks the lease rows of the shards
it writes for (`FOR SHARE`) and checks it still holds each at the epoch it acquired. The
row lock makes the check hold until the transaction commits: a takeover (an UPDATE of the
same row) waits for it, and the new owner reads what it wrote. A write whose shard moved
is refused, so a process that was paused past its lease never writes for that shard
again. None of it needs a session to outlive a transaction, so it works through a
transaction-mode connection pooler.

Every statement here is PostgreSQL's: a SQLite file has one process (its file lock), which
owns every shard without leases.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from messages import ShardLost, StoreUnavailable
from persistence._engine import is_sqlite, make_engines, parse_url, redact

DEFAULT_SHARDS = 1024
"""Virtual shards of a new database: enough for hundreds of processes with a fair share
each. Fixed once the database exists (moving groups between shards would move their
ownership under running processes)."""
MAX_SHARDS = 65_536


def shard_of(group_id: str, shards: int) -> int:
    """The shard of a group: a hash of its id that every process and Python agrees on.

    >>> shard_of("group-1", 1024) == shard_of("group-1", 1024)
    True
    """
    return zlib.crc32(group_id.encode()) % shards


@dataclass(frozen=True, slots=True)
class ShardOwner:
    """Who holds a shard's lease, as the database says."""

    shard: int
    member: str | None
    """The owning member's id (None: nobody holds it)."""
    holder: str | None
    """The owner as people read it: pid and host, and since when."""
    address: str | None
    """Where the owner can be reached, if it advertised an address."""
    epoch: int
    expires_at: datetime | None
    expired: bool


_NOW = "(now() AT TIME ZONE 'UTC')"

_SETUP_SHARDS = text(
    "INSERT INTO shard_settings (name, value) VALUES ('shards', :shards) "
    "ON CONFLICT (name) DO NOTHING"
)
_READ_SHARDS = text("SELECT value FROM shard_settings WHERE name = 'shards'")
_SETUP_LEASES = text(
    "INSERT INTO shard_leases (shard, epoch) SELECT s, 0 FROM generate_series(0, :last) AS s "
    "ON CONFLICT (shard) DO NOTHING"
)
_JOIN = text(
    "INSERT INTO shard_members (member, holder, address, expires_at) "
    f"VALUES (:member, :holder, :address, {_NOW} + make_interval(secs => :lease)) "
    "ON CONFLICT (member) DO UPDATE SET expires_at = excluded.expires_at, "
    "holder = excluded.holder, address = excluded.address"
)
_LEAVE = text("DELETE FROM shard_members WHERE member = :member")
_LIVE_MEMBERS = text(f"SELECT count(*) FROM shard_members WHERE expires_at > {_NOW}")
_FORGET_DEAD_MEMBERS = text(
    f"DELETE FROM shard_members WHERE expires_at < {_NOW} - make_interval(secs => :grace)"
)
_RENEW = text(
    f"UPDATE shard_leases SET expires_at = {_NOW} + make_interval(secs => :lease) "
    "WHERE member = :member AND shard = ANY(:shards) RETURNING shard, epoch"
)
_ACQUIRE = text(
    "UPDATE shard_leases SET member = :member, epoch = epoch + 1, "
    f"expires_at = {_NOW} + make_interval(secs => :lease), holder = :holder, "
    "address = :address WHERE shard IN (SELECT shard FROM shard_leases "
    f"WHERE member IS NULL OR expires_at < {_NOW} ORDER BY shard LIMIT :limit "
    "FOR UPDATE SKIP LOCKED) RETURNING shard, epoch"
)
_RELEASE = text(
    f"UPDATE shard_leases SET member = NULL, expires_at = {_NOW}, holder = NULL, address = NULL "
    "WHERE shard = :shard AND member = :member AND epoch = :epoch"
)
_COUNT_FREE = text(f"SELECT count(*) FROM shard_leases WHERE member IS NULL OR expires_at < {_NOW}")
_FEWEST_HELD = text(
    "SELECT min(held) FROM (SELECT m.member, count(l.shard) AS held FROM shard_members m "
    f"LEFT JOIN shard_leases l ON l.member = m.member AND l.expires_at > {_NOW} "
    f"WHERE m.expires_at > {_NOW} GROUP BY m.member) AS counts"
)
_OWNER = text(
    f"SELECT shard, member, holder, address, epoch, expires_at, expires_at < {_NOW} AS expired "
    "FROM shard_leases WHERE shard = :shard"
)
_FENCE = text(
    "SELECT shard, epoch FROM shard_leases WHERE shard = ANY(:shards) AND member = :member "
    "FOR SHARE"
)


class Leases:
    """The lease statements of one member (one runtime process), run on `engine`.

    Each call is its own short transaction on a connection of `engine`, apart from the
    writer's, so renewing a lease never waits behind a batch of writes; `fence` alone
    runs inside the writer's transaction.

    Example:
        >>> leases = Leases(engine, member="m-1", holder="pid 7 on host-a", lease_s=10)
        >>> shards = leases.setup(DEFAULT_SHARDS)
        >>> taken = leases.acquire(limit=shards)          # {shard: epoch}
        >>> lost = leases.renew(taken)                     # shards no longer held
    """

    def __init__(
        self,
        engine: Engine,
        *,
        member: str,
        holder: str,
        lease_s: float,
        address: str | None = None,
    ) -> None:
        self._engine = engine
        self.member = member
        self._holder = holder
        self._address = address
        self.lease_s = lease_s

    def _params(self, **more: Any) -> dict[str, Any]:
        return {
            "member": self.member,
            "holder": self._holder,
            "address": self._address,
            "lease": self.lease_s,
            **more,
        }

    def setup(self, shards: int) -> int:
        """Fix the shard count if the database has none yet (else keep its own), make
        a lease row per shard, and join; returns the database's shard count."""
        with self._engine.begin() as connection:
            connection.execute(_SETUP_SHARDS, {"shards": str(shards)})
            stored = int(connection.execute(_READ_SHARDS).scalar_one())
            connection.execute(_SETUP_LEASES, {"last": stored - 1})
            connection.execute(_JOIN, self._params())
        return stored

    def stored_shards(self) -> int | None:
        """The database's shard count, read only (None: no process has fixed it yet)."""
        with self._engine.connect() as connection:
            value = connection.execute(_READ_SHARDS).scalar_one_or_none()
        return None if value is None else int(value)

    def renew(self, held: Mapping[int, int]) -> set[int]:
        """Extend the membership and the leases of `held` ({shard: epoch}); returns the
        shards no longer held at their epoch (taken over while this member was away)."""
        with self._engine.begin() as connection:
            connection.execute(_JOIN, self._params())
            if not held:
                return set()
            renewed = connection.execute(_RENEW, self._params(shards=list(held))).all()
        kept = {shard for shard, epoch in renewed if held.get(shard) == epoch}
        return set(held) - kept

    def acquire(self, limit: int) -> dict[int, int]:
        """Take up to `limit` shards nobody holds (or whose lease expired), each at a new
        epoch; returns {shard: epoch}."""
        if limit <= 0:
            return {}
        with self._engine.begin() as connection:
            taken = connection.execute(_ACQUIRE, self._params(limit=limit)).all()
        return {int(shard): int(epoch) for shard, epoch in taken}

    def release(self, held: Mapping[int, int]) -> None:
        """Give up `held` ({shard: epoch}) at once, for the next member to take."""
        if not held:
            return
        with self._engine.begin() as connection:
            for shard, epoch in held.items():
                connection.execute(_RELEASE, self._params(shard=shard, epoch=epoch))

    def leave(self) -> None:
        """This member is gone: it no longer counts in the fair share."""
        with self._engine.begin() as connection:
            connection.execute(_LEAVE, {"member": self.member})

    def census(self) -> tuple[int, int, int]:
        """(live members, shards free or expired, fewest shards a live member holds), as
        the database sees them now."""
        with self._engine.begin() as connection:
            connection.execute(_FORGET_DEAD_MEMBERS, {"grace": max(60.0, 10 * self.lease_s)})
            members = int(connection.execute(_LIVE_MEMBERS).scalar_one())
            free = int(connection.execute(_COUNT_FREE).scalar_one())
            fewest = connection.execute(_FEWEST_HELD).scalar()
        return members, free, int(fewest or 0)

    def owner(self, shard: int) -> ShardOwner:
        with self._engine.connect() as connection:
            row = connection.execute(_OWNER, {"shard": shard}).one()
        return ShardOwner(
            shard=row.shard,
            member=row.member,
            holder=row.holder,
            address=row.address,
            epoch=row.epoch,
            expires_at=None if row.expires_at is None else row.expires_at.replace(tzinfo=UTC),
            expired=bool(row.expired),
        )

    def fence(self, connection: Connection, expected: Mapping[int, int]) -> set[int]:
        """Inside a writing transaction: lock the lease rows of `expected`'s shards until
        it ends, and return the shards not held by this member at the expected epoch."""
        held = self.held_epochs(connection, set(expected))
        return {shard for shard, epoch in expected.items() if held.get(shard) != epoch}

    def held_epochs(self, connection: Connection, shards: set[int]) -> dict[int, int]:
        """Inside a writing transaction: lock the lease rows of `shards` until it ends,
        and return the epoch this member holds each at (none for those it does not)."""
        if not shards:
            return {}
        rows = connection.execute(_FENCE, {"shards": sorted(shards), "member": self.member})
        return {int(shard): int(epoch) for shard, epoch in rows}


def rebalance(held: int, members: int, free: int, shards: int, fewest: int | None = None) -> int:
    """How many shards a member should take (> 0) or hand over (< 0) now.

    `held`: the member's shards; `members`: live members, itself included; `free`:
    shards nobody holds (or whose lease expired); `fewest`: the fewest shards a live
    member holds (None: not known). A fair share is `shards // members`, or one more.
    A member takes free shards up to `ceil(shards / members)`. While no shard is free,
    it hands over what it holds beyond that, and, while some member holds fewer than
    `shards // members`, what it holds beyond that; never more, so members never trade
    the same shards back and forth.

    >>> rebalance(held=0, members=2, free=1024, shards=1024)
    512
    >>> rebalance(held=1024, members=2, free=0, shards=1024)
    -512
    >>> rebalance(held=512, members=2, free=0, shards=1024)
    0
    """
    members = max(1, members)
    floor, share = shards // members, -(-shards // members)
    if held < share:
        return min(share - held, free)
    if free == 0 and held > share:
        return share - held
    if free == 0 and fewest is not None and fewest < floor and held > floor:
        return floor - held
    return 0


_LIVE_HOLDERS = text(f"SELECT holder FROM shard_members WHERE expires_at > {_NOW} ORDER BY holder")


def serving_processes(url: str) -> list[str]:
    """The runtime processes serving the database at `url` now (pid and host of each
    live member; none on SQLite, whose one process owns the file, nor on a database no
    process has served). StoreUnavailable if it cannot be read."""
    parsed = parse_url(url)
    if is_sqlite(parsed):
        return []
    engines = make_engines(url, readers=1)
    try:
        with engines[1].connect() as connection:
            if not inspect(connection).has_table("shard_members"):
                return []
            return [str(holder) for holder in connection.execute(_LIVE_HOLDERS).scalars()]
    except DBAPIError as error:
        raise StoreUnavailable(redact(parsed), str(error.orig or error)) from error
    finally:
        for engine in engines:
            engine.dispose()


def hand_over_first(held: Mapping[int, int], count: int, busy: set[int]) -> dict[int, int]:
    """Which `count` of the shards `held` ({shard: epoch}) a member hands over: first those
    with no run open (`busy` has the others: a run handed over running is re-queued by
    its new owner, an attempt spent although nothing crashed, and a queued one may start
    while the hand-over waits), the highest first (members that join later tend to take
    the same).

    >>> hand_over_first({1: 5, 2: 5, 3: 5}, 2, busy={3})
    {2: 5, 1: 5}
    """
    chosen = sorted(held, key=lambda shard: (shard in busy, -shard))[: max(0, count)]
    return {shard: held[shard] for shard in chosen}


class ShardBook:
    """The shards this process holds, at the epoch it acquired each: what every write is
    fenced against. Thread-safe: the lease keeper changes it, writers and callers read it.

    Every turn and every write reads it, the lease keeper changes it a few times a minute:
    a change builds a new view under the lock and puts it in place in one assignment, so
    a read takes no lock (one lock every thread took was a convoy on the hot path).
    """

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._lock = threading.Lock()  # (changes only)
        # ({shard: epoch} held, the shards of it taking new work): replaced, never changed.
        self._view: tuple[dict[int, int], frozenset[int]] = ({}, frozenset())
        self.on_lost: Callable[[dict[int, int]], None] | None = None
        """Told the shards a write found lost (from the writer thread: keep it short)."""

    def shard_of(self, group_id: str) -> int:
        return shard_of(group_id, self.shards)

    def held(self) -> dict[int, int]:
        return dict(self._view[0])

    def epoch(self, shard: int) -> int | None:
        """The epoch this process holds `shard` at; None if it does not hold it."""
        return self._view[0].get(shard)

    def serves(self, shard: int) -> bool:
        """Whether new work for `shard` is taken here (held, and not being handed over)."""
        return shard in self._view[1]

    def add(self, taken: Mapping[int, int]) -> None:
        with self._lock:
            held, serving = self._view
            self._view = ({**held, **taken}, serving | frozenset(taken))

    def leave(self, shards: Iterable[int]) -> None:
        """Stop taking new work for `shards` (they are being handed over)."""
        with self._lock:
            held, serving = self._view
            self._view = (held, serving - frozenset(shards))

    def drop(self, shards: Iterable[int]) -> dict[int, int]:
        """Forget `shards` (released or lost); returns what was held of them."""
        with self._lock:
            held, serving = self._view
            dropped = {s: held[s] for s in set(shards) if s in held}
            kept = {s: epoch for s, epoch in held.items() if s not in dropped}
            self._view = (kept, serving - frozenset(dropped))
            return dropped

    def lose(self, shards: Iterable[int]) -> None:
        """A write found `shards` taken over: forget them and tell `on_lost`."""
        dropped = self.drop(shards)
        if dropped and self.on_lost is not None:
            self.on_lost(dropped)


def fence_for(
    leases: Leases, book: ShardBook
) -> Callable[[Connection, set[tuple[int, int]]], dict[tuple[int, int], Exception]]:
    """The committer's fence of a process: a write made under (shard, epoch) commits only
    if this process holds that shard at that very epoch now, as the database says, under
    a lock held until the transaction ends. A shard the database no longer gives this
    process at the epoch it holds it at is lost (`ShardBook.lose`)."""

    def fence(
        connection: Connection, wanted: set[tuple[int, int]]
    ) -> dict[tuple[int, int], Exception]:
        stored = leases.held_epochs(connection, {shard for shard, _ in wanted})
        refused: dict[tuple[int, int], Exception] = {
            (shard, epoch): ShardLost(shard)
            for shard, epoch in wanted
            if stored.get(shard) != epoch
        }
        held = book.held()
        book.lose({s for s, _ in refused if s in held and stored.get(s) != held[s]})
        return refused

    return fence
