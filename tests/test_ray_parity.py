"""The Ray client's calls behave as the Runtime's (SPEC 16): the same tests, run against a
plain `Runtime` and against a `RayRuntime` over two shard hosts, both on PostgreSQL.

Each test takes `api`, parametrized `runtime` / `ray`, and checks what a caller sees:
results, stored state, and errors of the same types. The hosts are real Ray actors (in
worker processes) of the session's local Ray; the groups a test makes land on both hosts
(the client places them in turn), so calls are routed between them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("ray", reason="the ray extra is missing")

from pydantic import ValidationError

from actors import (
    AgentNotFound,
    AgentNotInGroup,
    AgentRoleError,
    AsyncRuntime,
    BlockExists,
    BlockNotFound,
    GroupNotFound,
    PrimaryAgentError,
    RunNotFound,
    RunsTimeout,
    Runtime,
    TurnTimeout,
    UnknownAgentKind,
)
from actors.ray_cluster import AsyncRayRuntime, RayCluster, RayRuntime
from messages import RunStatus
from tests.agents import Echo, Streamer, user
from tests.postgres import PostgresCluster
from tests.rayhosts import database, hosts

pytestmark = pytest.mark.ray

MEMORY = {"kind": "memory"}
SCRIPTED = {"kind": "scripted"}
SLOW = {"kind": "simulated", "config": {"latency_ms": 1500, "seed": 1}}
API = Runtime | RayRuntime


@pytest.fixture(scope="module")
def cluster(local_ray: object, postgres_cluster: PostgresCluster) -> Iterator[RayCluster]:
    with database(postgres_cluster, "ray_parity") as url, hosts(url, 2) as started:
        yield started


@pytest.fixture(scope="module")
def plain(postgres_cluster: PostgresCluster) -> Iterator[Runtime]:
    with database(postgres_cluster, "ray_parity_plain") as url:
        runtime = Runtime.start(url, lease_s=1.0, shards=64, workers=8)
        try:
            yield runtime
        finally:
            runtime.stop(drain_timeout=5)


@pytest.fixture(params=["runtime", "ray"])
def api(request: pytest.FixtureRequest) -> API:
    if request.param == "runtime":
        runtime: Runtime = request.getfixturevalue("plain")
        return runtime
    started: RayCluster = request.getfixturevalue("cluster")
    return started.client(retry_timeout=30)


def test_steps_fire_on_the_frequency_and_memory_improves(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=2)
    said = [api.step(group.id, [user(f"my favorite color is {c}")]) for c in ("teal", "red")]
    third = api.step(group.id, [user("my favorite color is coral")])
    assert [r.turn for r in [*said, third]] == [1, 2, 3]
    assert [r.fired for r in [*said, third]] == [True, False, True]
    run_ids = said[0].run_ids + third.run_ids
    runs = api.wait_for_runs(run_ids, timeout=30)
    assert [r.id for r in runs] == run_ids
    assert all(r.status is RunStatus.COMPLETED for r in runs)
    assert "coral" in api.get_blocks(group.primary_agent_id)["human"].value
    stored = api.get_group(group.id)
    assert (stored.turns, stored.counter) == (3, 0)
    texts = [m.text() for m in api.list_messages(group.primary_agent_id)]
    assert texts[0] == "my favorite color is teal" and len(texts) == 6
    assert api.get_agent(group.sleeptime_agent_ids[0]).role == "sleeptime"


def test_a_stream_yields_the_messages_then_has_the_result(api: API) -> None:
    api.agents.register("streamer", Streamer)  # a kind registered through the API
    group = api.create_group(primary={"kind": "streamer"}, sleeptime=[MEMORY], frequency=1)
    stream = api.stream(group.id, [user("go")])
    messages = list(stream)
    assert [m.text() for m in messages] == ["part 0", "part 1", "part 2"]
    result = stream.result
    assert (
        result.turn == 1
        and result.fired
        and [m.id for m in result.messages] == [m.id for m in messages]
    )
    broken = api.create_group(
        primary={"kind": "streamer", "config": {"fail": True}}, sleeptime=[MEMORY]
    )
    failing = api.stream(broken.id, [user("go")])
    assert next(failing).text() == "part 0"
    with pytest.raises(PrimaryAgentError) as failed:
        list(failing)
    assert failed.value.result.turn == 1 and len(failed.value.result.messages) == 3


def test_record_turn_counts_one_turn_and_a_retry_records_nothing(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    recorded = api.record_turn(
        group.id,
        [user("q1"), {"role": "assistant", "content": "a1"}, user("q2")],
        request_id="order-7",
    )
    again = api.record_turn(group.id, [user("something else")], request_id="order-7")
    assert again == recorded and recorded.turn == 1
    first = api.step(group.id, [user("hi")], request_id="order-8")
    assert api.step(group.id, [user("hi again")], request_id="order-8") == first
    assert api.get_group(group.id).turns == 2
    api.wait_for_runs(recorded.run_ids + first.run_ids, timeout=30)
    report = api.check_invariants([group.id])
    assert report.ok, report.violations


def test_update_group_keeps_the_counter_and_owner_of_names_the_owner(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=3)
    api.step(group.id, [user("one")])
    updated = api.update_group(group.id, frequency=5, run_timeout=60)
    assert (updated.frequency, updated.counter, updated.run_timeout) == (5, 0, 60)
    assert api.get_group(group.id).frequency == 5
    with pytest.raises(ValidationError):
        api.update_group(group.id, frequency=-1)
    owner = api.owner_of(group.id)
    assert owner.group_id == group.id and owner.owner is not None


def test_errors_arrive_as_the_same_types(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY])
    with pytest.raises(GroupNotFound):
        api.step("group-nobody-made", [user("hi")])
    with pytest.raises(ValidationError):
        api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=-1)
    with pytest.raises(ValidationError):
        api.step(group.id, [])
    with pytest.raises(UnknownAgentKind):
        api.create_group(primary={"kind": "nobody-registered-it"}, sleeptime=[MEMORY])
    with pytest.raises(AgentRoleError):
        api.create_group(primary=MEMORY, sleeptime=[MEMORY])
    with pytest.raises(RunNotFound):
        api.get_run("run-nobody-made")
    with pytest.raises(RunNotFound):
        api.wait_for_runs(["run-nobody-made"], timeout=1)
    with pytest.raises(AgentNotFound):
        api.get_blocks("agent-nobody-made")
    failing = api.create_group(
        primary={"kind": "simulated", "config": {"failure_rate": 1.0}}, sleeptime=[MEMORY]
    )
    with pytest.raises(PrimaryAgentError) as failed:
        api.step(failing.id, [user("hi")])
    assert failed.value.result.turn == 1 and failed.value.group_id == failing.id
    slow = api.create_group(primary=SLOW, sleeptime=[SLOW], frequency=1)
    with pytest.raises(TurnTimeout) as late:
        api.step(slow.id, [user("take your time")], timeout=0.3)
    assert late.value.group_id == slow.id
    assert api.wait_for_runs(api.step(slow.id, [user("again")]).run_ids, timeout=30)


def test_runs_are_cancelled_listed_counted_and_waited_for_with_a_timeout(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[SLOW, SLOW], frequency=1)
    run_ids = api.step(group.id, [user("hi")]).run_ids
    with pytest.raises(RunsTimeout) as timed_out:
        api.wait_for_runs(run_ids, timeout=0.2)
    assert set(timed_out.value.open_run_ids) == set(run_ids)
    cancelled = api.cancel_run(run_ids[1])
    assert cancelled.status is RunStatus.CANCELLED
    assert api.cancel_run(run_ids[1]).status is RunStatus.CANCELLED  # terminal: as it is
    done = api.wait_for_runs(run_ids, timeout=30)
    assert [r.status for r in done] == [RunStatus.COMPLETED, RunStatus.CANCELLED]
    assert [e.status for e in api.run_events(run_ids[0])] == [
        RunStatus.CREATED,
        RunStatus.RUNNING,
        RunStatus.COMPLETED,
    ]
    listed = api.list_runs(group_id=group.id, statuses=[RunStatus.CANCELLED])
    assert [r.id for r in listed] == [run_ids[1]]
    assert api.count_runs(group_id=group.id) == 2
    assert api.get_run(run_ids[0]).status is RunStatus.COMPLETED


def test_runs_of_groups_on_every_host_are_waited_for_together(api: API) -> None:
    api.agents.register("echo", Echo, roles=["primary"])
    groups = [api.create_group(primary={"kind": "echo"}, sleeptime=[MEMORY]) for _ in range(6)]
    if isinstance(api, RayRuntime):  # placed in turn: both hosts own some
        assert len({api.owner_of(g.id).address for g in groups}) == 2
    run_ids = [r for g in groups for r in api.step(g.id, [user("my name is Ada")]).run_ids]
    runs = api.wait_for_runs(run_ids, timeout=30)
    assert [r.id for r in runs] == run_ids and all(r.status.terminal for r in runs)
    again = api.step(groups[0].id, [user("hello")])
    assert again.messages[0].text() == "echo 0: hello"
    api.wait_for_runs(again.run_ids, timeout=30)  # its run too, before the invariants
    assert "echo" in api.agents.names()
    assert {g.id for g in groups} <= {g.id for g in api.list_groups()}
    assert api.stats()["transactions"] > 0
    report = api.check_invariants([g.id for g in groups])
    assert report.ok, report.violations


def test_block_calls_reach_the_owner_and_errors_keep_their_types(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    sleeper = group.sleeptime_agent_ids[0]
    assert api.set_block(group.primary_agent_id, "human", "name: Ada").version == 2
    assert api.create_block(group.id, "plans", "trip", limit=100).limit == 100
    assert api.create_block(sleeper, "scratch", read_only=True).agent_id == sleeper
    assert api.get_block(sleeper, "plans").value == "trip"
    assert api.delete_block(group.id, "plans").value == "trip"
    history = api.block_history(group.id, "plans", limit=10)
    assert [v.change for v in history] == ["created", "deleted"]
    with pytest.raises(BlockNotFound):
        api.get_block(group.id, "plans")
    with pytest.raises(BlockExists):
        api.create_block(group.id, "human")
    with pytest.raises(ValidationError):
        api.set_block(group.id, "human", "x" * 6000)
    with pytest.raises(GroupNotFound):
        api.set_block("group-nobody-made", "human", "x")
    with pytest.raises(AgentNotFound):
        api.delete_block("agent-nobody-made", "human")


def test_groups_over_their_life(api: API) -> None:
    group = api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
    first = api.step(group.id, [user("my name is Ada")])
    added = api.add_sleeptime_agent(group.id, MEMORY, backfill=True, backfill_window=1)
    assert (added.added_turn, added.coverage_from_seq) == (1, 1)
    backfill = api.list_runs(agent_id=added.id)
    assert [(r.window_first_seq, r.window_last_seq) for r in backfill] == [(1, 1), (2, 2)]
    removed = api.remove_sleeptime_agent(group.id, group.sleeptime_agent_ids[0])
    assert removed.removed_turn == 1
    assert api.get_group(group.id).sleeptime_agent_ids == [added.id]
    with pytest.raises(AgentNotInGroup):
        api.remove_sleeptime_agent(group.id, group.primary_agent_id)
    later = api.step(group.id, [user("my name is Bo")])
    api.wait_for_runs(first.run_ids + [r.id for r in backfill] + later.run_ids, timeout=30)
    report = api.check_invariants([group.id])
    assert report.ok and report.coverage[added.id] == 1, report.violations
    api.delete_group(group.id)
    with pytest.raises(GroupNotFound):
        api.get_group(group.id)
    with pytest.raises(GroupNotFound):
        api.step(group.id, [user("hi")])


def test_the_async_client_takes_turns_streams_and_waits(cluster: RayCluster) -> None:
    async def main() -> None:
        async with cluster.async_client() as rt:
            group = await rt.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1)
            said = [user("my favorite color is teal")]
            results = await asyncio.gather(*(rt.step(group.id, said) for _ in range(5)))
            assert sorted(r.turn for r in results) == [1, 2, 3, 4, 5]
            run_ids = [i for r in results for i in r.run_ids]
            runs = await rt.wait_for_runs(run_ids, timeout=30)
            assert all(r.status is RunStatus.COMPLETED for r in runs)
            stream = rt.stream(group.id, [user("what is my favorite color?")])
            texts = [m.text() async for m in stream]
            assert texts == ["Your favorite color is teal."]
            assert (await stream.result()).turn == 6
            with pytest.raises(GroupNotFound):
                await rt.step("group-nobody-made", said)
            assert (await rt.get_group(group.id)).turns == 6

    asyncio.run(asyncio.wait_for(main(), 60))


def test_lists_page_and_prune_removes_from_every_host(api: API) -> None:
    groups = [api.create_group(primary=SCRIPTED, sleeptime=[MEMORY], frequency=1) for _ in "abcd"]
    run_ids = [
        i for g in groups for n in range(2) for i in api.step(g.id, [user(f"hi {n}")]).run_ids
    ]
    api.wait_for_runs(run_ids, timeout=30)
    first = api.list_runs(group_id=groups[0].id, limit=1)
    second = api.list_runs(group_id=groups[0].id, limit=1, after=first[0].id)
    assert [r.id for r in first + second] == [r.id for r in api.list_runs(group_id=groups[0].id)]
    history = api.list_messages(groups[0].primary_agent_id, limit=2, after=None)
    assert len(history) == 2
    events = api.run_events(first[0].id, limit=1)
    assert api.run_events(first[0].id, limit=5, after=events[0].id)[0].id != events[0].id
    created = {g.id for g in api.list_groups(limit=2, after=groups[1].id)}
    assert created == {groups[2].id, groups[3].id}
    with pytest.raises(RunNotFound):
        api.list_runs(after="run-nobody-made")
    group_ids = [g.id for g in groups]
    counted = api.prune(keep_runs=1, group_ids=group_ids, dry_run=True)
    assert counted.removed["runs"] == 4 and not counted.skipped
    report = api.prune(keep_runs=1, group_ids=group_ids)
    assert report.removed["runs"] == 4 and sorted(report.by_group) == sorted(group_ids)
    assert not report.skipped
    assert api.check_invariants(group_ids).ok


def _public(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and name not in {"start", "wrap", "migrate", "connect"}
    }


def test_the_clients_have_every_public_call_of_the_runtimes() -> None:
    for ours, theirs in ((RayRuntime, Runtime), (AsyncRayRuntime, AsyncRuntime)):
        mine, wanted = _public(ours), _public(theirs)
        missing = set(wanted) - set(mine)
        assert not missing, f"{ours.__name__} lacks {sorted(missing)}"
        for name, member in wanted.items():
            if not callable(member) or isinstance(member, type):
                continue
            assert inspect.iscoroutinefunction(mine[name]) == inspect.iscoroutinefunction(member), (
                name
            )
            if ours is RayRuntime:  # the same parameters, in the same order
                expected = list(inspect.signature(member).parameters)
                assert list(inspect.signature(mine[name]).parameters) == expected, name
