"""The lease keeper against a real PostgreSQL: fair shares, clean hand-over, lost shards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from actors._shards import ShardKeeper, Shards
from persistence import Store
from persistence._leases import Leases, ShardBook
from tests.agents import wait_until
from tests.postgres import PostgresCluster


class Member:
    """A keeper and what its callbacks were told, in order."""

    def __init__(self, url: str, name: str, shards: int, lease_s: float) -> None:
        self.engine: Engine = create_engine(url)
        self.book = ShardBook(shards)
        self.leases = Leases(self.engine, member=name, holder=name, lease_s=lease_s)
        self.told: list[tuple[str, Shards]] = []
        self.keeper = ShardKeeper(
            self.leases,
            self.book,
            on_acquired=lambda s: self.told.append(("acquired", dict(s))),
            on_lost=lambda s: self.told.append(("lost", dict(s))),
            on_hand_over=self._handing,
        )

    def _handing(self, shards: Shards) -> None:
        # While it hands over, the shards are fenced still but take no new work.
        assert all(not self.book.serves(s) and self.book.epoch(s) is not None for s in shards)
        self.told.append(("hand_over", dict(shards)))

    def join_without_keeping(self) -> None:
        """Join and take a share, but never renew (a process about to be paused)."""
        self.book.shards = self.leases.setup(self.book.shards)
        self.keeper.tick()


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = postgres_cluster.create_database(request.node.name)
    url = postgres_cluster.url(name)
    Store.migrate(url)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)


@pytest.fixture
def members(pg_url: str) -> Iterator[list[Member]]:
    made: list[Member] = []
    yield made
    for member in made:
        member.engine.dispose()


def make(pg_url: str, members: list[Member], name: str, lease_s: float = 30.0) -> Member:
    member = Member(pg_url, name, shards=16, lease_s=lease_s)
    members.append(member)
    return member


def test_a_second_member_gets_half_through_a_clean_hand_over(
    pg_url: str, members: list[Member]
) -> None:
    a = make(pg_url, members, "a")
    a.keeper.start()
    a.keeper.keep()
    assert a.told == [("acquired", dict.fromkeys(range(16), 1))]
    b = make(pg_url, members, "b")
    b.keeper.start()
    b.keeper.keep()
    assert b.told == [] and b.book.held() == {}  # nothing free yet
    a.keeper.tick()  # a sees b short: hands over its excess (on a thread of its own)
    assert a.keeper.wait_for_hand_over(timeout=10)
    assert a.told[-1] == ("hand_over", dict.fromkeys(range(8, 16), 1))
    assert a.book.held() == dict.fromkeys(range(8), 1)
    b.keeper.tick()
    assert b.told == [("acquired", dict.fromkeys(range(8, 16), 2))]
    a.keeper.tick()
    b.keeper.tick()
    assert len(a.told) == 2 and len(b.told) == 1  # balanced: nothing moves

    b.keeper.stop()  # b leaves: hands everything back
    assert b.told[-1] == ("hand_over", dict.fromkeys(range(8, 16), 2))
    a.keeper.tick()
    assert a.book.held().keys() == set(range(16))
    a.keeper.stop()


def test_a_member_that_stopped_renewing_finds_its_shards_lost(
    pg_url: str, members: list[Member]
) -> None:
    a = make(pg_url, members, "a", lease_s=0.3)
    a.join_without_keeping()
    assert a.book.held() == dict.fromkeys(range(16), 1)
    b = make(pg_url, members, "b")
    b.keeper.start()
    b.keeper.keep()

    def b_holds_all() -> bool:
        b.keeper.tick()  # a's leases expire: b (alone alive) takes every shard
        return len(b.book.held()) == 16

    wait_until(b_holds_all, timeout=10)
    assert b.book.held() == dict.fromkeys(range(16), 2)
    a.keeper.tick()  # back from its pause
    assert a.told[-1] == ("lost", dict.fromkeys(range(16), 1))
    assert a.book.held() == {}
    b.keeper.stop()


def test_a_slow_hand_over_never_lets_the_other_leases_lapse(
    pg_url: str, members: list[Member]
) -> None:
    a = make(pg_url, members, "a", lease_s=0.6)
    gate = threading.Event()
    handing = threading.Event()

    def slow(shards: Shards) -> None:  # turns that take several leases to finish
        handing.set()
        gate.wait(10)

    a.keeper._on_hand_over = slow
    a.keeper.start()
    a.keeper.keep()  # renews every 0.2 s
    b = make(pg_url, members, "b")
    b.keeper.start()
    try:
        assert handing.wait(10)  # a hands 8 shards over, slowly
        deadline = time.monotonic() + 3 * 0.6
        while time.monotonic() < deadline:  # three leases long, a's leases stay renewed
            assert len(a.book.held()) == 16 and not any(t == "lost" for t, _ in a.told)
            assert not any(a.leases.owner(shard).expired for shard in (0, 15))
            time.sleep(0.05)  # sampling, not synchronising: nothing here waits for an event
        gate.set()
        assert a.keeper.wait_for_hand_over(timeout=10)
        assert a.book.held().keys() == set(range(8)) and not any(t == "lost" for t, _ in a.told)
    finally:
        gate.set()
        a.keeper.stop()
        b.keeper.stop()
