"""Turns (SPEC 7): step, stream and record_turn, atomic and counted once per call."""

from __future__ import annotations

import threading

import pytest

from actors import AgentContext, PrimaryAgentError, Runtime, RuntimeStopped
from messages import MessageCreate, RunStatus
from tests.agents import Echo, Recorder, Silent, Streamer, user


@pytest.fixture
def recorder(rt: Runtime) -> Recorder:
    agent = Recorder()
    rt.agents.register("recorder", agent.factory)
    rt.agents.register("echo", Echo)
    rt.agents.register("silent", Silent)
    rt.agents.register("streamer", Streamer)
    return agent


def test_step_stores_input_and_output_in_order(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(
        primary={"kind": "echo", "config": {"replies": 2}}, sleeptime=[{"kind": "recorder"}]
    )
    result = rt.step(group.id, [user("hello")])
    history = rt.list_messages(group.primary_agent_id)
    assert [m.role for m in history] == ["user", "assistant", "assistant"]
    assert [m.sequence for m in history] == [1, 2, 3]
    assert [m.id for m in history[1:]] == [m.id for m in result.messages]
    assert all(m.turn == 1 for m in history)
    assert rt.get_group(group.id).cursor == history[-1].id


def test_stream_yields_messages_with_ids_and_completes_the_turn(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 3}}, sleeptime=[{"kind": "recorder"}]
    )
    stream = rt.stream(group.id, [user("go")])
    seen = list(stream)
    assert [m.text() for m in seen] == ["part 0", "part 1", "part 2"]
    assert all(m.id and m.sequence for m in seen)
    result = stream.result
    assert result.fired and len(result.run_ids) == 1
    assert [m.id for m in rt.list_messages(group.primary_agent_id)[1:]] == [m.id for m in seen]


def test_stream_consumer_stopping_early_still_completes_the_turn(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 5}}, sleeptime=[{"kind": "recorder"}]
    )
    stream = rt.stream(group.id, [user("go")])
    first = next(stream)
    stream.close()
    assert list(stream) == []
    result = stream.result  # the turn ran to its end regardless
    assert len(result.messages) == 5 and result.messages[0].id == first.id
    runs = rt.wait_for_runs(result.run_ids, timeout=30)
    assert runs[0].status is RunStatus.COMPLETED
    assert "part 4" in recorder.transcripts[0]
    assert rt.get_group(group.id).turns == 1


def test_abandoned_stream_never_blocks_the_group(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 50}},
        sleeptime=[{"kind": "recorder"}],
        frequency=0,
    )
    rt.stream(group.id, [user("nobody reads this")])  # never iterated
    assert rt.step(group.id, [user("next")]).turn == 2


def test_primary_failure_records_the_turn_and_reaches_the_caller(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 2, "fail": True}},
        sleeptime=[{"kind": "recorder"}],
        frequency=1,
    )
    with pytest.raises(PrimaryAgentError, match="broke mid-stream") as caught:
        rt.step(group.id, [user("go")])
    # step() raised before returning any message: the input is stored, the turn counted,
    # and the fire consumed without a run.
    result = caught.value.result
    assert (result.fired, result.run_ids, result.messages) == (True, [], [])
    assert rt.get_group(group.id).turns == 1
    assert [m.role for m in rt.list_messages(group.primary_agent_id)] == ["user"]


def test_failed_stream_runs_sleeptime_on_what_was_produced(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 2, "fail": True}},
        sleeptime=[{"kind": "recorder"}],
        frequency=1,
    )
    stream = rt.stream(group.id, [user("go")])
    with pytest.raises(PrimaryAgentError, match="broke mid-stream") as caught:
        list(stream)
    result = caught.value.result
    assert result.fired and len(result.run_ids) == 1
    assert [m.text() for m in result.messages] == ["part 0", "part 1"]
    assert len(rt.list_messages(group.primary_agent_id)) == 3
    assert rt.wait_for_runs(result.run_ids, timeout=30)[0].status is RunStatus.COMPLETED
    assert recorder.transcripts[0].endswith("user: go\nassistant: part 0\nassistant: part 1")


def test_stream_failure_reaches_the_consumer_after_the_partial_output(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 2, "fail": True}},
        sleeptime=[{"kind": "recorder"}],
        frequency=2,
    )
    stream = rt.stream(group.id, [user("go")])
    assert next(stream).text() == "part 0"
    assert next(stream).text() == "part 1"
    with pytest.raises(PrimaryAgentError):
        next(stream)
    assert rt.get_group(group.id).counter == 0  # the failed turn was still counted


def test_firing_turn_without_output_consumes_the_fire(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(
        primary={"kind": "silent"}, sleeptime=[{"kind": "recorder"}], frequency=2
    )
    result = rt.step(group.id, [user("anyone?")])
    assert (result.fired, result.run_ids, result.messages) == (True, [], [])
    stored = rt.get_group(group.id)
    assert (stored.counter, stored.cursor, stored.turns) == (0, None, 1)
    assert rt.list_runs(group_id=group.id) == []


def test_record_turn_counts_one_turn_whatever_the_number_of_messages(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=3)
    messages = [
        user("question"),
        MessageCreate(role="assistant", content="thinking"),
        MessageCreate(role="assistant", content="answer part 1"),
        MessageCreate(role="assistant", content="answer part 2"),
    ]
    first = rt.record_turn(group.id, messages)
    assert first.fired and first.turn == 1 and len(first.messages) == 4
    second = rt.record_turn(group.id, messages)
    assert not second.fired and second.turn == 2
    assert rt.get_group(group.id).turns == 2
    rt.wait_for_runs(first.run_ids, timeout=30)
    assert recorder.transcripts[0].endswith(
        "user: question\nassistant: thinking\nassistant: answer part 1\nassistant: answer part 2"
    )


def test_record_turn_of_user_input_only_creates_no_run(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}])
    result = rt.record_turn(group.id, [user("just me")])
    assert result.fired and result.run_ids == []
    assert rt.get_group(group.id).cursor is None


def test_window_covers_every_turn_since_the_last_fire(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=3)
    run_ids = []
    for turn in range(1, 8):
        run_ids += rt.step(group.id, [user(f"u{turn}")]).run_ids
    runs = rt.wait_for_runs(run_ids, timeout=30)
    assert [(r.turn, r.window_first_seq, r.window_last_seq) for r in runs] == [
        (1, 1, 2),
        (4, 3, 8),
        (7, 9, 14),
    ]
    lines = recorder.transcripts[1].split("Messages:\n")[1].splitlines()
    assert lines == [
        "user: u2",
        "assistant: echo 0: u2",
        "user: u3",
        "assistant: echo 0: u3",
        "user: u4",
        "assistant: echo 0: u4",
    ]


def test_update_group_keeps_the_counter(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=3)
    for _ in range(2):
        rt.step(group.id, [user("x")])
    assert rt.get_group(group.id).counter == 1
    updated = rt.update_group(group.id, frequency=5)
    assert (updated.frequency, updated.counter) == (5, 1)
    fired = [rt.step(group.id, [user("y")]).fired for _ in range(4)]
    assert fired == [False, False, False, True]  # counter 2, 3, 4, then 0
    assert rt.update_group(group.id, frequency=None).frequency is None
    assert rt.step(group.id, [user("z")]).fired


def test_custom_preamble_and_transcript_limit(rt: Runtime, recorder: Recorder) -> None:
    group = rt.create_group(
        primary={"kind": "echo"},
        sleeptime=[{"kind": "recorder"}],
        frequency=2,
        preamble="Remember the user's colors.",
        transcript_max_messages=2,
    )
    rt.step(group.id, [user("one")])
    rt.step(group.id, [user("two")])
    result = rt.step(group.id, [user("three")])
    rt.wait_for_runs(result.run_ids, timeout=30)
    assert recorder.transcripts[1] == (
        "<system-reminder>\nRemember the user's colors.\n</system-reminder>\n\nMessages:\n"
        "[2 earlier message(s) of this conversation were left out]\n"
        "user: three\nassistant: echo 0: three"
    )
    assert rt.get_group(group.id).transcript_max_messages == 2


def test_sleeptime_history_holds_the_transcript_and_output_tagged_with_the_run(
    rt: Runtime, recorder: Recorder
) -> None:
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}])
    result = rt.step(group.id, [user("hi")])
    rt.wait_for_runs(result.run_ids, timeout=30)
    history = rt.list_messages(group.sleeptime_agent_ids[0])
    assert [m.role for m in history] == ["user", "assistant"]
    assert {m.run_id for m in history} == set(result.run_ids)
    assert history[0].text() == recorder.transcripts[0]
    assert history[0].text().startswith("<system-reminder>\n")


def test_turns_of_different_groups_run_concurrently(rt: Runtime) -> None:
    gate = threading.Event()
    entered = threading.Semaphore(0)

    class Blocking:
        def __init__(self, config: dict[str, object]) -> None:
            pass

        def step(self, context: object, messages: object) -> list[MessageCreate]:
            entered.release()
            gate.wait(30)
            return [MessageCreate(role="assistant", content="unblocked")]

    rt.agents.register("blocking", Blocking)
    slow = rt.create_group(primary={"kind": "blocking"}, sleeptime=[{"kind": "memory"}])
    fast = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    waiting = threading.Thread(target=rt.step, args=(slow.id, [user("wait")]))
    waiting.start()
    assert entered.acquire(timeout=10)
    assert rt.step(fast.id, [user("not blocked")]).turn == 1
    gate.set()
    waiting.join(10)
    assert rt.get_group(slow.id).turns == 1


def test_stop_finishes_the_streams_already_queued(db_url: str) -> None:
    gate, entered = threading.Event(), threading.Semaphore(0)

    class Blocking:
        def __init__(self, config: dict[str, object]) -> None:
            pass

        def step(self, context: object, messages: object) -> list[MessageCreate]:
            entered.release()
            gate.wait(30)
            return [MessageCreate(role="assistant", content="late")]

    rt = Runtime.start(db_url, kinds={"blocking": Blocking})
    group = rt.create_group(primary={"kind": "blocking"}, sleeptime=[{"kind": "memory"}])
    first = rt.stream(group.id, [user("one")])
    assert entered.acquire(timeout=10)
    second = rt.stream(group.id, [user("two")])  # queued behind the first
    stopper = threading.Thread(target=rt.stop, kwargs={"drain_timeout": 0})
    stopper.start()
    gate.set()
    assert [m.text() for m in first] == ["late"]
    assert [m.text() for m in second] == ["late"]
    assert second.result.turn == 2
    stopper.join(30)
    with pytest.raises(RuntimeStopped):
        rt.stream(group.id, [user("three")])


def test_returned_groups_equal_what_get_group_reads(rt: Runtime) -> None:
    created = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=3
    )
    assert created == rt.get_group(created.id)
    rt.step(created.id, [user("hello")])
    updated = rt.update_group(created.id, frequency=4, preamble="Keep notes.")
    assert updated == rt.get_group(created.id)
    assert (updated.frequency, updated.counter, updated.turns) == (4, 0, 1)


class _RecentReader:
    """A primary agent that answers with how many earlier messages `recent(3)` gave it."""

    def __init__(self, config: dict[str, object]) -> None:
        self.seen: list[list[str]] = []

    def step(self, context: AgentContext, messages: object) -> list[MessageCreate]:
        self.seen.append([m.text() for m in context.recent(3)])
        return [MessageCreate(role="assistant", content=f"reply {len(self.seen)}")]


def test_recent_gives_the_last_stored_messages_oldest_first(rt: Runtime) -> None:
    reader = _RecentReader({})
    rt.agents.register("recent", lambda config: reader)
    group = rt.create_group(primary={"kind": "recent"}, sleeptime=[{"kind": "simulated"}])
    for said in ["one", "two", "three"]:
        rt.step(group.id, [MessageCreate(role="user", content=said)])
    assert reader.seen == [[], ["one", "reply 1"], ["reply 1", "two", "reply 2"]]
