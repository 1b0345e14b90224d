"""What the owning store remembers (blocks, where histories end) is never worth less than a read.

The owner answers block reads from memory and plans edits and message numbers from what it
knows was committed. These tests change the database behind its back, race reads with
edits, and edit one block from many threads: the answers stay those of the database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select, update

from actors import Runtime
from messages import Block, Message, TextContent
from messages._ids import new_id
from persistence import Store, utcnow
from persistence._block_cache import BlockCache
from persistence._engine import make_engines
from persistence._tables import blocks, messages
from tests.agents import user


def block(
    version: int, value: str = "", block_id: str = "block-1", owner: str | None = None
) -> Block:
    return Block(
        id=block_id,
        group_id="group-1",
        agent_id=owner,
        label=block_id,
        value=value or f"v{version}",
        limit=100,
        version=version,
    )


# -- the cache alone ------------------------------------------------------------------------


def test_an_agent_sees_the_shared_blocks_then_its_own() -> None:
    cache = BlockCache()
    group = [
        block(1, block_id="mine", owner="agent-1"),
        block(1, block_id="shared-1"),
        block(1, block_id="theirs", owner="agent-2"),
        block(1, block_id="shared-2"),
    ]
    seen = cache.remember("agent-1", "group-1", group, cache.epoch)
    assert [b.id for b in seen] == ["shared-1", "shared-2", "mine"]
    cached = cache.blocks_of("agent-1")
    assert cached is not None and [b.id for b in cached] == ["shared-1", "shared-2", "mine"]
    assert cache.blocks_of("agent-2") is None  # never read for that agent


def test_a_deleted_group_leaves_nothing_in_the_cache() -> None:
    cache = BlockCache()
    cache.remember("agent-1", "group-1", [block(1, block_id="shared")], cache.epoch)
    cache.remember("agent-2", "group-1", [block(1, block_id="shared")], cache.epoch)
    other = block(1, block_id="kept").model_copy(update={"group_id": "group-2"})
    cache.remember("agent-3", "group-2", [other], cache.epoch)
    cache.drop_group("group-1")
    assert cache.blocks_of("agent-1") is None and cache.committed("shared") is None
    assert cache.group_of("agent-2") is None
    assert cache.committed("kept") == other and cache.group_of("agent-3") == "group-2"
    cache.edited(block(2, block_id="stray"))  # known by id only, its layout never read
    cache.drop_group("group-1")
    assert cache.committed("stray") is None


@given(st.lists(st.integers(1, 20), min_size=1, max_size=30))
def test_a_block_only_moves_forward_whatever_order_reads_and_edits_arrive_in(
    versions: list[int],
) -> None:
    cache = BlockCache()
    for version in versions:  # reads and edits of different ages, interleaved
        if version % 2:
            cache.edited(block(version))
        else:
            cache.remember("agent-1", "group-1", [block(version)], cache.epoch)
    committed = cache.committed("block-1")
    assert committed is not None and committed.version == max(versions)


def test_a_read_begun_before_a_forget_is_not_remembered() -> None:
    cache = BlockCache()
    epoch = cache.epoch  # a read starts
    cache.forget("block-1")  # an edit of unknown outcome
    answered = cache.remember("agent-1", "group-1", [block(1)], epoch)
    assert answered[0].version == 1  # the reader gets what it read...
    assert cache.committed("block-1") is None  # ...but it is not kept
    assert cache.blocks_of("agent-1") is None


def test_the_cache_starts_over_past_its_size() -> None:
    cache = BlockCache(max_blocks=3)
    cache.remember("a", "g", [block(1, block_id=f"b{i}") for i in range(3)], cache.epoch)
    assert cache.blocks_of("a") is not None
    cache.remember("b", "h", [block(1, block_id="b9")], cache.epoch)
    assert cache.blocks_of("a") is None and cache.blocks_of("b") is None


# -- the store that owns the database ---------------------------------------------------------


@pytest.fixture
def group(db_url: str) -> Iterator[tuple[str, str, str]]:
    """(primary agent id, sleeptime agent id, id of the `human` block) of a stored group."""
    with Runtime.start(db_url) as rt:
        created = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        human = rt.get_blocks(created.primary_agent_id)["human"].id
    yield created.primary_agent_id, created.sleeptime_agent_ids[0], human


@pytest.fixture
def store(db_url: str, group: tuple[str, str, str]) -> Iterator[Store]:
    """The store that owns the database, as a runtime holds it."""
    owner = Store(db_url)
    owner.take_shards()  # on PostgreSQL, as a runtime would
    yield owner
    owner.close()


@pytest.fixture
def side_door(db_url: str) -> Iterator[Engine]:
    """A connection of our own, to change the database behind the store's back."""
    writer, reader = make_engines(db_url)
    reader.dispose()
    yield writer
    writer.dispose()


def test_concurrent_edits_of_one_block_all_land(
    db_url: str, group: tuple[str, str, str], store: Store
) -> None:
    primary, _, human = group
    start = store.get_blocks(primary)["human"]

    def add(n: int) -> None:
        store.edit_block(human, lambda b: b.value + f"\nline {n}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(add, range(40)))
    edited = store.get_blocks(primary)["human"]
    assert edited.version == start.version + 40
    assert sorted(edited.value.splitlines()[-40:]) == sorted(f"line {n}" for n in range(40))
    reader = Store(db_url, read_only=True)  # what was committed, read from the database
    try:
        assert reader.get_blocks(primary)["human"] == edited
    finally:
        reader.close()


def test_a_read_only_store_sees_every_edit_of_the_owner(
    db_url: str, group: tuple[str, str, str], store: Store
) -> None:
    primary, _, human = group
    reader = Store(db_url, read_only=True)
    try:
        for n in range(3):
            store.edit_block(human, lambda b, n=n: f"edit {n}")  # type: ignore[misc]
            assert reader.get_blocks(primary)["human"].value == f"edit {n}"
    finally:
        reader.close()


def test_an_edit_planned_from_a_stale_memory_applies_to_what_is_stored(
    group: tuple[str, str, str], store: Store, side_door: Engine
) -> None:
    primary, _, human = group
    remembered = store.get_blocks(primary)["human"]  # now the store remembers it
    with side_door.begin() as connection:  # someone else writes it (no runtime should)
        connection.execute(
            update(blocks)
            .where(blocks.c.id == human)
            .values(value="behind its back", version=remembered.version + 5)
        )
    edited = store.edit_block(human, lambda b: b.value + " + edit")
    assert edited.value == "behind its back + edit"  # not the remembered value's edit
    assert edited.version == remembered.version + 6
    assert store.get_blocks(primary)["human"] == edited
    with side_door.connect() as connection:
        row = connection.execute(select(blocks).where(blocks.c.id == human)).one()
    assert (row.value, row.version) == (edited.value, edited.version)


def test_messages_appended_after_a_history_changed_behind_its_back_keep_their_order(
    group: tuple[str, str, str], store: Store, side_door: Engine
) -> None:
    primary, sleeptime, _ = group
    group_id = store.get_agent(primary).group_id

    def message(text: str, sequence: int = 0) -> Message:
        return Message(
            id=new_id("message"),
            agent_id=sleeptime,
            group_id=group_id,
            sequence=sequence,
            role="user",
            content=[TextContent(text=text)],
            created_at=utcnow(),
        )

    store.store_messages([message("one"), message("two")]).result(timeout=30)
    with side_door.begin() as connection:  # the writer now remembers the wrong end
        row = message("three", sequence=3).model_dump(mode="json", exclude={"created_at"})
        row["content"] = [{"type": "text", "text": "three"}]
        connection.execute(insert(messages), [{**row, "created_at": utcnow()}])
    store.store_messages([message("four")]).result(timeout=30)
    store.store_messages([message("five")]).result(timeout=30)
    history = store.list_messages(sleeptime)
    assert [(m.sequence, m.text()) for m in history] == [
        (1, "one"),
        (2, "two"),
        (3, "three"),
        (4, "four"),
        (5, "five"),
    ]


def test_reads_racing_edits_never_bring_back_an_older_value(
    group: tuple[str, str, str], store: Store
) -> None:
    """Readers, one of them emptying the cache all along (so reads from the database race
    the edits), never see a block go back, nor older than an edit that already returned."""
    primary, sleeptime, human = group
    stop = threading.Event()
    returned = [0]  # the version of the last edit that returned

    def read(forget: bool) -> int:
        reads, newest = 0, 0
        while not stop.is_set():
            for agent in (primary, sleeptime):
                if forget:
                    store._block_cache.clear()  # type: ignore[union-attr]
                floor = returned[0]
                version = store.get_blocks(agent)["human"].version
                assert version >= floor, f"read {version} after edit {floor} returned"
                assert version >= newest, f"went back from {newest} to {version}"
                newest, reads = version, reads + 1
        return reads

    with ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(read, forget=n == 0) for n in range(4)]
        try:
            for n in range(30):
                edited = store.edit_block(human, lambda b, n=n: f"edit {n}")  # type: ignore[misc]
                returned[0] = edited.version
        finally:
            stop.set()
        assert all(reader.result(timeout=30) > 0 for reader in readers)  # their asserts too
    assert store.get_blocks(primary)["human"] == edited


def test_groups_deleted_over_time_leave_the_cache_at_the_size_of_those_alive(
    db_url: str,
) -> None:
    """A service that creates and deletes groups for weeks: what the owner remembers of
    their blocks stays that of the live groups (it held every deleted group's blocks)."""
    with Runtime.start(db_url) as rt:
        cache = rt._store._block_cache
        if cache is None:
            pytest.skip("this store keeps no block cache")
        alive = []
        for n in range(12):
            group = rt.create_group(
                primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
            )
            rt.wait_for_runs(rt.step(group.id, [user(f"my number is {n}")]).run_ids, timeout=30)
            rt.get_blocks(group.primary_agent_id)
            alive.append(group)
            if len(alive) > 3:
                rt.delete_group(alive.pop(0).id)
        live = {g.id for g in alive}
        assert {b.group_id for b in cache._blocks.values()} <= live
        assert set(cache._groups.values()) <= live
