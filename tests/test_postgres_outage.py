"""A PostgreSQL server restarted under a live runtime: clear errors, then business as usual."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import pytest

from actors import AgentContext, RunsTimeout, Runtime, StoreUnavailable
from actors.runtime import LATE_READ_S
from messages import Message, MessageCreate, RunStatus, TurnResult
from tests.agents import Echo, Recorder, user
from tests.invariants import check_group
from tests.logs import Records
from tests.postgres import PostgresCluster

SLOW = {"kind": "simulated", "config": {"latency_ms": 30, "seed": 3}}


def test_server_restart_fails_calls_clearly_and_loses_nothing(
    backend: str, rt: Runtime, request: pytest.FixtureRequest
) -> None:
    if backend != "postgresql":
        pytest.skip("a server restart is a PostgreSQL matter")
    postgres_cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    records = Records()
    runtime_logger = logging.getLogger("sleeptime")
    runtime_logger.addHandler(records)
    request.addfinalizer(lambda: runtime_logger.removeHandler(records))
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}, SLOW], frequency=1
    )
    before = []
    for n in range(6):
        before += rt.step(group.id, [user(f"my lucky number is {n}")]).run_ids
    committed = rt.get_group(group.id)

    postgres_cluster.stop("fast")
    try:
        calls: list[Callable[[], object]] = [
            lambda: rt.step(group.id, [user("during the outage")]),
            lambda: rt.get_group(group.id),
            lambda: rt.list_runs(group_id=group.id),
            lambda: rt.wait_for_runs(["run-unknown"], timeout=1),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
            assert time.monotonic() - started < 10
    finally:
        postgres_cluster.start()

    after = []
    for n in range(4):  # the runtime reconnects by itself
        after += rt.step(group.id, [user(f"my other number is {n}")]).run_ids
    # The writer logged the outage as it began, and its end with how long it lasted.
    unavailable, recovered = (
        records.events("store_unavailable")[0],
        records.events("store_recovered")[-1],
    )
    assert unavailable.level == recovered.level == logging.WARNING
    assert unavailable.record.created <= recovered.record.created
    assert "unavailable" in unavailable["error"] and recovered["outage_s"] > 0
    runs = rt.wait_for_runs(before + after, timeout=60)
    assert all(r.status.terminal for r in runs)
    assert all(r.status is RunStatus.COMPLETED for r in runs[len(before) :])
    for failed in (r for r in runs if r.status is RunStatus.FAILED):
        assert "unavailable" in (failed.error or "")
    stored = rt.get_group(group.id)
    assert stored.turns == committed.turns + 4  # the failed turn was not counted
    history = rt.list_messages(group.primary_agent_id)
    assert sum(m.role == "user" for m in history) == stored.turns
    assert "during the outage" not in [m.text() for m in history]
    check_group(rt, group.id)


class _ReadsItsHistory:
    """A primary agent that reads its history through the runtime's store mid-step,
    once the test has let it go (the test stops the server meanwhile)."""

    agent_roles = ("primary",)

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.go = threading.Event()

    def factory(self, config: dict[str, object]) -> _ReadsItsHistory:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        self.entered.release()
        assert self.go.wait(30), "never let go"
        said = len(context.recent_history(5))
        return [MessageCreate(role="assistant", content=f"I see {said} messages")]


def test_a_primary_step_that_meets_an_outage_records_nothing_and_its_retry_takes_the_turn(
    backend: str, rt: Runtime, request: pytest.FixtureRequest
) -> None:
    """The store the agent reads through going away is not the agent's failure: the
    caller gets StoreUnavailable, nothing is recorded, and a retry with its request id
    takes the turn once the store is back (before, the failure was recorded for good)."""
    if backend != "postgresql":
        pytest.skip("a server stopped mid-step is a PostgreSQL matter")
    postgres_cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    agent = _ReadsItsHistory()
    rt.agents.register("reads", agent.factory)
    group = rt.create_group(primary={"kind": "reads"}, sleeptime=[{"kind": "memory"}], frequency=1)
    call: Future[TurnResult] = Future()

    def step() -> None:
        try:
            call.set_result(rt.step(group.id, [user("hello")], request_id="r-1"))
        except BaseException as error:
            call.set_exception(error)

    threading.Thread(target=step, daemon=True).start()
    assert agent.entered.acquire(timeout=30)
    postgres_cluster.stop("fast")
    try:
        agent.go.set()
        with pytest.raises(StoreUnavailable):
            call.result(timeout=60)
    finally:
        postgres_cluster.start()
    result = rt.step(group.id, [user("hello")], request_id="r-1")
    assert result.turn == 1 and result.fired and result.messages[0].text() == "I see 0 messages"
    assert rt.get_group(group.id).turns == 1
    assert [m.text() for m in rt.list_messages(group.primary_agent_id)] == [
        "hello",
        "I see 0 messages",
    ]
    rt.wait_for_runs(result.run_ids, timeout=60)
    check_group(rt, group.id)


@pytest.mark.parametrize("how", ["raised", "raised from"])
def test_an_outage_behind_a_primary_agent_failure_records_nothing(rt: Runtime, how: str) -> None:
    class MeetsAnOutage:
        agent_roles = ("primary",)

        def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
            outage = StoreUnavailable("postgresql://db", "connection refused")
            if how == "raised":
                raise outage
            raise RuntimeError("could not read my notes") from outage

    agent = MeetsAnOutage()
    rt.agents.register("meets", lambda config: agent)
    group = rt.create_group(primary={"kind": "meets"}, sleeptime=[{"kind": "memory"}])
    with pytest.raises(StoreUnavailable, match="connection refused"):
        rt.step(group.id, [user("hello")], request_id="r-1")
    assert rt.get_group(group.id).turns == 0
    assert rt.list_messages(group.primary_agent_id) == []


def test_a_wait_whose_time_ran_out_is_not_held_by_a_hung_server(
    backend: str, rt: Runtime, request: pytest.FixtureRequest
) -> None:
    """Its timeout passed, `wait_for_runs` asks the store which runs ended; a server that
    hangs (connections open, nothing answered) holds it at most LATE_READ_S more."""
    if backend != "postgresql":
        pytest.skip("a hung server is a PostgreSQL matter")
    postgres_cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    gate = threading.Event()
    request.addfinalizer(gate.set)
    recorder = Recorder(gate=gate)
    rt.agents.register("recorder", recorder.factory)
    rt.agents.register("echo", Echo)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}])
    (run_id,) = rt.step(group.id, [user("hi")]).run_ids
    recorder.wait_started()
    with postgres_cluster.paused():
        began = time.monotonic()
        with pytest.raises(RunsTimeout) as timed_out:
            rt.wait_for_runs([run_id], timeout=0.5)
        waited = time.monotonic() - began
    assert timed_out.value.open_run_ids == [run_id]
    assert waited < 0.5 + LATE_READ_S + 1.5
    gate.set()
    (run,) = rt.wait_for_runs([run_id], timeout=60)
    assert run.status is RunStatus.COMPLETED
