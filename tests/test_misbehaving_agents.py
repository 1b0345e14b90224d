"""Sleeptime agents that misbehave: each fails, or times out, only its own run, at once,
with what it was given and did kept in its history (SPEC 6 and 8, README "Guarantees")."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from actors import AgentContext, Chaos, Memory, Runtime, StepFailed, StepResult, ToolResult
from messages import (
    Message,
    MessageCreate,
    PrimaryAgentError,
    RunStatus,
    StopReason,
    TurnTimeout,
)
from tests.agents import Echo, user, wait_until


class _Unprintable(Exception):
    """An error whose text cannot be had: its __str__ raises the error itself."""

    def __str__(self) -> str:
        raise self


class _Raises:
    """A sleeptime agent that raises what the test gave it."""

    agent_roles = ("primary", "sleeptime")

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def factory(self, config: dict[str, Any]) -> _Raises:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        raise self.error


def _one_run(rt: Runtime, agent: Any, **settings: Any) -> Any:
    rt.agents.register("echo", Echo)
    rt.agents.register("odd", agent.factory)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "odd"}], **settings)
    (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    return group, run


@pytest.mark.parametrize(
    ("given", "status", "stop_reason", "error"),
    [
        ("timeout", RunStatus.FAILED, StopReason.TIMEOUT, "gave up"),
        (StopReason.ERROR, RunStatus.FAILED, StopReason.ERROR, "gave up"),
        ("end_turn", RunStatus.FAILED, StopReason.ERROR, "ValueError: the stop reason of a fail"),
        ("nonsense", RunStatus.FAILED, StopReason.ERROR, "'error' or 'timeout', not 'nonsense'"),
    ],
)
def test_step_failed_takes_its_stop_reason_as_text_or_fails_as_an_error(
    rt: Runtime, given: Any, status: RunStatus, stop_reason: StopReason, error: str
) -> None:
    class Fails:
        def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
            raise StepFailed("gave up", stop_reason=given)

    agent = Fails()
    agent.factory = lambda config: agent  # type: ignore[attr-defined]
    _, run = _one_run(rt, agent, run_timeout=30)
    assert (run.status, run.stop_reason) == (status, stop_reason)
    assert error in (run.error or "")
    assert rt.stats()["restarts"] == 0  # the tracker took it in its stride


def test_step_result_refuses_a_stop_reason_of_a_failure() -> None:
    with pytest.raises(ValueError, match="'end_turn' or 'max_steps', not 'cancelled'"):
        StepResult(messages=[], stop_reason="cancelled")
    assert StepResult(messages=[], stop_reason="max_steps").stop_reason is StopReason.MAX_STEPS


def test_step_failed_keeps_messages_given_as_dicts(rt: Runtime) -> None:
    class Fails:
        def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
            raise StepFailed("half done", messages=[{"role": "assistant", "content": "looked"}])

    agent = Fails()
    agent.factory = lambda config: agent  # type: ignore[attr-defined]
    group, run = _one_run(rt, agent)
    assert (run.status, run.error) == (RunStatus.FAILED, "half done")
    kept = rt.list_messages(group.sleeptime_agent_ids[0])
    assert [m.text() for m in kept][1:] == ["looked"]


def test_an_error_that_cannot_be_printed_fails_its_run_at_once(rt: Runtime) -> None:
    _, run = _one_run(rt, _Raises(_Unprintable()), run_timeout=600)
    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
    assert run.error == "_Unprintable: <unprintable _Unprintable object>"


def test_a_primary_agent_error_that_cannot_be_printed_fails_its_turn(rt: Runtime) -> None:
    rt.agents.register("odd", _Raises(_Unprintable()).factory)
    rt.agents.register("echo", Echo)
    group = rt.create_group(primary={"kind": "odd"}, sleeptime=[{"kind": "echo"}])
    with pytest.raises(PrimaryAgentError, match="<unprintable _Unprintable object>"):
        rt.step(group.id, [user("hi")])
    with pytest.raises(PrimaryAgentError, match="<unprintable _Unprintable object>"):
        rt.step(group.id, [user("again")])  # the group goes on taking turns
    assert rt.get_group(group.id).turns == 2  # each recorded, as a failed turn is


class _Blocks:
    """A sleeptime agent whose steps each hold their thread until the test lets them go."""

    def __init__(self) -> None:
        self.entered: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.release = threading.Event()

    def factory(self, config: dict[str, Any]) -> _Blocks:
        return self

    def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
        self.entered.put(context.run_id)
        assert self.release.wait(30), "never released"
        return [MessageCreate(role="assistant", content="done late")]


def test_a_run_waiting_for_a_step_thread_is_created_and_its_time_not_spent(
    db_url: str,
) -> None:
    """One step thread: the second group's run waits for it, `created`, and its
    run_timeout counts only once a thread takes it."""
    with Runtime.start(db_url, workers=1) as rt:
        blocks = _Blocks()
        rt.agents.register("echo", Echo)
        rt.agents.register("blocks", blocks.factory)
        first = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "blocks"}])
        second = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "echo"}], run_timeout=0.5
        )
        (holding,) = rt.step(first.id, [user("hold the thread")]).run_ids
        assert blocks.entered.get(timeout=10) == holding
        (waiting,) = rt.step(second.id, [user("wait for it")]).run_ids
        # Longer than the waiting run's timeout: it has not started, so none of it counts.
        assert not wait_until(lambda: rt.get_run(waiting).status.terminal, timeout=1.0)
        assert rt.get_run(waiting).status is RunStatus.CREATED
        blocks.release.set()
        held, waited = rt.wait_for_runs([holding, waiting], timeout=30)
        assert held.status is waited.status is RunStatus.COMPLETED
        events = [e.status for e in rt.run_events(waiting)]
        assert events == ["created", "running", "completed"]


def test_a_timed_out_run_keeps_its_transcript_and_what_its_agent_said_late(rt: Runtime) -> None:
    blocks = _Blocks()
    rt.agents.register("echo", Echo)
    rt.agents.register("blocks", blocks.factory)
    group = rt.create_group(
        primary={"kind": "echo"}, sleeptime=[{"kind": "blocks"}], run_timeout=0.3
    )
    (run_id,) = rt.step(group.id, [user("my favorite color is teal")]).run_ids
    (run,) = rt.wait_for_runs([run_id], timeout=30)
    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.TIMEOUT)
    blocks.release.set()  # the agent returns after all, past its run's end
    agent_id = group.sleeptime_agent_ids[0]
    assert wait_until(lambda: len(rt.list_messages(agent_id)) == 2, timeout=10)
    transcript, late = rt.list_messages(agent_id)
    assert "my favorite color is teal" in transcript.text() and late.text() == "done late"
    assert transcript.run_id == late.run_id == run_id
    assert rt.get_run(run_id).stop_reason is StopReason.TIMEOUT  # the late result changed nothing


def test_memory_refuses_edits_once_the_step_returned(rt: Runtime) -> None:
    """A thread the agent leaves behind cannot edit memory for a run that ended."""
    go, results = threading.Event(), queue.SimpleQueue[ToolResult]()

    class LeavesAThread:
        def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
            def later() -> None:
                go.wait(30)
                results.put(context.memory.memory_insert("human", "written after the end"))

            threading.Thread(target=later, daemon=True).start()
            return [MessageCreate(role="assistant", content="done")]

    agent = LeavesAThread()
    agent.factory = lambda config: agent  # type: ignore[attr-defined]
    rt.agents.register("echo", Echo)
    rt.agents.register("leaves", agent.factory)  # type: ignore[attr-defined]
    group = rt.create_group(
        primary={"kind": "echo"}, sleeptime=[{"kind": "leaves"}], blocks={"human": "likes tea"}
    )
    (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    assert run.status is RunStatus.COMPLETED
    go.set()
    refused = results.get(timeout=10)
    assert not refused.ok and "the step has returned" in refused.message
    assert rt.get_blocks(group.sleeptime_agent_ids[0])["human"].value == "likes tea"


def test_a_step_queued_by_an_agent_actor_that_crashed_never_runs(db_url: str) -> None:
    """The agent's actor crashes while its run's step waits for a pool thread: that step
    never runs (the new incarnation runs the run, under its run_timeout), so the run
    cannot end `completed` behind a timeout nobody watches, overlapping the next run."""
    hog, victim = _Blocks(), _Blocks()
    kinds = {"hog": hog.factory, "victim": victim.factory, "echo": Echo}
    with Runtime.start(db_url, kinds=kinds) as rt:  # type: ignore[arg-type]
        hogging = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "hog"}])
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "victim"}], run_timeout=1.0
        )
    agent = f"agent:{group.sleeptime_agent_ids[0]}"
    # The agent's actor crashes once, on its third message: its first two are the
    # tracker's answer to its start (Adopted) and its first run (AssignRun).
    chaos = Chaos(crash_rate=1.0, only=agent, crash_limit=1, after=2)
    with Runtime.start(db_url, kinds=kinds, workers=1, chaos=chaos) as rt:  # type: ignore[arg-type]
        rt.step(hogging.id, [user("hold the only thread")])
        hog.entered.get(timeout=10)
        (first,) = rt.step(group.id, [user("one")]).run_ids  # its step waits for the thread
        (second,) = rt.step(group.id, [user("two")]).run_ids  # the crash
        assert wait_until(lambda: rt.stats()["restarts"] == 1)
        hog.release.set()
        assert victim.entered.get(timeout=10) == first  # the new incarnation's step
        (ended,) = rt.wait_for_runs([first], timeout=30)
        assert (ended.status, ended.stop_reason, ended.attempt) == (
            RunStatus.FAILED,
            StopReason.TIMEOUT,
            1,
        )
        victim.release.set()
        rt.wait_for_runs([second], timeout=30)
        assert victim.entered.get(timeout=10) == second
        report = rt.check_invariants()
        assert report.ok, report.violations
        assert rt.get_run(first).status is RunStatus.FAILED  # nothing ran it again


def test_an_edit_queued_behind_its_runs_cancel_is_refused_by_the_store(rt: Runtime) -> None:
    """An edit whose cancel check passed just before the run was cancelled reaches the
    writer after the cancel: the store, in order with the run's status, refuses it."""
    blocks = _Blocks()
    rt.agents.register("echo", Echo)
    rt.agents.register("blocks", blocks.factory)
    group = rt.create_group(
        primary={"kind": "echo"}, sleeptime=[{"kind": "blocks"}], blocks={"human": "likes tea"}
    )
    (run_id,) = rt.step(group.id, [user("hi")]).run_ids
    assert blocks.entered.get(timeout=10) == run_id
    rt.cancel_run(run_id)
    agent_id = group.sleeptime_agent_ids[0]
    # As the run's own memory, with its cancel check already passed.
    memory = Memory(lambda: rt._store.get_blocks(agent_id), rt._store, run_id=run_id)
    late = memory.memory_insert("human", "written after the cancel")
    assert not late.ok and late.message == "the run is cancelled: no more memory edits"
    assert rt.get_blocks(agent_id)["human"].value == "likes tea"
    blocks.release.set()


def test_a_deadline_that_fires_at_once_still_ends_its_run(db_url: str) -> None:
    """A run_timeout so short that the deadline fires as the step's thread asks for the
    start: the start reaches the tracker first, so the deadline's finish ends the attempt
    it began (the finish arriving first was refused, and the run then stayed `running`).
    Threads switch as often as they can, to meet the race."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with Runtime.start(db_url, workers=1) as rt:
            groups = [
                rt.create_group(
                    primary={"kind": "scripted"},
                    sleeptime=[{"kind": "memory"}, {"kind": "memory"}],
                    run_timeout=1e-6,
                )
                for _ in range(4)
            ]
            run_ids: list[str] = []

            def turns(group_id: str) -> None:
                for n in range(15):
                    run_ids.extend(rt.step(group_id, [user(f"my number is {n}")]).run_ids)

            threads = [threading.Thread(target=turns, args=(g.id,)) for g in groups]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            runs = rt.wait_for_runs(run_ids, timeout=60)
            assert all(run.status.terminal for run in runs)
            report = rt.check_invariants()
            assert report.ok, report.violations[:3]
    finally:
        sys.setswitchinterval(switch)


class _Records:
    """A sleeptime agent that keeps the transcript each run was given."""

    def __init__(self) -> None:
        self.given: dict[str, str] = {}

    def factory(self, config: dict[str, Any]) -> _Records:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        assert context.run_id is not None
        self.given[context.run_id] = messages[0].text()
        return []


def test_settings_changed_while_a_run_waits_for_a_thread_apply_to_it(db_url: str) -> None:
    """The preamble, the transcript limit and run_timeout apply to runs that start after
    the change: also to a run handed to the step pool before it, still waiting for a
    thread (its settings are read as the thread takes it)."""
    with Runtime.start(db_url, workers=1) as rt:
        blocks, records = _Blocks(), _Records()
        rt.agents.register("echo", Echo)
        rt.agents.register("blocks", blocks.factory)
        rt.agents.register("records", records.factory)
        first = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "blocks"}])
        second = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "records"}], preamble="OLD PREAMBLE"
        )
        (holding,) = rt.step(first.id, [user("hold the thread")]).run_ids
        assert blocks.entered.get(timeout=10) == holding
        (waiting,) = rt.step(second.id, [user("wait for it")]).run_ids
        rt.update_group(second.id, preamble="NEW PREAMBLE", transcript_max_messages=1)
        blocks.release.set()
        held, waited = rt.wait_for_runs([holding, waiting], timeout=30)
        assert held.status is waited.status is RunStatus.COMPLETED
        assert "NEW PREAMBLE" in records.given[waiting]
        assert "OLD PREAMBLE" not in records.given[waiting]
        assert "[1 earlier message(s) of this conversation were left out]" in records.given[waiting]


class _SaysThenFails:
    """A primary agent with no `stream` of its own: it fails after saying something."""

    def factory(self, config: dict[str, Any]) -> _SaysThenFails:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        raise StepFailed(
            "the model died after answering",
            messages=[{"role": "assistant", "content": "the answer is 42"}],
        )


def test_a_streamed_turn_keeps_what_a_failed_step_said_as_a_stepped_one_does(
    rt: Runtime,
) -> None:
    rt.agents.register("says-then-fails", _SaysThenFails().factory)
    rt.agents.register("echo", Echo)
    results = {}
    for mode in ("step", "stream"):
        group = rt.create_group(primary={"kind": "says-then-fails"}, sleeptime=[{"kind": "echo"}])
        yielded: list[str] = []
        with pytest.raises(PrimaryAgentError) as raised:
            if mode == "step":
                rt.step(group.id, [user("question")])
            else:
                for message in rt.stream(group.id, [user("question")]):
                    yielded.append(message.text())
        result = raised.value.result
        stored = [(m.role, m.text()) for m in rt.list_messages(group.primary_agent_id)]
        assert stored == [("user", "question"), ("assistant", "the answer is 42")], mode
        assert [m.text() for m in result.messages] == ["the answer is 42"], mode
        assert result.fired and len(result.run_ids) == 1, mode
        results[mode] = rt.wait_for_runs(result.run_ids, timeout=30)[0].status
        if mode == "stream":
            assert yielded == ["the answer is 42"]
    assert results == {"step": RunStatus.COMPLETED, "stream": RunStatus.COMPLETED}


def test_stop_waits_for_hung_primary_steps_together_and_for_a_bounded_time(tmp_path: Any) -> None:
    """Primary steps that never return hold up `stop` for at most the turns' bound (5 s
    with a short drain time), for all of them together: it used to wait 60 s for each,
    one group after the other."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    class Hangs:
        def __init__(self, config: dict[str, Any]) -> None:
            pass

        def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
            entered.release()
            release.wait(120)
            return []

    rt = Runtime.start(f"sqlite:///{tmp_path / 'hung.db'}", kinds={"hangs": Hangs})
    try:
        for _ in range(3):
            group = rt.create_group(primary={"kind": "hangs"}, sleeptime=[{"kind": "memory"}])
            with pytest.raises(TurnTimeout):
                rt.step(group.id, [user("hi")], timeout=0.2)
        for _ in range(3):
            assert entered.acquire(timeout=10)
        began = time.monotonic()
        rt.stop(drain_timeout=1)
        assert time.monotonic() - began < 15  # 5 s for all three, where it was 180
        assert rt.stopped
    finally:
        release.set()
        rt.stop()


def test_a_slow_agent_factory_holds_up_neither_the_turn_nor_other_agents(db_url: str) -> None:
    """An agent's factory is user code: it runs on the step's pool thread, not where the
    agents' actors run (a few threads all of them share) nor on the caller's thread. Six
    agents whose factory blocks (more than those shared threads) leave every other agent's
    runs going, and each turn answers at once; once let go, their runs complete, and the
    agent built is kept for the next run."""
    gate = threading.Event()
    built: list[str] = []

    def slow(config: dict[str, Any]) -> Echo:
        if threading.current_thread() is not threading.main_thread():  # (not create_group's)
            built.append(threading.current_thread().name)
            assert gate.wait(30), "the test never let the factory go"
        return Echo(config)

    with Runtime.start(db_url, kinds={"slow": slow, "echo": Echo}) as rt:
        slow_groups = [
            rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "slow"}], frequency=1)
            for _ in range(6)
        ]
        fast = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "echo"}], frequency=1)
        waiting: list[str] = []

        def turns() -> None:  # off the main thread, with no timeout: the caller runs them
            for group in slow_groups:
                waiting.extend(rt.step(group.id, [user("hi")]).run_ids)

        caller = threading.Thread(target=turns)
        caller.start()
        caller.join(10)
        assert not caller.is_alive() and len(waiting) == 6  # no turn waited for a factory
        assert wait_until(lambda: len(built) == 6)  # six factories blocked now
        for n in range(3):
            done = rt.wait_for_runs(rt.step(fast.id, [user(f"turn {n}")], timeout=10).run_ids, 10)
            assert [r.status for r in done] == [RunStatus.COMPLETED]
        assert {rt.get_run(run_id).status for run_id in waiting} == {RunStatus.RUNNING}
        gate.set()
        assert {r.status for r in rt.wait_for_runs(waiting, timeout=30)} == {RunStatus.COMPLETED}
        again = rt.step(slow_groups[0].id, [user("again")]).run_ids
        assert [r.status for r in rt.wait_for_runs(again, timeout=30)] == [RunStatus.COMPLETED]
    assert len(built) == 6  # each agent built once, kept for its next run
    assert all(name.startswith("sleeptime-step") for name in built)
