"""Bad input and faults (SPEC 13): a clear, typed error, and nothing stored is changed."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from actors import (
    AgentNotFound,
    AgentRoleError,
    GroupNotFound,
    PrimaryAgentError,
    RunNotFound,
    Runtime,
    RuntimeStopped,
    StoreRejected,
    StoreUnavailable,
    UnknownAgentKind,
)
from messages import MessageCreate, RunStatus
from tests.agents import Echo, user


def _snapshot(rt: Runtime, group_id: str) -> tuple[Any, ...]:
    group = rt.get_group(group_id)
    return (
        group,
        rt.list_messages(group.primary_agent_id),
        rt.list_runs(group_id=group_id),
        rt.get_blocks(group.sleeptime_agent_ids[0]),
    )


@pytest.fixture
def group_id(rt: Runtime) -> str:
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=2
    )
    result = rt.step(group.id, [user("my favorite color is teal")])
    rt.wait_for_runs(result.run_ids, timeout=30)
    return group.id


BAD_CALLS: list[tuple[str, Callable[[Runtime, str], object], type[Exception], str]] = [
    (
        "unknown role",
        lambda rt, g: rt.step(g, [{"role": "robot", "content": "x"}]),
        ValidationError,
        "role",
    ),
    ("no messages", lambda rt, g: rt.step(g, []), ValidationError, "at least 1"),
    (
        "a message with no content",
        lambda rt, g: rt.step(g, [{"role": "user"}]),
        ValidationError,
        "needs content",
    ),
    (
        "an assistant message with neither content nor tool calls",
        lambda rt, g: rt.record_turn(g, [{"role": "user", "content": "q"}, {"role": "assistant"}]),
        ValidationError,
        "needs content or tool_calls",
    ),
    (
        "a tool message with empty content",
        lambda rt, g: rt.record_turn(g, [{"role": "tool", "content": "", "tool_call_id": "c"}]),
        ValidationError,
        "needs content",
    ),
    (
        "a string, not a list",
        lambda rt, g: rt.step(g, "hello"),  # type: ignore[arg-type]
        ValidationError,
        "list",
    ),
    (
        "unknown field",
        lambda rt, g: rt.record_turn(g, [{"role": "user", "text": "x"}]),
        ValidationError,
        "text",
    ),
    (
        "tool message without call id",
        lambda rt, g: rt.record_turn(g, [{"role": "tool", "content": "{}"}]),
        ValidationError,
        "tool_call_id",
    ),
    (
        "bad stream input",
        lambda rt, g: rt.stream(g, [{"role": "user", "content": 5}]),
        ValidationError,
        "content",
    ),
    (
        "unknown group",
        lambda rt, g: rt.step("group-nope", [user("x")]),
        GroupNotFound,
        "group-nope",
    ),
    (
        "unknown group, stream",
        lambda rt, g: rt.stream("group-nope", [user("x")]),
        GroupNotFound,
        "group-nope",
    ),
    ("unknown group, get", lambda rt, g: rt.get_group("group-nope"), GroupNotFound, "nope"),
    (
        "unknown group, update",
        lambda rt, g: rt.update_group("group-nope", frequency=1),
        GroupNotFound,
        "nope",
    ),
    (
        "negative frequency on update",
        lambda rt, g: rt.update_group(g, frequency=-1),
        ValidationError,
        "frequency",
    ),
    (
        "zero run timeout on update",
        lambda rt, g: rt.update_group(g, run_timeout=0),
        ValidationError,
        "run_timeout",
    ),
    ("unknown run", lambda rt, g: rt.get_run("run-nope"), RunNotFound, "run-nope"),
    ("unknown run, cancel", lambda rt, g: rt.cancel_run("run-nope"), RunNotFound, "run-nope"),
    ("unknown run, events", lambda rt, g: rt.run_events("run-nope"), RunNotFound, "run-nope"),
    (
        "unknown run, wait",
        lambda rt, g: rt.wait_for_runs(["run-nope"], timeout=1),
        RunNotFound,
        "run-nope",
    ),
    (
        "limit below one",
        lambda rt, g: rt.list_runs(limit=-1),
        ValidationError,
        "greater than or equal to 1",
    ),
    (
        "unknown status",
        lambda rt, g: rt.list_runs(statuses=["sleeping"]),
        ValidationError,
        "sleeping",
    ),
    (
        "unknown status, count",
        lambda rt, g: rt.count_runs(statuses=["sleeping"]),
        ValidationError,
        "sleeping",
    ),
    (
        "unknown agent, blocks",
        lambda rt, g: rt.get_blocks("agent-nope"),
        AgentNotFound,
        "agent-nope",
    ),
    (
        "unknown agent, history",
        lambda rt, g: rt.list_messages("agent-nope"),
        AgentNotFound,
        "agent-nope",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "says"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_call_gets_a_typed_error_and_changes_nothing(
    rt: Runtime,
    group_id: str,
    call: Callable[[Runtime, str], object],
    error: type[Exception],
    says: str,
) -> None:
    before = _snapshot(rt, group_id)
    with pytest.raises(error, match=says):
        call(rt, group_id)
    assert _snapshot(rt, group_id) == before


BAD_GROUPS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("negative frequency", {"frequency": -1}, ValidationError, "frequency"),
    ("no sleeptime agents", {"sleeptime": []}, ValidationError, "sleeptime"),
    ("unregistered kind", {"sleeptime": [{"kind": "nobody"}]}, UnknownAgentKind, "nobody"),
    (
        "unknown config key",
        {"primary": {"kind": "simulated", "config": {"latncy_ms": 5}}},
        ValidationError,
        "latncy_ms",
    ),
    (
        "bad config value",
        {"primary": {"kind": "simulated", "config": {"failure_rate": 2}}},
        ValidationError,
        "failure_rate",
    ),
    ("spec without kind", {"primary": {"config": {}}}, ValidationError, "kind"),
    (
        "block over its limit",
        {"blocks": {"human": {"value": "x" * 10, "limit": 5}}},
        ValidationError,
        "limit",
    ),
    ("bad block label", {"blocks": {"my block": ""}}, ValidationError, "label"),
    ("max_attempts zero", {"max_attempts": 0}, ValidationError, "max_attempts"),
    (
        "config not JSON",
        {"primary": {"kind": "any-config", "config": {"suffix": object()}}},
        ValidationError,
        "suffix",
    ),
    (
        "config with a float JSON cannot hold",
        {"primary": {"kind": "any-config", "config": {"ratio": float("nan")}}},
        ValidationError,
        "finite",
    ),
    (
        "config with a key that is not text",
        {"primary": {"kind": "any-config", "config": {1: "one"}}},
        ValidationError,
        "config",
    ),
    ("memory as the primary", {"primary": {"kind": "memory"}}, AgentRoleError, "'sleeptime'"),
    ("scripted as a sleeptime", {"sleeptime": [{"kind": "scripted"}]}, AgentRoleError, "'primary'"),
    (
        "a sleeptime-only kind of the user's as the primary",
        {"primary": {"kind": "notes"}},
        AgentRoleError,
        "'notes' cannot be a primary agent: it supports 'sleeptime' only",
    ),
    (
        "persona not text",
        {"sleeptime": [{"kind": "memory", "config": {"memory_persona": 3}}]},
        ValidationError,
        "memory_persona",
    ),
]


@pytest.mark.parametrize(
    ("changes", "error", "says"), [c[1:] for c in BAD_GROUPS], ids=[c[0] for c in BAD_GROUPS]
)
def test_bad_group_is_refused_and_nothing_is_stored(
    rt: Runtime, changes: dict[str, Any], error: type[Exception], says: str
) -> None:
    rt.agents.register("any-config", Echo)  # takes any config: the runtime must check it
    rt.agents.register("notes", Echo, roles=["sleeptime"])
    arguments: dict[str, Any] = {
        "primary": {"kind": "scripted"},
        "sleeptime": [{"kind": "memory"}],
        **changes,
    }
    with pytest.raises(error, match=says):
        rt.create_group(**arguments)
    assert rt.list_groups() == []


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:////no/such/directory/x.db", "unable to open"),
        ("not a url at all", "not a database URL"),
        ("nosuchdb://host/db", "no driver"),
        ("sqlite://", "in-memory"),
    ],
)
def test_unusable_database_url_fails_fast_and_clearly(url: str, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=says):
        Runtime.start(url)
    assert time.monotonic() - started < 5


def test_stopped_runtime_refuses_calls(db_url: str) -> None:
    rt = Runtime.start(db_url)
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    rt.stop()
    rt.stop()  # twice is harmless
    with pytest.raises(RuntimeStopped, match=r"Runtime\.start"):
        rt.step(group.id, [user("hello?")])
    with pytest.raises(RuntimeStopped):
        rt.get_group(group.id)


def test_agent_returning_garbage_fails_cleanly(rt: Runtime) -> None:
    class Garbage:
        def __init__(self, config: dict[str, object]) -> None:
            pass

        def step(self, context: object, messages: object) -> object:
            return 42

    rt.agents.register("garbage", Garbage)  # type: ignore[arg-type]
    bad_sleeper = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "garbage"}])
    (run,) = rt.wait_for_runs(rt.step(bad_sleeper.id, [user("hi")]).run_ids, timeout=30)
    assert run.status is RunStatus.FAILED and "list of messages" in (run.error or "")
    bad_primary = rt.create_group(primary={"kind": "garbage"}, sleeptime=[{"kind": "memory"}])
    with pytest.raises(PrimaryAgentError, match="list of messages"):
        rt.step(bad_primary.id, [user("hi")])
    assert rt.get_group(bad_primary.id).turns == 1


@pytest.mark.parametrize("how", ["step", "stream"])
def test_a_primary_message_that_cannot_be_stored_leaves_no_gap_in_the_history(
    rt: Runtime, how: str
) -> None:
    """An agent's unvalidated message (`model_construct` skips pydantic's checks) fails its
    turn when it is stamped; the messages before it and the next turns keep every sequence
    number, one after the other (a number was once used up, and the history had a gap)."""

    class Unvalidated:
        def __init__(self, config: dict[str, object]) -> None:
            pass

        def step(self, context: object, messages: object) -> list[MessageCreate]:
            return [
                MessageCreate(role="assistant", content="first"),
                MessageCreate.model_construct(role="assistant", content=None),  # type: ignore[arg-type]
            ]

    rt.agents.register("unvalidated", Unvalidated)
    group = rt.create_group(primary={"kind": "unvalidated"}, sleeptime=[{"kind": "memory"}])
    with pytest.raises(PrimaryAgentError):
        if how == "stream":
            list(rt.stream(group.id, [user("hi")]))
        else:
            rt.step(group.id, [user("hi")])
    rt.record_turn(group.id, [user("again"), MessageCreate(role="assistant", content="ok")])
    history = rt.list_messages(group.primary_agent_id)
    assert [m.sequence for m in history] == [1, 2, 3, 4]
    assert [m.text() for m in history] == ["hi", "first", "again", "ok"]
    rt.wait_for_runs([run.id for run in rt.list_runs(group_id=group.id)], timeout=30)
    report = rt.check_invariants([group.id])
    assert report.ok, report.violations


def test_a_sqlite_file_that_cannot_be_written_refuses_writes_for_good(tmp_path: Path) -> None:
    """An immutable (or read-only) SQLite file: every write is StoreRejected, which says
    trying again will not help, not StoreUnavailable, the outage a caller waits out."""
    path = tmp_path / "frozen.db"
    with Runtime.start(f"sqlite:///{path}") as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    frozen = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if frozen.returncode != 0:  # (root ignores file modes: only an immutable file stops it)
        pytest.skip(f"cannot make the file immutable here: {frozen.stderr.strip()!r}")
    try:
        with Runtime.start(f"sqlite:///{path}") as rt:
            with pytest.raises(StoreRejected, match="readonly"):
                rt.record_turn(group.id, [user("hi")])
            assert rt.get_group(group.id).turns == 0  # what was stored reads as before
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_database_file_is_left_usable_after_bad_input(db_url: str, tmp_path: Path) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        rt.wait_for_runs(rt.step(group.id, [user("my name is Bo")]).run_ids, timeout=30)
        with pytest.raises(ValidationError):
            rt.step(group.id, [{"role": "nobody"}])
    with Runtime.start(db_url) as rt:
        assert rt.get_group(group.id).turns == 1
        assert rt.get_blocks(group.primary_agent_id)["human"].value == "name: Bo"


@pytest.mark.parametrize(
    ("database", "user", "says"),
    [("nosuchdb", "postgres", "nosuchdb"), ("postgres", "nobody", "nobody")],
    ids=["unknown database", "unknown user"],
)
def test_wrong_postgresql_url_fails_fast_and_clearly(
    request: pytest.FixtureRequest, database: str, user: str, says: str
) -> None:
    cluster = request.getfixturevalue("postgres_cluster")
    url = f"postgresql://{user}@{cluster.host}:{cluster.port}/{database}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=says):
        Runtime.start(url)
    assert time.monotonic() - started < 5


def test_unreachable_postgresql_server_fails_fast_and_clearly() -> None:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"port {port} failed: Connection refused"):
            Runtime.start(f"postgresql://postgres@127.0.0.1:{port}/sleeptime")
        assert time.monotonic() - started < 5


def test_a_turn_whose_json_decodes_to_unstorable_text_still_gets_its_runs_done(
    rt: Runtime,
) -> None:
    """Accepted at the boundary (the escape is storable text), such a turn's runs render
    the decoded text escaped, and complete, with their transcript stored."""
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    turn = [
        user("my name is Ada"),
        MessageCreate(
            role="assistant",
            tool_calls=[
                {"id": "c1", "name": "send_message", "arguments": '{"message": "a\\u0000b"}'}
            ],
        ),
        MessageCreate(role="tool", tool_call_id="c1", content='{"message": "x\\ud800y"}'),
        MessageCreate(
            role="tool", tool_call_id="c1", content='{"message": ' + "[" * 5000 + "]" * 5000 + "}"
        ),
    ]
    (run,) = rt.wait_for_runs(rt.record_turn(group.id, turn).run_ids, timeout=30)
    assert run.status is RunStatus.COMPLETED, run.error
    transcript = rt.list_messages(group.sleeptime_agent_ids[0])[0].text()
    assert "assistant: a\\x00b" in transcript and "returned x\\ud800y" in transcript
    assert "not JSON with a 'message' field" in transcript
