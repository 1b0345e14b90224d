"""Paging: every list call returns each row exactly once, in order, a page at a time
(`limit` and a keyset cursor `after=`), also while turns add rows meanwhile."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import run
from actors import (
    AsyncRuntime,
    GroupNotFound,
    MessageNotFound,
    RunEventNotFound,
    RunNotFound,
    Runtime,
)
from messages import Group
from tests.agents import Echo, user

T = TypeVar("T")
MEMORY = {"kind": "memory"}


def paged(read: Callable[[Any], Sequence[T]], cursor: Callable[[T], Any]) -> list[T]:
    """Every row, read a page at a time until a page comes back empty."""
    rows: list[T] = []
    after = None
    while page := read(after):
        rows.extend(page)
        after = cursor(page[-1])
    return rows


def _messages_after(rt: Runtime, agent_id: str, size: int, after: str | None) -> list[Any]:
    return rt.list_messages(agent_id, limit=size, after=after)


def ids(rows: Sequence[Any]) -> list[Any]:
    return [row.id for row in rows]


@pytest.fixture
def filled(rt: Runtime) -> list[Group]:
    """Three groups with a few turns each, their runs done."""
    rt.agents.register("echo", Echo, roles=["primary"])
    groups = [
        rt.create_group(primary={"kind": kind}, sleeptime=[MEMORY, MEMORY], frequency=frequency)
        for kind, frequency in (("scripted", 1), ("echo", 2), ("scripted", None))
    ]
    run_ids = []
    for turn in range(4):
        for group in groups:
            run_ids += rt.step(group.id, [user(f"my favorite color is c{turn}")]).run_ids
    rt.wait_for_runs(run_ids, timeout=30)
    return groups


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(size=st.integers(min_value=1, max_value=9), newest_first=st.booleans())
def test_pages_hold_every_row_once_in_order(
    rt: Runtime, filled: list[Group], size: int, newest_first: bool
) -> None:
    runs = paged(
        lambda after: rt.list_runs(limit=size, newest_first=newest_first, after=after),
        lambda r: r.id,
    )
    assert ids(runs) == ids(rt.list_runs(newest_first=newest_first))
    mine = paged(
        lambda after: rt.list_runs(group_id=filled[0].id, limit=size, after=after),
        lambda r: r.id,
    )
    assert ids(mine) == ids(rt.list_runs(group_id=filled[0].id))
    for agent_id in (filled[1].primary_agent_id, filled[1].sleeptime_agent_ids[0]):
        history = paged(
            functools.partial(_messages_after, rt, agent_id, size),
            lambda m: m.id,
        )
        assert ids(history) == ids(rt.list_messages(agent_id))
    events = paged(
        lambda after: rt.run_events(runs[0].id, limit=size, after=after),
        lambda e: e.id,
    )
    assert events == rt.run_events(runs[0].id)
    assert [e.id for e in events] == sorted(e.id for e in events if e.id is not None)
    groups = paged(lambda after: rt.list_groups(limit=size, after=after), lambda g: g.id)
    assert ids(groups) == ids(rt.list_groups()) == ids(filled)


@pytest.mark.parametrize("size", [1, 3])
def test_paging_while_turns_add_rows_sees_each_row_once(rt: Runtime, size: int) -> None:
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=1)
    for turn in range(3):
        rt.step(group.id, [user(f"my name is Ada {turn}")])
    before_runs = ids(rt.list_runs(group_id=group.id))
    before_messages = ids(rt.list_messages(group.primary_agent_id))
    before_groups = ids(rt.list_groups())

    def add() -> None:
        for turn in range(12):
            rt.record_turn(group.id, [user(f"q{turn}"), {"role": "assistant", "content": "a"}])
            if turn % 4 == 0:
                rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY])

    adder = threading.Thread(target=add)
    adder.start()
    runs: list[Any] = []
    history: list[Any] = []
    groups: list[Any] = []
    cursors: dict[str, Any] = {"runs": None, "messages": None, "groups": None}
    while True:
        done = not adder.is_alive()  # looked at first: a short page after it is the end
        pages: dict[str, list[Any]] = {
            "runs": rt.list_runs(group_id=group.id, limit=size, after=cursors["runs"]),
            "messages": rt.list_messages(
                group.primary_agent_id, limit=size, after=cursors["messages"]
            ),
            "groups": rt.list_groups(limit=size, after=cursors["groups"]),
        }
        for name, rows in (("runs", runs), ("messages", history), ("groups", groups)):
            page = pages[name]
            rows.extend(page)
            if page:
                cursors[name] = page[-1].id
        if done and all(len(page) < size for page in pages.values()):
            break
    adder.join()
    rt.wait_for_runs(ids(runs), timeout=30)
    for listed, before, whole in (
        (ids(runs), before_runs, ids(rt.list_runs(group_id=group.id))),
        (ids(history), before_messages, ids(rt.list_messages(group.primary_agent_id))),
        (ids(groups), before_groups, ids(rt.list_groups())),
    ):
        assert len(set(listed)) == len(listed)  # none twice
        assert listed[: len(before)] == before  # what was there first, in order
        assert listed == whole  # and what came meanwhile, after it


def test_a_cursor_that_names_nothing_is_a_typed_error(rt: Runtime, filled: list[Group]) -> None:
    group = filled[0]
    with pytest.raises(RunNotFound):
        rt.list_runs(after="run-nobody-made")
    with pytest.raises(GroupNotFound):
        rt.list_groups(after="group-nobody-made")
    with pytest.raises(MessageNotFound):
        rt.list_messages(group.primary_agent_id, after="message-nobody-made")
    other = rt.list_messages(filled[1].primary_agent_id)[0].id
    with pytest.raises(MessageNotFound):  # a message of another agent
        rt.list_messages(group.primary_agent_id, after=other)
    run_id = rt.list_runs(group_id=group.id)[0].id
    foreign = rt.run_events(rt.list_runs(group_id=filled[1].id)[0].id)[0].id
    with pytest.raises(RunEventNotFound):
        rt.run_events(run_id, after=foreign)
    for bad in (
        lambda: rt.list_runs(limit=0),
        lambda: rt.list_groups(limit=-1),
        lambda: rt.list_messages(group.primary_agent_id, limit=0),
        lambda: rt.run_events(run_id, after=0),
        lambda: rt.run_events(run_id, after=2**63),  # past any stored id (a 64-bit integer)
        lambda: rt.list_groups(statuses=["sleeping"]),
        lambda: rt.list_runs(after=""),
    ):
        with pytest.raises(ValidationError):
            bad()


def test_list_groups_filters_by_status_and_primary_kind(rt: Runtime, filled: list[Group]) -> None:
    failed = filled[2]
    rt._store.fail_group(failed.id, "stopped for the test").result()
    assert ids(rt.list_groups(statuses=["failed"])) == [failed.id]
    assert ids(rt.list_groups(statuses=["active"])) == ids(filled[:2])
    assert ids(rt.list_groups(statuses=["active", "failed"])) == ids(filled)
    assert ids(rt.list_groups(primary_kind="echo")) == [filled[1].id]
    assert ids(rt.list_groups(primary_kind="scripted", statuses=["active"])) == [filled[0].id]
    assert ids(rt.list_groups(primary_kind="scripted", limit=1, after=filled[0].id)) == [failed.id]
    assert rt.list_groups(primary_kind="nobody") == []


def test_the_async_api_pages_too(rt: Runtime, filled: list[Group]) -> None:
    async def main() -> None:
        art = AsyncRuntime.wrap(rt)
        first = await art.list_runs(limit=2)
        second = await art.list_runs(limit=2, after=first[-1].id)
        assert ids(first + second) == ids(rt.list_runs(limit=4))
        groups = await art.list_groups(limit=1, after=filled[0].id, statuses=["active"])
        assert ids(groups) == [filled[1].id]
        history = await art.list_messages(filled[0].primary_agent_id, limit=1)
        assert ids(history) == ids(rt.list_messages(filled[0].primary_agent_id))[:1]
        events = await art.run_events(first[0].id, limit=1, after=None)
        assert len(events) == 1 and events[0].id is not None
        with pytest.raises(RunNotFound):
            await art.list_runs(after="run-nobody-made")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_run_py_runs_and_groups_page_through_the_database(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Runtime.start(db_url) as rt:
        groups = [rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY]) for _ in "abc"]
        run_ids = [i for g in groups for i in rt.step(g.id, [user("my name is Ada")]).run_ids]
        run_ids += rt.step(groups[0].id, [user("my name is Bob")]).run_ids
        rt.wait_for_runs(run_ids, timeout=30)
        newest_first = ids(rt.list_runs(newest_first=True))
    shown: list[str] = []
    argv = ["runs", "--db", db_url, "--limit", "3"]
    while True:
        assert run.main(argv) == 0
        out = capsys.readouterr().out
        if out.startswith("No more runs match."):
            break
        shown += [line.split()[0] for line in out.splitlines()[2:-1]]
        footer = out.splitlines()[-1]
        if "--after" not in footer:
            break
        argv = footer.split("older ones: ")[1].split()[2:]  # the command it says to run
    assert shown == newest_first
    assert run.main(["groups", "--db", db_url, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert f"--after {groups[1].id}" in out.splitlines()[-1]
    assert run.main(["groups", "--db", db_url, "--limit", "2", "--after", groups[1].id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[0] == groups[2].id and lines[-1] == "1 group(s)"
    assert run.main(["runs", "--db", db_url, "--after", "run-nobody-made"]) == 2
    assert "no run with id 'run-nobody-made'" in capsys.readouterr().err
