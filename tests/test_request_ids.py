"""Idempotent turns (SPEC 15): a retry with the same request id gets the first answer.

`step`, `stream` and `record_turn` take `request_id`; a call with the id of a turn the
group already recorded records nothing and returns that turn's result (or raises its
PrimaryAgentError), also from a new process after the first one was killed with -9
between its commit and its reply.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import create_engine, text

from actors import AsyncRuntime, PrimaryAgentError, Runtime
from messages import Group, MessageCreate, TurnResult
from persistence._engine import parse_url
from tests.agents import Echo, Streamer, user

CHILD = Path(__file__).resolve().parent / "request_child.py"


def stored_requests(db_url: str, group_id: str) -> list[tuple[str, int]]:
    """(request id, turn) of each turn request stored for the group, read with plain SQL."""
    engine = create_engine(parse_url(db_url))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT request_id, turn FROM turn_requests WHERE group_id = :group "
                    "ORDER BY turn"
                ),
                {"group": group_id},
            )
            return [(r[0], r[1]) for r in rows]
    finally:
        engine.dispose()


def one_turn_stored(rt: Runtime, db_url: str, group: Group, request_id: str) -> None:
    """The group holds exactly one turn, taken with `request_id`."""
    assert rt.get_group(group.id).turns == 1
    assert {m.turn for m in rt.list_messages(group.primary_agent_id)} == {1}
    assert {r.turn for r in rt.list_runs(group_id=group.id)} <= {1}
    assert stored_requests(db_url, group.id) == [(request_id, 1)]


@pytest.fixture
def group(rt: Runtime) -> Group:
    rt.agents.register("echo", Echo)
    rt.agents.register("streamer", Streamer)
    return rt.create_group(
        primary={"kind": "echo", "config": {"replies": 2}}, sleeptime=[{"kind": "memory"}]
    )


def test_a_retried_step_returns_the_first_result_and_records_nothing(
    rt: Runtime, db_url: str, group: Group
) -> None:
    first = rt.step(group.id, [user("my favorite color is coral")], request_id="req-1")
    assert first.fired and len(first.messages) == 2 and len(first.run_ids) == 1
    again = rt.step(group.id, [user("my favorite color is coral")], request_id="req-1")
    assert again == first
    one_turn_stored(rt, db_url, group, "req-1")
    rt.wait_for_runs(first.run_ids, timeout=30)
    assert rt.check_invariants([group.id]).ok


def test_a_retried_record_turn_returns_the_first_result(
    rt: Runtime, db_url: str, group: Group
) -> None:
    said = [user("q"), MessageCreate(role="assistant", content="a")]
    first = rt.record_turn(group.id, said, request_id="rec-1")
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert rt.record_turn(group.id, said, request_id="rec-1") == first
    one_turn_stored(rt, db_url, group, "rec-1")


def test_a_retried_stream_yields_the_first_messages_then_the_same_result(
    rt: Runtime, db_url: str, group: Group
) -> None:
    first = rt.stream(group.id, [user("go")], request_id="stream-1")
    seen = list(first)
    assert [m.text() for m in seen] == ["echo 0: go", "echo 1: go"]
    again = rt.stream(group.id, [user("go")], request_id="stream-1")
    assert list(again) == seen
    assert again.result == first.result
    # Any kind of call with the id gets that answer: a step too.
    assert rt.step(group.id, [user("go")], request_id="stream-1") == first.result
    one_turn_stored(rt, db_url, group, "stream-1")


def test_a_retry_with_other_input_still_gets_the_first_result(
    rt: Runtime, db_url: str, group: Group
) -> None:
    first = rt.step(group.id, [user("hello")], request_id="same")
    assert rt.step(group.id, [user("something else")], request_id="same") == first
    assert rt.record_turn(group.id, [user("x")], request_id="same") == first
    one_turn_stored(rt, db_url, group, "same")


def test_request_ids_are_per_group_and_none_is_never_a_retry(rt: Runtime, group: Group) -> None:
    other = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])
    mine = rt.step(group.id, [user("hi")], request_id="shared")
    theirs = rt.step(other.id, [user("hi")], request_id="shared")
    assert theirs.group_id == other.id and theirs.turn == 1 and theirs != mine
    rt.step(group.id, [user("hi")])
    rt.step(group.id, [user("hi")], request_id=None)
    assert rt.get_group(group.id).turns == 3


def test_a_retry_of_a_failed_turn_raises_the_same_error_with_the_same_result(
    rt: Runtime, db_url: str
) -> None:
    rt.agents.register("streamer", Streamer)
    group = rt.create_group(
        primary={"kind": "streamer", "config": {"count": 2, "fail": True}},
        sleeptime=[{"kind": "memory"}],
    )
    stream = rt.stream(group.id, [user("go")], request_id="doomed")
    seen = [next(stream), next(stream)]  # then the agent fails
    with pytest.raises(PrimaryAgentError, match="broke mid-stream") as first:
        next(stream)
    assert isinstance(first.value.result, TurnResult) and first.value.result.messages == seen
    with pytest.raises(PrimaryAgentError) as again:
        rt.step(group.id, [user("go")], request_id="doomed")
    assert str(again.value) == str(first.value)
    assert again.value.result == first.value.result
    retried = rt.stream(group.id, [user("go")], request_id="doomed")
    assert [next(retried), next(retried)] == seen
    with pytest.raises(PrimaryAgentError) as streamed_again:
        next(retried)
    assert streamed_again.value.result == first.value.result
    one_turn_stored(rt, db_url, group, "doomed")


def test_a_retry_in_a_new_runtime_returns_the_first_result(db_url: str) -> None:
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])
        first = rt.step(group.id, [user("hi")], request_id="across")
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        assert rt.step(group.id, [user("hi")], request_id="across") == first
        one_turn_stored(rt, db_url, group, "across")


def test_a_retry_after_a_kill_9_between_commit_and_reply_returns_the_first_result(
    db_url: str,
) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
    child = subprocess.run(
        [sys.executable, str(CHILD), db_url, group.id, "kill-9-req"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SLEEPTIME_LOG_LEVEL": "critical"},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    committed = TurnResult.model_validate_json(child.stdout.strip().splitlines()[-1])
    with Runtime.start(db_url) as rt:  # the caller never had an answer: it retries
        again = rt.step(group.id, [user("my name is Ada")], request_id="kill-9-req")
        assert again == committed
        one_turn_stored(rt, db_url, group, "kill-9-req")
        runs = rt.wait_for_runs(again.run_ids, timeout=30)  # recovered by the new runtime
        assert all(r.status.terminal for r in runs)
        report = rt.check_invariants()
        assert report.ok, report.violations


BAD_IDS: list[Any] = ["", "x" * 65, 7, b"req", "nul\x00here", "lone \ud800 surrogate"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=["empty", "too-long", "int", "bytes", "nul", "sur"])
def test_bad_request_ids_are_refused_before_anything_is_stored(
    rt: Runtime, group: Group, bad: Any
) -> None:
    with pytest.raises(ValidationError, match="request_id"):
        rt.step(group.id, [user("hi")], request_id=bad)
    with pytest.raises(ValidationError, match="request_id"):
        rt.record_turn(group.id, [user("hi")], request_id=bad)
    with pytest.raises(ValidationError, match="request_id"):
        rt.stream(group.id, [user("hi")], request_id=bad)
    assert rt.get_group(group.id).turns == 0


CALLS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"])),
        st.sampled_from(["step", "record", "stream"]),
    ),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=CALLS)
def test_any_sequence_of_retries_stores_one_turn_per_distinct_request_id(
    rt: Runtime, db_url: str, calls: list[tuple[str | None, str]]
) -> None:
    rt.agents.register("echo", Echo)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}], frequency=2)
    answers: dict[str, TurnResult] = {}
    for n, (request_id, mode) in enumerate(calls):
        said = [user(f"call {n}")]
        if mode == "step":
            result = rt.step(group.id, said, request_id=request_id)
        elif mode == "record":
            result = rt.record_turn(group.id, said, request_id=request_id)
        else:
            stream = rt.stream(group.id, said, request_id=request_id)
            assert list(stream) == stream.result.messages
            result = stream.result
        if request_id is not None:
            assert answers.setdefault(request_id, result) == result
    distinct = {request_id for request_id, _ in calls if request_id is not None}
    anonymous = sum(1 for request_id, _ in calls if request_id is None)
    assert rt.get_group(group.id).turns == len(distinct) + anonymous
    stored = stored_requests(db_url, group.id)
    assert sorted(request_id for request_id, _ in stored) == sorted(distinct)
    assert {turn for _, turn in stored} == {answers[r].turn for r in distinct}
    run_ids = [r.id for r in rt.list_runs(group_id=group.id)]
    rt.wait_for_runs(run_ids, timeout=30)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


def test_the_asyncio_api_takes_a_request_id_too(db_url: str) -> None:
    """AsyncRuntime passes `request_id` on: a retry gets the first result, one turn."""

    async def main() -> None:
        async with await AsyncRuntime.start(db_url) as rt:
            group = await rt.create_group(
                primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}]
            )
            first = await rt.step(group.id, [user("hi")], request_id="async-1")
            again = await rt.step(group.id, [user("hi, again")], request_id="async-1")
            assert again == first
            assert (await rt.get_group(group.id)).turns == 1

    asyncio.run(main())
