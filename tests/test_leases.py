"""Shard leases on PostgreSQL: acquisition, renewal, expiry, release and fencing.

These drive `persistence._leases.Leases` directly against a real server, as several
members (runtime processes) would, each with its own engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine

from messages import ShardLost
from persistence import Store
from persistence._committer import Committer
from persistence._leases import Leases, ShardBook, fence_for, hand_over_first, rebalance, shard_of
from tests.agents import wait_until
from tests.postgres import PostgresCluster


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
def engines(pg_url: str) -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def member(url: str, engines: list[Engine], name: str, lease_s: float = 30.0) -> Leases:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    engines.append(engine)
    return Leases(engine, member=name, holder=f"{name} (test)", lease_s=lease_s)


def test_the_shard_count_is_fixed_by_the_first_setup(pg_url: str, engines: list[Engine]) -> None:
    a, b = member(pg_url, engines, "a"), member(pg_url, engines, "b")
    assert a.setup(8) == 8
    assert b.setup(64) == 8  # the database's count wins
    assert a.acquire(limit=100).keys() == set(range(8))


def test_a_shard_is_held_by_one_member_and_moves_at_a_new_epoch(
    pg_url: str, engines: list[Engine]
) -> None:
    a, b = member(pg_url, engines, "a"), member(pg_url, engines, "b")
    a.setup(8)
    b.setup(8)
    held = a.acquire(limit=5)
    assert len(held) == 5 and set(held.values()) == {1}
    rest = b.acquire(limit=8)
    assert set(rest) == set(range(8)) - set(held)  # only what nobody holds
    assert b.acquire(limit=8) == {}
    assert a.census() == (2, 0, 3)

    given_up = {shard: held[shard] for shard in list(held)[:2]}
    a.release(given_up)
    moved = b.acquire(limit=8)
    assert moved == {shard: epoch + 1 for shard, epoch in given_up.items()}
    assert a.renew(held) == set(given_up)  # a learns it no longer holds them
    owner = b.owner(next(iter(moved)))
    assert owner.member == "b" and owner.holder == "b (test)" and not owner.expired


def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced(
    pg_url: str, engines: list[Engine]
) -> None:
    a = member(pg_url, engines, "a", lease_s=0.3)
    b = member(pg_url, engines, "b")
    a.setup(4)
    b.setup(4)
    held = a.acquire(limit=4)
    assert b.acquire(limit=4) == {}
    wait_until(lambda: b.census()[1] == 4, timeout=10)  # a stopped renewing: all expired
    taken = b.acquire(limit=4)
    assert taken == {shard: epoch + 1 for shard, epoch in held.items()}

    with a._engine.begin() as connection:  # a, back from a pause, tries to write
        assert a.fence(connection, held) == set(held)
    assert a.renew(held) == set(held)
    with b._engine.begin() as connection:
        assert b.fence(connection, taken) == set()


def test_a_lease_expired_but_not_taken_is_still_good_and_renews(
    pg_url: str, engines: list[Engine]
) -> None:
    a = member(pg_url, engines, "a", lease_s=0.2)
    a.setup(2)
    held = a.acquire(limit=2)
    wait_until(lambda: a.owner(0).expired, timeout=10)
    with a._engine.begin() as connection:  # nobody else wrote: the epoch still holds
        assert a.fence(connection, held) == set()
    assert a.renew(held) == set()
    assert not a.owner(0).expired


def test_a_takeover_waits_for_a_fenced_transaction_to_end(
    pg_url: str, engines: list[Engine]
) -> None:
    a = member(pg_url, engines, "a", lease_s=0.2)
    b = member(pg_url, engines, "b")
    a.setup(1)
    b.setup(1)
    held = a.acquire(limit=1)
    wait_until(lambda: b.census()[1] == 1, timeout=10)
    took: dict[int, int] = {}
    done = threading.Event()

    def take() -> None:
        took.update(b.acquire(limit=1))
        done.set()

    with a._engine.begin() as connection:
        assert a.fence(connection, held) == set()  # the row is locked until the commit
        thread = threading.Thread(target=take)
        thread.start()
        # SKIP LOCKED: the takeover skips a shard a live transaction is writing for.
        assert done.wait(10)
        assert took == {}
    thread.join(10)
    assert b.acquire(limit=1) == {0: held[0] + 1}


def test_membership_counts_live_members_only(pg_url: str, engines: list[Engine]) -> None:
    a = member(pg_url, engines, "a", lease_s=0.2)
    b = member(pg_url, engines, "b")
    a.setup(2)
    b.setup(2)
    assert b.census()[0] == 2
    wait_until(lambda: b.census()[0] == 1, timeout=10)
    a.renew({})
    assert b.census()[0] == 2
    a.leave()
    assert b.census()[0] == 1


@given(st.text(min_size=1, max_size=80), st.integers(min_value=1, max_value=65_536))
def test_shard_of_is_stable_and_in_range(group_id: str, shards: int) -> None:
    shard = shard_of(group_id, shards)
    assert 0 <= shard < shards
    assert shard == shard_of(group_id, shards)


def test_shard_of_spreads_groups_evenly() -> None:
    counts = [0] * 16
    for i in range(16_000):
        counts[shard_of(f"group-{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200


@pytest.mark.parametrize(
    ("held", "members", "free", "shards", "move"),
    [
        (0, 1, 1024, 1024, 1024),  # alone: everything
        (0, 2, 1024, 1024, 512),  # first of two
        (0, 2, 512, 1024, 512),  # second of two takes what is free
        (1024, 2, 0, 1024, -512),  # a newcomer is short: hand over the excess
        (512, 2, 0, 1024, 0),  # balanced
        (512, 3, 0, 1024, -170),  # a third joined: share is 342
        (342, 3, 0, 1024, 0),
        (0, 3, 340, 1024, 340),  # take what is free, up to the share
        (600, 2, 10, 1024, 0),  # above share but shards are free: the short take those
        (3, 4, 0, 10, 0),  # share 3 of 10 with 4 members: never below it
        (5, 0, 0, 10, 0),  # no live member seen (its own row late): keep all
    ],
)
def test_rebalance_aims_at_a_fair_share(
    held: int, members: int, free: int, shards: int, move: int
) -> None:
    assert rebalance(held, members, free, shards) == move


@pytest.mark.parametrize(
    ("held", "fewest", "move"),
    [
        (22, 20, -1),  # 64 over 3: a member at 20 is below 21, so the 22s go to 21
        (22, 21, 0),  # 22, 21, 21: balanced
        (21, 20, 0),  # at the floor already: nothing more to give
        (32, 0, -10),  # beyond the share: the excess first
    ],
)
def test_members_above_the_floor_give_to_one_below_it(held: int, fewest: int, move: int) -> None:
    assert rebalance(held, members=3, free=0, shards=64, fewest=fewest) == move


@given(
    st.integers(min_value=1, max_value=2048),
    st.lists(st.integers(min_value=0, max_value=2048), min_size=1, max_size=8),
)
def test_rebalancing_converges_to_every_shard_held_once(shards: int, wants: list[int]) -> None:
    """Members that rebalance in turn end with every shard held, none above its share."""
    members = len(wants)
    held = [0] * members
    for _ in range(4 * members + 4):
        for i in range(members):
            move = rebalance(held[i], members, shards - sum(held), shards, min(held))
            held[i] += move
    assert sum(held) == shards
    share = -(-shards // members)
    assert all(shards // members <= h <= share for h in held)


def test_the_book_serves_held_shards_until_they_are_handed_over() -> None:
    book = ShardBook(8)
    book.add({1: 3, 2: 5})
    assert book.serves(1) and book.epoch(2) == 5 and not book.serves(3)
    book.leave([1, 3])
    assert not book.serves(1) and book.epoch(1) == 3  # still fenced at its epoch
    assert book.drop([1, 7]) == {1: 3}
    assert book.held() == {2: 5}
    book.add({1: 4})
    assert book.serves(1)


def test_the_committer_refuses_only_the_writes_of_a_lost_shard(
    pg_url: str, engines: list[Engine]
) -> None:
    a = member(pg_url, engines, "a", lease_s=0.3)
    b = member(pg_url, engines, "b")
    a.setup(2)
    b.setup(2)
    book = ShardBook(2)
    book.add(a.acquire(limit=2))
    committer = Committer(a._engine, fence=fence_for(a, book))
    table = "CREATE TABLE notes (shard INT, note TEXT)"
    committer.run(lambda c: c.exec_driver_sql(table))

    def note(shard: int, text: str) -> Future[object]:
        return committer.submit(
            lambda c: c.exec_driver_sql(f"INSERT INTO notes VALUES ({shard}, '{text}')"),
            lease=(shard, book.epoch(shard) or -1),  # the epoch held when it is made
        )

    note(0, "first").result(10)
    note(1, "first").result(10)
    wait_until(lambda: b.census()[1] == 2, timeout=10)  # a paused: both expired
    a.renew({0: book.epoch(0) or 0})  # a renews shard 0 only; b takes shard 1
    assert b.acquire(limit=2).keys() == {1}
    kept, refused = note(0, "second"), note(1, "second")
    assert kept.result(10) is not None
    with pytest.raises(ShardLost) as lost:
        refused.result(10)
    assert lost.value.shard == 1
    assert book.held().keys() == {0}  # never written for again
    with pytest.raises(ShardLost):
        note(1, "third").result(10)
    committer.close()
    with a._engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT shard, note FROM notes ORDER BY 1, 2").all()
    assert [tuple(r) for r in rows] == [(0, "first"), (0, "second"), (1, "first")]


@pytest.mark.parametrize(
    ("held", "count", "busy", "handed"),
    [
        ({1: 5, 2: 5, 3: 5}, 1, set(), {3: 5}),  # nothing running: the highest
        ({1: 5, 2: 5, 3: 5}, 2, {3}, {2: 5, 1: 5}),  # a running run stays: the others go
        ({1: 5, 2: 6, 3: 7}, 2, {1, 2, 3}, {3: 7, 2: 6}),  # all busy: the highest still
        ({1: 5, 2: 5}, 3, {1}, {2: 5, 1: 5}),  # no more than held
        ({1: 5}, 0, set(), {}),
    ],
)
def test_shards_without_a_running_run_are_handed_over_first(
    held: dict[int, int], count: int, busy: set[int], handed: dict[int, int]
) -> None:
    """A run handed over running is re-queued by its new owner (an attempt spent although
    nothing crashed): a member gives the shards where nothing runs first."""
    assert hand_over_first(held, count, busy) == handed
