"""Memory blocks from the application (issue 19): get, set, create, delete, and each
block's history of versions, racing the memory tools of running sleeptime agents.

Every test runs on both backends with a real runtime; agents here edit blocks with the
real memory tools, and the tests wait on events and runs with timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import func, select

from actors import (
    AgentContext,
    AgentNotFound,
    AsyncRuntime,
    BlockExists,
    BlockNotFound,
    BlockVersionNotFound,
    GroupNotFound,
    NotOwner,
    ReadOnlyRuntime,
    Runtime,
)
from messages import Block, BlockVersion, Message, MessageCreate, RunStatus
from persistence import Store
from persistence._block_cache import BlockCache, visible_to
from persistence._engine import make_engines
from persistence._models import BlockVersionRow
from tests.agents import user, wait_until

SCRIPTED = {"kind": "scripted"}
NOTES = "notes"


class Scribe:
    """A sleeptime agent that appends one line naming its run to a block, in every run,
    with `memory_insert` and a tool call id of its own (`tc-<run id>`).

    With `gate` set it first waits for it (the test deletes or creates blocks meanwhile);
    each run's tool result is kept in `results`."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.entered = threading.Semaphore(0)
        self.results: dict[str, Any] = {}
        self.labels: dict[str, list[str]] = {}

    def factory(self, config: dict[str, Any]) -> Scribe:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        assert context.run_id is not None
        context.memory.blocks  # noqa: B018  # the run's snapshot, taken as it starts
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        result = context.memory.memory_insert(
            NOTES, line(context.run_id), tool_call_id=f"tc-{context.run_id}"
        )
        self.results[context.run_id] = result
        self.labels[context.run_id] = context.memory.blocks.labels()
        return [MessageCreate(role="assistant", content=result.message)]


def line(run_id: str) -> str:
    return f"run {run_id}"


@pytest.fixture
def scribe() -> Scribe:
    return Scribe()


@pytest.fixture
def brt(db_url: str, scribe: Scribe) -> Iterator[Runtime]:
    runtime = Runtime.start(db_url, kinds={"scribe": scribe.factory})
    try:
        yield runtime
    finally:
        runtime.stop(drain_timeout=5)


def scribe_group(rt: Runtime, **options: Any) -> Any:
    return rt.create_group(
        primary=SCRIPTED,
        sleeptime=[{"kind": "scribe"}],
        frequency=1,
        blocks={"human": "", NOTES: {"value": "", "limit": 100_000}},
        **options,
    )


def stored_versions(db_url: str) -> int:
    writer, reader = make_engines(db_url)
    try:
        with reader.connect() as connection:
            return int(
                connection.execute(select(func.count()).select_from(BlockVersionRow)).scalar_one()
            )
    finally:
        writer.dispose()
        reader.dispose()


def check_contiguous(history: Sequence[BlockVersion]) -> None:
    """Each block's versions, in history order, count up by one."""
    by_block: dict[str, list[int]] = {}
    for version in history:
        by_block.setdefault(version.block_id, []).append(version.version)
    for numbers in by_block.values():
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


# -- each call ----------------------------------------------------------------------------


def test_create_group_writes_version_one_of_every_block(rt: Runtime) -> None:
    group = rt.create_group(
        primary=SCRIPTED,
        sleeptime=[{"kind": "memory"}, {"kind": "memory", "config": {"memory_persona": "Mine."}}],
        blocks={"human": "Ada"},
    )
    (human,) = rt.block_history(group.id, "human")
    assert (human.version, human.value, human.change, human.source) == (
        1,
        "Ada",
        "created",
        "application",
    )
    default, given_persona = (
        rt.block_history(agent_id, "memory_persona")[0] for agent_id in group.sleeptime_agent_ids
    )
    assert (default.source, default.agent_id) == ("runtime", group.sleeptime_agent_ids[0])
    assert (given_persona.source, given_persona.value) == ("application", "Mine.")
    assert rt.check_invariants([group.id]).ok


def test_get_block_sees_what_the_agent_sees_and_a_group_its_shared_blocks(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
    sleeper = group.sleeptime_agent_ids[0]
    assert rt.get_block(group.primary_agent_id, "human") == rt.get_blocks(sleeper)["human"]
    assert rt.get_block(sleeper, "memory_persona").agent_id == sleeper
    assert rt.get_block(group.id, "persona").agent_id is None
    with pytest.raises(BlockNotFound, match=r"labels there: human, persona$") as missing:
        rt.get_block(group.id, "memory_persona")  # an agent's own: not among the shared
    assert missing.value.label == "memory_persona" and missing.value.labels == ["human", "persona"]
    with pytest.raises(BlockNotFound, match="memory_persona"):
        rt.get_block(group.primary_agent_id, "memory_persona")  # the sleeptime agent's own
    with pytest.raises(AgentNotFound):
        rt.get_block("agent-nobody-made", "human")
    with pytest.raises(GroupNotFound):
        rt.get_block("group-nobody-made", "human")
    with pytest.raises(ValidationError):
        rt.get_block(group.id, 7)  # type: ignore[arg-type]
    for call in (rt.get_block, rt.create_block):  # bytes are no label, to either call
        with pytest.raises(ValidationError):
            call(group.id, b"human")  # type: ignore[arg-type]


def test_set_block_makes_a_version_and_refuses_what_does_not_fit(rt: Runtime, db_url: str) -> None:
    group = rt.create_group(
        primary=SCRIPTED,
        sleeptime=[{"kind": "memory"}],
        blocks={
            "human": {"value": "", "limit": 10},
            "rules": {"value": "be kind", "read_only": True},
        },
    )
    updated = rt.set_block(group.primary_agent_id, "human", "name: Ada")
    assert (updated.value, updated.version) == ("name: Ada", 2)
    assert rt.get_block(group.id, "human") == updated
    # Read-only is for the agents' memory tools: the application may set it.
    assert rt.set_block(group.id, "rules", "be brief").value == "be brief"
    before = stored_versions(db_url)
    with pytest.raises(ValidationError, match="over the limit of block 'human'"):
        rt.set_block(group.id, "human", "x" * 11)
    with pytest.raises(ValidationError, match="NUL"):
        rt.set_block(group.id, "human", "a\x00b")
    with pytest.raises(ValidationError):
        rt.set_block(group.id, "human", None)  # type: ignore[arg-type]
    with pytest.raises(BlockNotFound, match="labels there: human, rules"):
        rt.set_block(group.id, "plans", "x")
    with pytest.raises(AgentNotFound):
        rt.set_block("agent-nobody-made", "human", "x")
    assert stored_versions(db_url) == before
    assert [(v.version, v.change, v.source) for v in rt.block_history(group.id, "human")] == [
        (1, "created", "application"),
        (2, "set", "application"),
    ]


def test_a_read_only_block_stays_read_only_for_the_memory_tools(rt: Runtime) -> None:
    group = rt.create_group(
        primary=SCRIPTED,
        sleeptime=[{"kind": "memory"}],
        frequency=1,
        blocks={"human": {"value": "", "read_only": True}},
    )
    rt.set_block(group.id, "human", "set by the application")
    runs = rt.wait_for_runs(rt.step(group.id, [user("my name is Ada")]).run_ids, timeout=30)
    assert runs[0].status is RunStatus.COMPLETED
    assert rt.get_block(group.id, "human").value == "set by the application"
    assert "read-only" in rt.list_messages(group.sleeptime_agent_ids[0])[-1].text()


def test_create_block_adds_a_shared_or_an_agents_own_block(rt: Runtime, db_url: str) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
    sleeper = group.sleeptime_agent_ids[0]
    shared = rt.create_block(group.id, "plans", "trip", limit=100, description="what is next")
    assert (shared.agent_id, shared.limit, shared.version) == (None, 100, 1)
    own = rt.create_block(sleeper, "scratch", read_only=True)
    assert (own.agent_id, own.read_only, own.value) == (sleeper, True, "")
    assert rt.get_blocks(sleeper).labels() == [
        "human",
        "persona",
        "plans",
        "memory_persona",
        "scratch",
    ]
    assert rt.get_blocks(group.primary_agent_id).labels() == ["human", "persona", "plans"]
    assert rt.get_block(group.primary_agent_id, "plans") == shared
    (created,) = rt.block_history(sleeper, "scratch")
    assert (created.change, created.source, created.agent_id) == ("created", "application", sleeper)

    before = stored_versions(db_url)
    with pytest.raises(BlockExists, match="'plans'"):
        rt.create_block(group.id, "plans")
    with pytest.raises(BlockExists):  # the agent already sees a shared one
        rt.create_block(group.primary_agent_id, "human")
    with pytest.raises(BlockExists):  # the sleeptime agent would see two
        rt.create_block(group.id, "memory_persona")
    with pytest.raises(BlockExists):
        rt.create_block(group.id, "scratch")
    for bad in (
        {"label": "9lives"},
        {"label": "with space"},
        {"label": "x" * 65},
        {"label": "ok", "value": "x" * 11, "limit": 10},
        {"label": "ok", "limit": 0},
        {"label": "ok", "value": "\ud800"},
        {"label": "ok", "description": "a\x00"},
    ):
        with pytest.raises(ValidationError):
            rt.create_block(group.id, **bad)
    with pytest.raises(GroupNotFound):
        rt.create_block("group-nobody-made", "plans")
    with pytest.raises(AgentNotFound):
        rt.create_block("agent-nobody-made", "plans")
    assert stored_versions(db_url) == before
    assert rt.get_blocks(sleeper).labels() == [
        "human",
        "persona",
        "plans",
        "memory_persona",
        "scratch",
    ]
    assert rt.check_invariants([group.id]).ok


def test_delete_block_keeps_its_history_and_the_label_can_come_back(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
    rt.set_block(group.id, "persona", "cheerful")
    deleted = rt.delete_block(group.primary_agent_id, "persona")
    assert (deleted.value, deleted.version) == ("cheerful", 2)
    with pytest.raises(BlockNotFound):
        rt.get_block(group.id, "persona")
    with pytest.raises(BlockNotFound):
        rt.delete_block(group.id, "persona")
    assert rt.get_blocks(group.primary_agent_id).labels() == ["human"]
    again = rt.create_block(group.id, "persona", "calm")
    assert again.id != deleted.id
    history = rt.block_history(group.id, "persona")
    assert [(v.block_id, v.version, v.value, v.change) for v in history] == [
        (deleted.id, 1, "", "created"),
        (deleted.id, 2, "cheerful", "set"),
        (deleted.id, 3, None, "deleted"),
        (again.id, 1, "calm", "created"),
    ]
    assert rt.check_invariants([group.id]).ok


def test_block_history_pages_by_id_while_versions_are_added(rt: Runtime) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
    seen: list[BlockVersion] = []
    after = None
    for n in range(12):
        rt.set_block(group.id, "human", f"value {n}")
        page = rt.block_history(group.id, "human", limit=2, after=after)
        seen += page
        after = page[-1].id if page else after
    while page := rt.block_history(group.id, "human", limit=2, after=after):
        seen += page
        after = page[-1].id
    assert [v.version for v in seen] == list(range(1, 14))
    assert rt.block_history(group.id, "human", after=seen[-1].id) == []
    with pytest.raises(BlockNotFound):
        rt.block_history(group.id, "plans")
    # A cursor that names no version of the block is an error, not the end of its history.
    with pytest.raises(BlockVersionNotFound):
        rt.block_history(group.id, "human", after=seen[-1].id + 1000)
    with pytest.raises(BlockVersionNotFound):
        rt.block_history(group.id, "persona", after=seen[-1].id)  # another block's
    with pytest.raises(BlockNotFound):
        rt.block_history(group.id, "plans", after=seen[-1].id)
    for bad in ({"limit": 0}, {"after": -1}, {"limit": "many"}):
        with pytest.raises(ValidationError):
            rt.block_history(group.id, "human", **bad)


def test_writes_are_refused_by_a_read_only_runtime(db_url: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
    with Runtime.start(db_url, read_only=True) as viewer:
        assert viewer.get_block(group.id, "human").value == ""
        assert len(viewer.block_history(group.id, "human")) == 1
        attempts: list[Callable[[], Block]] = [
            lambda: viewer.set_block(group.id, "human", "x"),
            lambda: viewer.create_block(group.id, "plans"),
            lambda: viewer.delete_block(group.id, "human"),
        ]
        for attempt in attempts:
            with pytest.raises(ReadOnlyRuntime):
                attempt()


# -- racing the memory tools --------------------------------------------------------------


def test_application_writes_racing_memory_tool_calls_lose_nothing(
    brt: Runtime, scribe: Scribe
) -> None:
    group = scribe_group(brt)
    setters, per_setter, turns = 3, 12, 20
    app_values = {f"app {t}-{i}" for t in range(setters) for i in range(per_setter)}
    failures: list[BaseException] = []

    def set_many(t: int) -> None:
        try:
            for i in range(per_setter):
                brt.set_block(group.id, NOTES, f"app {t}-{i}")
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=set_many, args=(t,)) for t in range(setters)]
    for thread in threads:
        thread.start()
    run_ids = [r for _ in range(turns) for r in brt.step(group.id, [user("hi")]).run_ids]
    for thread in threads:
        thread.join(30)
    runs = brt.wait_for_runs(run_ids, timeout=60)
    assert not failures and all(r.status is RunStatus.COMPLETED for r in runs)

    history = brt.block_history(group.id, NOTES)
    assert [v.version for v in history] == list(range(1, len(history) + 1))
    final = brt.get_block(group.id, NOTES)
    assert (final.value, final.version) == (history[-1].value, history[-1].version)
    applied = [v for v in history if v.source == "application" and v.change == "set"]
    assert {v.value for v in applied} == app_values and len(applied) == len(app_values)
    edits = [v for v in history if v.change == "edited"]
    assert sorted(v.run_id or "" for v in edits) == sorted(run_ids)
    for previous, version in itertools.pairwise(history):
        if version.change == "edited":  # planned against the value just before it
            assert version.source == "run" and version.tool == "memory_insert"
            assert version.tool_call_id == f"tc-{version.run_id}"
            assert version.run_id is not None
            expected = "\n".join(p for p in (previous.value, line(version.run_id)) if p)
            assert version.value == expected
        else:
            assert (version.source, version.run_id, version.tool) == ("application", None, None)
    assert brt.check_invariants([group.id]).ok


def test_a_block_deleted_or_created_during_a_run(db_url: str) -> None:
    gate = threading.Event()
    scribe = Scribe(gate)
    with Runtime.start(db_url, kinds={"scribe": scribe.factory}) as rt:
        group = scribe_group(rt)
        first = rt.step(group.id, [user("hi")]).run_ids[0]
        assert scribe.entered.acquire(timeout=10)
        # The run holds its snapshot (with `notes`) and waits at the gate.
        assert wait_until(lambda: rt.get_run(first).status is RunStatus.RUNNING)
        rt.delete_block(group.id, NOTES)
        rt.create_block(group.id, "later", "made during the run")
        gate.set()
        (ended,) = rt.wait_for_runs([first], timeout=30)
        assert ended.status is RunStatus.COMPLETED
        result = scribe.results[first]
        assert not result.ok and "deleted" in result.message
        # The deletion is the block's last version; the refused edit wrote nothing.
        assert [v.change for v in rt.block_history(group.id, NOTES)] == ["created", "deleted"]

        second = rt.step(group.id, [user("again")]).run_ids[0]
        (later_run,) = rt.wait_for_runs([second], timeout=30)
        assert later_run.status is RunStatus.COMPLETED
        assert "later" in scribe.labels[second] and NOTES not in scribe.labels[second]
        assert not scribe.results[second].ok  # no block labelled notes: a tool error
        report = rt.check_invariants([group.id])
        assert report.ok, report.violations


def test_history_and_cache_survive_a_restart(db_url: str, scribe: Scribe) -> None:
    with Runtime.start(db_url, kinds={"scribe": scribe.factory}) as rt:
        group = scribe_group(rt)
        rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
        rt.create_block(group.id, "plans", "one")
        rt.set_block(group.id, "plans", "two")
        rt.delete_block(group.id, "human")
        before = {label: rt.block_history(group.id, label) for label in (NOTES, "plans", "human")}
        blocks_before = rt.get_blocks(group.sleeptime_agent_ids[0])
    with Runtime.start(db_url, kinds={"scribe": scribe.factory}) as rt:
        assert {label: rt.block_history(group.id, label) for label in before} == before
        assert rt.get_blocks(group.sleeptime_agent_ids[0]) == blocks_before
        rt.set_block(group.id, "plans", "three")  # the cache after the restart stays exact
        rt.create_block(group.id, "human", "again")
        run_ids = rt.step(group.id, [user("more")]).run_ids
        rt.wait_for_runs(run_ids, timeout=30)
        cached = rt.get_blocks(group.sleeptime_agent_ids[0])  # the owner's cache
        assert list(cached) == _from_database(db_url, group.sleeptime_agent_ids[0])
        assert cached.labels() == [NOTES, "plans", "human", "memory_persona"]
        assert rt.get_block(group.id, "plans").version == 3
        assert rt.check_invariants([group.id]).ok


def _from_database(db_url: str, agent_id: str) -> list[Block]:
    """The agent's blocks as a read-only store reads them (no cache)."""
    viewer = Store(db_url, read_only=True)
    try:
        return list(viewer.get_blocks(agent_id))
    finally:
        viewer.close()


# -- a random sequence of writes and the history it leaves --------------------------------

LABELS = ("a", "b")


@dataclass(frozen=True)
class Op:
    kind: str  # create, set, delete
    view: str  # group, primary, sleeper
    label: str
    value: str = ""


OPS = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(["create", "set", "delete"]),
        view=st.sampled_from(["group", "primary", "sleeper"]),
        label=st.sampled_from(LABELS),
        value=st.text(alphabet="xyz", max_size=3),
    ),
    max_size=12,
)


class Model:
    """What the blocks and their histories should be after each write."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.owner = {"group": None, "primary": ids["primary"], "sleeper": ids["sleeper"]}
        self.current: dict[tuple[str | None, str], tuple[str, int]] = {}
        self.log: list[tuple[str | None, str, int, str | None, str]] = []

    def visible(self, view: str) -> set[str | None]:
        return {None} if view == "group" else {None, self.owner[view]}

    def find(self, view: str, label: str) -> tuple[str | None, str] | None:
        for owner in (None, self.owner[view]):
            if (owner, label) in self.current and owner in self.visible(view):
                return owner, label
        return None

    def apply(self, op: Op) -> type[Exception] | None:
        if op.kind == "create":
            owner = self.owner[op.view]
            taken = any(
                label == op.label and (owner is None or other in (None, owner))
                for other, label in self.current
            )
            if taken:
                return BlockExists
            self.current[(owner, op.label)] = (op.value, 1)
            self.log.append((owner, op.label, 1, op.value, "created"))
            return None
        key = self.find(op.view, op.label)
        if key is None:
            return BlockNotFound
        _, version = self.current[key]
        if op.kind == "set":
            self.current[key] = (op.value, version + 1)
            self.log.append((*key, version + 1, op.value, "set"))
        else:
            del self.current[key]
            self.log.append((*key, version + 1, None, "deleted"))
        return None


def write(rt: Runtime, target: str, op: Op) -> Block:
    if op.kind == "create":
        return rt.create_block(target, op.label, op.value)
    if op.kind == "set":
        return rt.set_block(target, op.label, op.value)
    return rt.delete_block(target, op.label)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_any_sequence_of_writes_leaves_the_history_it_made(rt: Runtime, ops: list[Op]) -> None:
    group = rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}], blocks={})
    ids = {
        "group": group.id,
        "primary": group.primary_agent_id,
        "sleeper": group.sleeptime_agent_ids[0],
    }
    model = Model(ids)
    for op in ops:
        expected = model.apply(op)
        if expected is None:
            write(rt, ids[op.view], op)
        else:
            with pytest.raises(expected):
                write(rt, ids[op.view], op)
    for view, target in ids.items():
        for label in LABELS:
            wanted = [
                (version, value, change)
                for owner, lab, version, value, change in model.log
                if lab == label and owner in model.visible(view)
            ]
            if wanted:
                history = rt.block_history(target, label)
                assert [(v.version, v.value, v.change) for v in history] == wanted
                check_contiguous(history)
            else:
                with pytest.raises(BlockNotFound):
                    rt.block_history(target, label)
            key = model.find(view, label)
            if key is None:
                with pytest.raises(BlockNotFound):
                    rt.get_block(target, label)
            else:
                assert rt.get_block(target, label).value == model.current[key][0]
        # The owner's cache holds what the database holds.
        stored = rt._store.group_blocks(group.id)
        if view != "group":
            assert list(rt.get_blocks(target)) == list(visible_to(target, stored))
        else:
            assert list(rt._store.shared_blocks(target)) == list(visible_to(None, stored))
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


# -- the owner's cache of blocks ------------------------------------------------------------


def cached_block(block_id: str, owner: str | None = None) -> Block:
    return Block(id=block_id, group_id="group-1", agent_id=owner, label=block_id, value="", limit=9)


def test_the_cache_follows_blocks_created_and_deleted() -> None:
    cache = BlockCache()
    first, mine = cached_block("first"), cached_block("mine", "agent-1")
    cache.remember("agent-1", "group-1", [first, mine], cache.epoch)
    cache.added(cached_block("second"))
    cache.added(cached_block("theirs", "agent-2"))
    seen = cache.blocks_of("agent-1")
    assert seen is not None and seen.labels() == ["first", "second", "mine"]
    shared = cache.shared_of("group-1")
    assert shared is not None and shared.labels() == ["first", "second"]
    cache.removed(first)
    seen = cache.blocks_of("agent-1")
    assert seen is not None and seen.labels() == ["second", "mine"]
    assert cache.committed("first") is None
    cache.forget_group("group-1")  # an outcome unknown: read the database again
    assert cache.blocks_of("agent-1") is None and cache.shared_of("group-1") is None


def test_a_read_begun_before_a_creation_or_deletion_is_not_remembered() -> None:
    cache = BlockCache()
    first = cached_block("first")
    for change in (cache.added, cache.removed):
        epoch = cache.epoch  # a read starts, and finds the layout before the change
        change(cached_block("second"))
        cache.remember(None, "group-1", [first], epoch)
        assert cache.shared_of("group-1") is None


# -- ownership and the asyncio API --------------------------------------------------------


def test_a_group_served_elsewhere_is_not_written(db_url: str, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("one process holds every shard of a SQLite file")
    # (A lease of 2 s: at 1 s, a busy CI machine once let the first process's leases
    # lapse as the second joined, and the second took every shard.)
    with Runtime.start(db_url, lease_s=2.0, shards=8) as first:
        groups = [
            first.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}]) for _ in range(8)
        ]
        with Runtime.start(db_url, lease_s=2.0, shards=8) as second:
            assert wait_until(lambda: any(not second.owner_of(g.id).here for g in groups), 15)
            theirs = next(g for g in groups if not second.owner_of(g.id).here)
            attempts: list[Callable[[], Block]] = [
                lambda: second.set_block(theirs.id, "human", "x"),
                lambda: second.create_block(theirs.id, "plans"),
                lambda: second.delete_block(theirs.id, "human"),
            ]
            for attempt in attempts:
                with pytest.raises(NotOwner):
                    attempt()
            assert second.get_block(theirs.id, "human").version == 1  # reads go anywhere
            assert len(second.block_history(theirs.id, "human")) == 1


def test_the_async_api_has_the_block_calls(db_url: str) -> None:
    async def main() -> None:
        async with await AsyncRuntime.start(db_url) as rt:
            group = await rt.create_group(primary=SCRIPTED, sleeptime=[{"kind": "memory"}])
            assert (await rt.get_block(group.id, "human")).value == ""
            assert (await rt.set_block(group.id, "human", "Ada")).version == 2
            created = await rt.create_block(group.id, "plans", "trip", limit=50)
            assert created.limit == 50
            assert (await rt.delete_block(group.id, "plans")).value == "trip"
            history = await rt.block_history(group.id, "plans", limit=5)
            assert [v.change for v in history] == ["created", "deleted"]
            with pytest.raises(BlockNotFound):
                await rt.get_block(group.id, "plans")
            with pytest.raises(ValidationError):
                await rt.set_block(group.id, "human", "x" * 6000)
            with pytest.raises(BlockExists):
                await rt.create_block(group.id, "human")
            with pytest.raises(BlockNotFound):
                await rt.delete_block(group.id, "plans")
            with pytest.raises(GroupNotFound):
                await rt.block_history("group-nobody-made", "human")

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # it writes sleeptime.db in the working directory
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (example,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.S)
        if "block_history(" in block
    ]
    exec(compile(example, "README.md", "exec"), {})
