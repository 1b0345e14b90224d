"""Runs (SPEC 6): lifecycle, events, failures, cancellation, timeouts, one at a time."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    AgentContext,
    AsyncRuntime,
    RunNotFound,
    RunsTimeout,
    Runtime,
    StepFailed,
    StoreUnavailable,
    render_transcript,
)
from actors._protocol import EndedRuns
from messages import MessageCreate, RunStatus, StopReason
from messages._runs import is_legal_history
from persistence import Store, Transition
from tests.agents import Echo, Recorder, StepLimited, user, wait_until


def _group(rt: Runtime, *recorders: Recorder, **settings: object) -> str:
    rt.agents.register("echo", Echo)
    kinds = []
    for recorder in recorders:
        kind = f"recorder-{id(recorder)}"
        rt.agents.register(kind, recorder.factory)
        kinds.append({"kind": kind})
    return rt.create_group(primary={"kind": "echo"}, sleeptime=kinds, **settings).id  # type: ignore[arg-type]


def test_run_is_created_before_work_and_every_change_is_an_event(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    result = rt.step(group_id, [user("hi")])
    recorder.wait_started()
    run = rt.get_run(result.run_ids[0])
    assert run.status is RunStatus.RUNNING and run.started_at is not None
    gate.set()
    (run,) = rt.wait_for_runs(result.run_ids, timeout=30)
    assert (run.status, run.stop_reason, run.attempt, run.error) == (
        RunStatus.COMPLETED,
        StopReason.END_TURN,
        1,
        None,
    )
    assert run.created_at <= run.started_at <= run.completed_at  # type: ignore[operator]
    events = rt.run_events(run.id)
    assert [e.status for e in events] == ["created", "running", "completed"]
    assert all(e.attempt == 1 for e in events)
    assert is_legal_history([e.status for e in events])


def test_failing_agent_fails_its_run_and_the_next_run_works(rt: Runtime) -> None:
    recorder = Recorder(fail_on={0})
    group_id = _group(rt, recorder)
    first = rt.step(group_id, [user("one")]).run_ids
    second = rt.step(group_id, [user("two")]).run_ids
    failed, completed = rt.wait_for_runs(first + second, timeout=30)
    assert failed.status is RunStatus.FAILED and failed.stop_reason is StopReason.ERROR
    assert failed.error == "RuntimeError: step 0 fails on purpose"
    assert failed.attempt == 1  # an agent's exception is not retried
    assert completed.status is RunStatus.COMPLETED
    # What the failed run was given is still in the agent's history.
    history = rt.list_messages(rt.get_run(failed.id).agent_id)
    assert [m.run_id for m in history].count(failed.id) == 1


def test_cancelled_running_run_stays_cancelled_when_its_agent_finishes(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate, ignore_cancel=True)
    group_id = _group(rt, recorder)
    run_id = rt.step(group_id, [user("hi")]).run_ids[0]
    recorder.wait_started()
    cancelled = rt.cancel_run(run_id)
    assert cancelled.status is RunStatus.CANCELLED
    assert cancelled.stop_reason is StopReason.CANCELLED
    gate.set()  # the agent now finishes as if nothing happened
    rt.step(group_id, [user("next")])  # a later run proves the first one's step returned
    later = rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group_id)], timeout=30)
    assert later[0].status is RunStatus.CANCELLED
    assert later[1].status is RunStatus.COMPLETED
    assert [e.status for e in rt.run_events(run_id)] == ["created", "running", "cancelled"]


def test_cancel_flag_reaches_the_agent(rt: Runtime) -> None:
    entered, seen = threading.Semaphore(0), threading.Event()

    class Watcher:
        def __init__(self, config: dict[str, object]) -> None:
            pass

        def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
            entered.release()
            if not seen.is_set() and context.wait(30):
                seen.set()
                return [MessageCreate(role="assistant", content="stopping as asked")]
            return []

    rt.agents.register("echo", Echo)
    rt.agents.register("watcher", Watcher)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "watcher"}])
    run_id = rt.step(group.id, [user("hi")]).run_ids[0]
    assert entered.acquire(timeout=10)
    assert rt.cancel_run(run_id).status is RunStatus.CANCELLED
    assert seen.wait(10)
    # The next run starts only after the cancelled step returned; what that step said is
    # kept in the agent's history, and the cancelled status is not moved.
    agent_id = group.sleeptime_agent_ids[0]
    rt.wait_for_runs(rt.step(group.id, [user("again")]).run_ids, timeout=30)
    said = [m.text() for m in rt.list_messages(agent_id) if m.run_id == run_id]
    assert "stopping as asked" in said
    assert rt.get_run(run_id).status is RunStatus.CANCELLED


def test_cancel_created_run_at_once_and_terminal_run_unchanged(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    first = rt.step(group_id, [user("one")]).run_ids[0]
    recorder.wait_started()
    queued = rt.step(group_id, [user("two")]).run_ids[0]
    assert rt.get_run(queued).status is RunStatus.CREATED
    assert rt.cancel_run(queued).status is RunStatus.CANCELLED
    gate.set()
    done = rt.wait_for_runs([first], timeout=30)[0]
    again = rt.cancel_run(first)
    assert again == done and again.status is RunStatus.COMPLETED
    assert len(recorder.transcripts) == 1  # the cancelled run never started
    assert [e.status for e in rt.run_events(queued)] == ["created", "cancelled"]


def test_runs_of_one_agent_never_overlap_and_run_in_creation_order(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    run_ids = []
    for turn in range(5):
        run_ids += rt.step(group_id, [user(f"turn {turn}")]).run_ids
    recorder.wait_started()
    gate.set()
    runs = rt.wait_for_runs(run_ids, timeout=30)
    assert all(r.status is RunStatus.COMPLETED for r in runs)
    assert recorder.most_active == 1
    assert recorder.run_ids == run_ids
    for before, after in itertools.pairwise(runs):
        assert before.completed_at <= after.started_at  # type: ignore[operator]


def test_several_sleeptime_agents_get_one_run_each_in_group_order(rt: Runtime) -> None:
    recorders = [Recorder(), Recorder(), Recorder()]
    group_id = _group(rt, *recorders, frequency=2)
    group = rt.get_group(group_id)
    all_runs = []
    for turn in range(5):
        result = rt.step(group_id, [user(f"turn {turn}")])
        assert len(result.run_ids) == (3 if result.fired else 0)
        runs = rt.wait_for_runs(result.run_ids, timeout=30)
        if result.fired:
            assert [r.agent_id for r in runs] == group.sleeptime_agent_ids
            assert len({(r.window_first_seq, r.window_last_seq) for r in runs}) == 1
        all_runs += runs
    assert len(all_runs) == 9
    assert all(len(r.transcripts) == 3 for r in recorders)
    assert recorders[0].transcripts == recorders[2].transcripts


def test_run_timeout_fails_a_slow_run_and_the_next_one_starts(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate, ignore_cancel=True)
    group_id = _group(rt, recorder, run_timeout=0.3)
    slow = rt.step(group_id, [user("slow")]).run_ids[0]
    recorder.wait_started()
    (timed_out,) = rt.wait_for_runs([slow], timeout=30)
    assert timed_out.status is RunStatus.FAILED
    assert timed_out.stop_reason is StopReason.TIMEOUT
    assert "run_timeout of 0.3s" in (timed_out.error or "")
    # The hung step still holds its thread; the next run starts anyway.
    gate.clear()
    nxt = rt.step(group_id, [user("next")]).run_ids[0]
    recorder.wait_started()
    gate.set()
    assert rt.wait_for_runs([nxt], timeout=30)[0].status is RunStatus.COMPLETED
    assert [e.status for e in rt.run_events(slow)] == ["created", "running", "failed"]


def test_a_run_whose_start_commit_outlasts_its_timeout_fails_without_stepping(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent hands a run's step to the pool before the tracker decides; if the start's
    commit is not known by the run's deadline, the agent gives the run up without knowing
    its attempt (the tracker ends the attempt its request started), and the step, once
    told, never runs."""
    released = threading.Event()
    original = Store.apply_transition

    def slow_start(
        store: Store, change: Transition, after: Sequence[Future[Any]] = ()
    ) -> Future[datetime | None]:
        committed = original(store, change, after)
        if change.new is not RunStatus.RUNNING:
            return committed
        late: Future[datetime | None] = Future()

        def tell_late() -> None:
            released.wait(30)
            error = committed.exception()
            late.set_result(None) if error is None else late.set_exception(error)

        threading.Thread(target=tell_late, daemon=True).start()
        return late

    monkeypatch.setattr(Store, "apply_transition", slow_start)
    recorder = Recorder()
    group_id = _group(rt, recorder, run_timeout=0.3)
    try:
        run_id = rt.step(group_id, [user("slow start")]).run_ids[0]
        (ended,) = rt.wait_for_runs([run_id], timeout=30)
    finally:
        released.set()
    assert (ended.status, ended.stop_reason, ended.attempt) == (
        RunStatus.FAILED,
        StopReason.TIMEOUT,
        1,
    )
    assert [e.status for e in rt.run_events(run_id)] == ["created", "running", "failed"]
    monkeypatch.setattr(Store, "apply_transition", original)
    after = rt.step(group_id, [user("next")]).run_ids[0]  # the agent goes on
    assert rt.wait_for_runs([after], timeout=30)[0].status is RunStatus.COMPLETED
    assert recorder.run_ids == [after]  # the step of the run given up never ran
    assert rt.check_invariants().ok


def test_max_steps_completes_with_its_stop_reason(rt: Runtime) -> None:
    rt.agents.register("echo", Echo)
    rt.agents.register("limited", StepLimited)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "limited"}])
    (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    assert (run.status, run.stop_reason) == (RunStatus.COMPLETED, StopReason.MAX_STEPS)


def test_wait_for_runs_names_the_runs_still_open(rt: Runtime) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    run_id = rt.step(group_id, [user("hi")]).run_ids[0]
    with pytest.raises(RunsTimeout) as caught:
        rt.wait_for_runs([run_id], timeout=0.05)
    assert caught.value.open_run_ids == [run_id]
    assert run_id in str(caught.value)
    gate.set()
    assert rt.wait_for_runs([run_id, run_id], timeout=30)[1].id == run_id


def test_a_wait_with_no_time_left_names_only_the_runs_still_open(rt: Runtime) -> None:
    """`timeout=0` (or any timeout shorter than the tracker's answer): the runs ended by
    then are returned, the open ones named, an unknown one not found. It named every run
    asked, ended or unknown, whenever the tracker had not answered yet."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    first = rt.step(group_id, [user("one")]).run_ids[0]
    gate.set()
    rt.wait_for_runs([first], timeout=30)
    for _ in range(20):  # the tracker rarely answers within no time at all
        assert [r.id for r in rt.wait_for_runs([first, first], timeout=0)] == [first, first]
    gate.clear()
    second = rt.step(group_id, [user("two")]).run_ids[0]
    assert recorder.started.acquire(timeout=30)
    assert recorder.started.acquire(timeout=30)
    for _ in range(20):
        with pytest.raises(RunsTimeout) as caught:
            rt.wait_for_runs([first, second], timeout=0)
        assert caught.value.open_run_ids == [second]
        with pytest.raises(RunNotFound):
            rt.wait_for_runs([first, "run-does-not-exist"], timeout=0)
    gate.set()
    assert [r.status for r in rt.wait_for_runs([first, second], timeout=30)] == [
        RunStatus.COMPLETED,
        RunStatus.COMPLETED,
    ]


def test_a_wait_whose_time_ran_out_while_the_store_is_away_still_times_out(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store cannot say which runs are open: RunsTimeout names those not known to have
    ended, as a timeout does, not the store's outage."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    group_id = _group(rt, recorder)
    run_id = rt.step(group_id, [user("one")]).run_ids[0]
    assert recorder.started.acquire(timeout=30)

    def away(run_ids: list[str]) -> list[Any]:
        raise StoreUnavailable("sqlite:///gone.db", "the disk went away")

    monkeypatch.setattr(rt, "_stored_runs", away)
    with pytest.raises(RunsTimeout) as caught:
        rt.wait_for_runs([run_id], timeout=0.05)
    assert caught.value.open_run_ids == [run_id]
    monkeypatch.undo()
    gate.set()
    rt.wait_for_runs([run_id], timeout=30)


def test_an_awaited_wait_with_no_time_left_returns_the_runs_ended(rt: Runtime) -> None:
    group_id = _group(rt, Recorder())
    run_id = rt.step(group_id, [user("one")]).run_ids[0]
    rt.wait_for_runs([run_id], timeout=30)

    async def waits() -> list[list[str]]:
        api = AsyncRuntime.wrap(rt)
        return [[r.id for r in await api.wait_for_runs([run_id], timeout=0)] for _ in range(20)]

    assert asyncio.run(waits()) == [[run_id]] * 20


def test_a_wait_returns_each_run_exactly_as_stored_ended_before_or_during_it(
    rt: Runtime,
) -> None:
    """Runs that ended before the wait (the tracker read them, terminal, from the store)
    and runs that end during it (read once they ended), in the order asked, duplicates
    kept, failed ones with their error: each equal to `get_run`'s, from both APIs."""
    gate = threading.Event()
    recorder = Recorder(gate=gate, fail_on={1})
    group_id = _group(rt, recorder)
    gate.set()
    ended = [rt.step(group_id, [user(f"early {i}")]).run_ids[0] for i in range(3)]
    rt.wait_for_runs(ended, timeout=30)
    gate.clear()
    later = rt.step(group_id, [user("late")]).run_ids[0]
    assert recorder.started.acquire(timeout=30)
    asked = [later, *ended, ended[0], later]
    waiting = threading.Thread(target=lambda: seen.append(rt.wait_for_runs(asked, timeout=30)))
    seen: list[list[Any]] = []
    waiting.start()
    gate.set()
    waiting.join(30)
    assert seen and seen[0] == [rt.get_run(run_id) for run_id in asked]
    assert [r.status for r in seen[0][1:4]] == [
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.COMPLETED,
    ]
    assert seen[0][2].error

    async def waits() -> list[Any]:
        return await AsyncRuntime.wrap(rt).wait_for_runs(asked, timeout=30)

    assert asyncio.run(waits()) == seen[0]


def test_list_runs_filters_by_agent_group_and_status(rt: Runtime) -> None:
    recorder = Recorder(fail_on={1})
    group_id = _group(rt, recorder)
    other = _group(rt, Recorder())
    ids = [rt.step(group_id, [user(f"t{i}")]).run_ids[0] for i in range(3)]
    rt.wait_for_runs(ids + rt.step(other, [user("x")]).run_ids, timeout=30)
    agent_id = rt.get_group(group_id).sleeptime_agent_ids[0]
    assert [r.id for r in rt.list_runs(agent_id=agent_id)] == ids
    assert [r.id for r in rt.list_runs(group_id=group_id, statuses=["failed"])] == [ids[1]]
    assert len(rt.list_runs(statuses=[RunStatus.COMPLETED])) == 3
    assert len(rt.list_runs()) == 4
    # count_runs counts what list_runs lists, without loading it
    assert rt.count_runs(agent_id=agent_id) == 3
    assert rt.count_runs(group_id=group_id, statuses=["failed"]) == 1
    assert rt.count_runs(statuses=[RunStatus.COMPLETED]) == 3
    assert rt.count_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING]) == 0
    assert rt.count_runs() == 4


class _FailsAfterATool:
    """Calls one tool, then fails the way an LLM agent fails on a timed-out request."""

    def __init__(self, config: dict[str, object]) -> None:
        pass

    def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
        done = [
            MessageCreate(role="assistant", content="looking"),
            MessageCreate(role="tool", tool_call_id="call-1", content="found"),
        ]
        raise StepFailed(
            "the model server did not answer in 1s", stop_reason=StopReason.TIMEOUT, messages=done
        )


def test_step_failed_keeps_what_was_done_and_its_stop_reason(rt: Runtime) -> None:
    rt.agents.register("echo", Echo)
    rt.agents.register("fails-after-a-tool", _FailsAfterATool)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "fails-after-a-tool"}])
    (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.TIMEOUT)
    assert run.error == "the model server did not answer in 1s"
    history = rt.list_messages(group.sleeptime_agent_ids[0])
    assert [m.role for m in history] == ["user", "assistant", "tool"]
    assert {m.run_id for m in history} == {run.id}


@pytest.mark.parametrize("tail", [512, 3])
def test_a_handed_over_window_is_the_stored_window(
    rt: Runtime, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run gets its window from the group that committed it, or (when the group kept
    too few messages) from the store: the transcript is the same either way."""
    monkeypatch.setattr("actors.group.MAX_TAIL_MESSAGES", tail)
    recorder = Recorder()
    group_id = _group(rt, recorder, frequency=2)
    group = rt.get_group(group_id)
    run_ids = []
    for i in range(7):
        said = [user(f"message {i}.{j}") for j in range(1 + i % 3)]
        if i % 2:
            run_ids += rt.record_turn(
                group_id, [*said, MessageCreate(role="assistant", content="ok")]
            ).run_ids
        else:
            run_ids += rt.step(group_id, said).run_ids
    runs = rt.wait_for_runs(run_ids, timeout=30)
    assert len(runs) == 4 and all(r.status is RunStatus.COMPLETED for r in runs)  # 1, 3, 5, 7
    stored = {m.id: m for m in rt.list_messages(group.primary_agent_id)}
    for run, seen in zip(runs, recorder.transcripts, strict=True):
        window = [
            m for m in stored.values() if run.window_first_seq <= m.sequence <= run.window_last_seq
        ]
        assert seen == render_transcript(window, group.preamble, group.transcript_max_messages)


def test_a_cancel_asked_before_a_queued_memory_edit_is_stamped_after_it(rt: Runtime) -> None:
    """Times are the writer's, in commit order: a run's memory edit queued before its
    cancel (so committed before it) never carries a later time than the `cancelled`
    event, even when the cancel was asked for before the writer took the edit. (The
    tracker used to stamp the change as it queued it: the edit, timed as the writer
    planned it, came out after its run had ended.)"""
    gate = threading.Event()
    recorder = Recorder(gate=gate, ignore_cancel=True)
    group_id = _group(rt, recorder)
    run_id = rt.step(group_id, [user("hi")]).run_ids[0]
    recorder.wait_started()
    run = rt.get_run(run_id)
    block = rt.get_blocks(run.agent_id)["human"]
    store = rt._store
    held, release = threading.Event(), threading.Event()

    def hold(connection: object) -> None:
        held.set()
        release.wait(30)

    store.committer.submit(hold)  # the writer takes nothing more until released
    try:
        assert held.wait(10)
        edited: list[object] = []
        edit = threading.Thread(
            target=lambda: edited.append(
                store.edit_block(block.id, lambda b: b.value + " edited", run_id=run_id)
            )
        )
        edit.start()
        assert wait_until(lambda: store.committer.queued >= 1)
        cancelled: list[object] = []
        cancel = threading.Thread(target=lambda: cancelled.append(rt.cancel_run(run_id)))
        cancel.start()
        assert wait_until(lambda: store.committer.queued >= 2)
    finally:
        release.set()
    edit.join(30)
    cancel.join(30)
    gate.set()
    assert edited and cancelled
    (version,) = [v for v in rt.block_history(run.agent_id, "human") if v.run_id == run_id]
    (event,) = [e for e in rt.run_events(run_id) if e.status == "cancelled"]
    assert version.at <= event.at
    assert rt.get_run(run_id).completed_at == event.at


@settings(max_examples=25, deadline=None)
@given(writers=st.integers(1, 4), ends=st.integers(1, 60))
def test_ended_runs_gathered_from_many_threads_reach_the_tracker_each_once(
    writers: int, ends: int
) -> None:
    """`EndedRuns` (the writer's ends, one message for a burst): with ends added from
    several threads while the tracker takes them as told, every run is taken exactly once,
    none is left behind, and a tell is made only when the gathering was empty."""
    ended = EndedRuns()
    told: queue.SimpleQueue[EndedRuns | None] = queue.SimpleQueue()
    taken: list[str] = []
    tells, counting = [0], threading.Lock()

    def tracker() -> None:
        while (message := told.get()) is not None:
            taken.extend(message.take())

    def writer(number: int) -> None:
        for i in range(ends):
            if ended.add(f"run-{number}-{i}"):
                with counting:
                    tells[0] += 1
                told.put(ended)

    taking = threading.Thread(target=tracker)
    taking.start()
    adding = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in adding:
        thread.start()
    for thread in adding:
        thread.join(30)
    told.put(None)
    taking.join(30)
    wanted = sorted(f"run-{n}-{i}" for n in range(writers) for i in range(ends))
    assert sorted(taken) == wanted
    assert ended.take() == []
    assert 1 <= tells[0] <= writers * ends
