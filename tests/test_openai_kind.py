"""The `openai` kind against a real HTTP server on loopback (`tests/fake_openai.py`).

End-to-end tests take `rt`, so they run on SQLite and on PostgreSQL; the pure pieces
(retry delays, answer parsing, tool arguments, the history cache) are tested directly.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import run
from actors import Runtime, configure_logging
from actors.kinds import Memory, OpenAIAgent, OpenAIConfig, openai_chat
from actors.kinds._chat_http import (
    ChatEndpoint,
    MalformedAnswer,
    ServerStatus,
    ServerTimeout,
    ServerUnreachable,
    _json_object,
    error_message,
    parse_retry_after,
)
from actors.kinds._chat_protocol import (
    RecentChat,
    StreamedAnswer,
    parse_completion,
    system_prompt,
)
from actors.kinds._chat_tools import TOOL_NAMES, call_memory_tool
from actors.kinds.openai_chat import MAX_BACKOFF_S, retry_delay
from messages import (
    AgentConfigError,
    Block,
    Blocks,
    Message,
    MessageCreate,
    PrimaryAgentError,
    RunStatus,
    StopReason,
    TextContent,
    ToolCall,
)
from tests.fake_openai import FakeOpenAI, Reply, answer_text, keep_notes


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """Put logging back to its defaults after a command changed them."""
    yield
    configure_logging()


def llm(fake: FakeOpenAI, **config: Any) -> dict[str, Any]:
    """An `openai` agent spec on the fake; retries wait 10 ms unless told otherwise."""
    return {
        "kind": "openai",
        "config": {"base_url": fake.url, "model": "fake-model", "backoff_s": 0.01, **config},
    }


def user(text: str) -> list[MessageCreate]:
    return [MessageCreate(role="user", content=text)]


def group(rt: Runtime, fake: FakeOpenAI, blocks: Any = None, **sleeptime: Any) -> Any:
    """A group of two `openai` agents on the fake, firing on every turn."""
    return rt.create_group(
        primary=llm(fake),
        sleeptime=[llm(fake, **sleeptime)],
        frequency=1,
        blocks=blocks or {"human": "favorite color: orange", "persona": "I am kind."},
    )


def run_messages(rt: Runtime, agent_id: str, run_id: str) -> list[Message]:
    return [m for m in rt.list_messages(agent_id) if m.run_id == run_id]


# -- the primary agent --------------------------------------------------------------------


def test_primary_request_carries_the_blocks_and_the_reply_is_stored(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    fake.script_primary(Reply.text("Hello Ada!"))
    g = group(
        rt,
        fake,
        blocks={
            "human": "name: Ada",
            "persona": {"value": "I am kind.", "limit": 100, "read_only": True},
        },
    )

    result = rt.step(g.id, user("hi there"))

    request = fake.received[0]
    assert request.body["model"] == "fake-model" and "tools" not in request.body
    assert '<block label="human" chars="9/5000">\nname: Ada\n</block>' in request.system
    assert '<block label="persona" chars="10/100" read_only="true">' in request.system
    assert request.messages[1:] == [{"role": "user", "content": "hi there"}]
    assert [m.text() for m in result.messages] == ["Hello Ada!"]
    stored = rt.list_messages(g.primary_agent_id)
    assert [(m.role, m.text()) for m in stored] == [
        ("user", "hi there"),
        ("assistant", "Hello Ada!"),
    ]


def test_primary_sends_the_conversation_including_recorded_turns(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = rt.create_group(primary=llm(fake), sleeptime=[llm(fake)], frequency=0)
    fake.script_primary(Reply.text("first answer"), Reply.text("third answer"))
    rt.step(g.id, user("one"))
    rt.record_turn(
        g.id, [{"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]
    )
    rt.step(g.id, user("three"))

    assert fake.received[-1].messages[1:] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "three"},
    ]


def test_stream_yields_the_reply_read_from_server_sent_events(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake)
    fake.script_primary(Reply.text("a reply in several pieces", reasoning="think first"))

    streamed = list(rt.stream(g.id, user("hi")))

    assert fake.received[0].body["stream"] is True
    (message,) = streamed
    assert message.text() == "a reply in several pieces"
    assert message.content[0].type == "reasoning"
    assert rt.list_messages(g.primary_agent_id)[-1].id == message.id


def test_a_stream_that_breaks_off_is_retried(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake)
    fake.script_primary(Reply.text("lost in transit", break_stream=True), Reply.text("whole"))

    assert [m.text() for m in rt.stream(g.id, user("hi"))] == ["whole"]


def test_primary_failure_fails_the_turn_with_the_server_error(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake)
    fake.script_primary(Reply.error(401, "Incorrect API key provided"))

    with pytest.raises(PrimaryAgentError, match="HTTP 401") as raised:
        rt.step(g.id, user("hi"))

    assert "Incorrect API key provided" in str(raised.value)
    assert "check api_key or api_key_env" in str(raised.value)
    primary = [r for r in fake.received if not r.from_sleeptime]  # its run may ask too
    assert len(primary) == 1  # a 4xx other than 429 is not retried
    assert rt.get_group(g.id).turns == 1  # the turn is still recorded
    fake.script_primary(Reply.text("back"))
    assert [m.text() for m in rt.step(g.id, user("again")).messages] == ["back"]


def test_primary_timeout_after_retries(rt: Runtime, fake: FakeOpenAI) -> None:
    g = rt.create_group(
        primary=llm(fake, timeout_s=0.2, max_retries=1), sleeptime=[llm(fake)], frequency=0
    )
    fake.script_primary(Reply.text("late", delay_s=2), Reply.text("late", delay_s=2))

    with pytest.raises(PrimaryAgentError, match=r"did not answer within timeout_s=0\.2"):
        rt.step(g.id, user("hi"))
    assert len(fake.received) == 2


# -- the sleeptime agent ------------------------------------------------------------------


def test_memory_replace_changes_the_block_the_primary_sees_next_turn(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake)
    fake.script_sleeptime(
        Reply.call(
            "memory_replace",
            {"label": "human", "old": "color: orange", "new": "color: coral"},
        ),
        Reply.call("memory_finish_edits"),
    )

    first = rt.step(g.id, user("my favorite color is coral"))
    (run,) = rt.wait_for_runs(first.run_ids, timeout=30)
    rt.step(g.id, user("what is my favorite color?"))

    assert (run.status, run.stop_reason) == (RunStatus.COMPLETED, StopReason.END_TURN)
    sleeptime = [r for r in fake.received if r.from_sleeptime]
    assert sorted(sleeptime[0].tool_names) == sorted(TOOL_NAMES)
    assert "user: my favorite color is coral" in sleeptime[0].messages[1]["content"]
    assert 'label="memory_persona"' in sleeptime[0].system
    asked_next = [r for r in fake.received if not r.from_sleeptime][-1]  # the second turn
    assert "favorite color: coral" in asked_next.system
    assert rt.get_blocks(g.primary_agent_id)["human"].value == "favorite color: coral"
    history = run_messages(rt, g.sleeptime_agent_ids[0], run.id)
    assert [m.role for m in history] == ["user", "assistant", "tool", "assistant", "tool"]
    replace = history[1].tool_calls
    assert replace is not None and replace[0].name == "memory_replace"
    assert history[2].tool_call_id == replace[0].id
    assert json.loads(history[2].text()) == {
        "message": "replaced text in block 'human'",
        "ok": True,
    }
    # The model saw the result of its call before its next request.
    assert sleeptime[1].messages[-1]["role"] == "tool"
    assert sleeptime[1].messages[-1]["tool_call_id"] == replace[0].id


def test_tool_errors_go_back_to_the_model_and_the_run_goes_on(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake)
    fake.script_sleeptime(
        Reply.calls(
            ("memory_replace", {"label": "human", "old": "color: blue", "new": "x"}),
            ("memory_insert", '{"label": "human", "text": '),  # not JSON
            ("memory_insert", {"label": "human"}),  # no text
            ("memory_rethink", {"label": 7, "text": "x"}),  # a label that is not text
        ),
        Reply.call("memory_insert", {"label": "human", "text": "name: Ada"}),
        Reply.text("Done."),
    )

    (run,) = rt.wait_for_runs(rt.step(g.id, user("I am Ada")).run_ids, timeout=30)

    assert (run.status, run.stop_reason) == (RunStatus.COMPLETED, StopReason.END_TURN)
    second = [r for r in fake.received if r.from_sleeptime][1]
    results = [json.loads(m["content"]) for m in second.messages if m["role"] == "tool"]
    assert [r["ok"] for r in results] == [False, False, False, False]
    assert "does not occur in block 'human'" in results[0]["message"]
    assert "the arguments of memory_insert are not a JSON object" in results[1]["message"]
    assert "invalid arguments for memory_insert: text: Field required" in results[2]["message"]
    assert "invalid arguments for memory_rethink: label:" in results[3]["message"]
    blocks = rt.get_blocks(g.primary_agent_id)
    assert blocks["human"].value == "favorite color: orange\nname: Ada"
    history = run_messages(rt, g.sleeptime_agent_ids[0], run.id)
    assert [m.role for m in history[:6]] == ["user", "assistant", *["tool"] * 4]
    assert [m.role for m in history[6:]] == ["assistant", "tool", "assistant"]
    assert history[-1].text() == "Done."


def test_max_steps_ends_the_run_completed_with_stop_reason_max_steps(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake, max_steps=2)
    fake.script_sleeptime(
        Reply.call("memory_insert", {"label": "human", "text": "one"}),
        Reply.call("memory_insert", {"label": "human", "text": "two"}),
        Reply.call("memory_insert", {"label": "human", "text": "three"}),
    )

    (run,) = rt.wait_for_runs(rt.step(g.id, user("hi")).run_ids, timeout=30)

    assert (run.status, run.stop_reason) == (RunStatus.COMPLETED, StopReason.MAX_STEPS)
    assert len([r for r in fake.received if r.from_sleeptime]) == 2
    assert rt.get_blocks(g.primary_agent_id)["human"].value.endswith("one\ntwo")


def test_unknown_tool_fails_the_run_naming_it_and_keeps_what_was_done(
    rt: Runtime, fake: FakeOpenAI
) -> None:
    g = group(rt, fake)
    fake.script_sleeptime(
        Reply.call("memory_insert", {"label": "human", "text": "name: Ada"}),
        Reply.call("send_email", {"to": "ada@example.com"}),
    )

    (run,) = rt.wait_for_runs(rt.step(g.id, user("hi")).run_ids, timeout=30)

    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
    assert run.error is not None
    assert "'send_email'" in run.error and "memory_finish_edits" in run.error
    history = run_messages(rt, g.sleeptime_agent_ids[0], run.id)
    assert [m.role for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[-1].tool_calls is not None and history[-1].tool_calls[0].name == "send_email"


def test_a_tool_call_that_fails_outright_fails_the_run_and_keeps_the_calls_before(
    rt: Runtime, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edits made before a tool call that raised stay in the blocks: so do their calls
    and results in the history (they were dropped, leaving an edit no call explains)."""
    g = group(rt, fake)
    fake.script_sleeptime(
        Reply.call("memory_insert", {"label": "human", "text": "name: Ada"}),
        Reply.call("memory_insert", {"label": "human", "text": "age: 36"}),
    )
    real = call_memory_tool

    def second_fails(memory: Any, call: Any) -> Any:
        if "age" in call.arguments:
            raise RuntimeError("the tool broke")
        return real(memory, call)

    monkeypatch.setattr(openai_chat, "call_memory_tool", second_fails)
    (run,) = rt.wait_for_runs(rt.step(g.id, user("hi")).run_ids, timeout=30)

    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
    assert run.error == "RuntimeError: the tool broke"
    assert "name: Ada" in rt.get_blocks(g.primary_agent_id)["human"].value
    history = run_messages(rt, g.sleeptime_agent_ids[0], run.id)
    assert [m.role for m in history] == ["user", "assistant", "tool", "assistant"]


def test_timeouts_fail_the_run_with_stop_reason_timeout(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake, timeout_s=0.2, max_retries=1)
    fake.script_sleeptime(Reply.text("late", delay_s=2), Reply.text("late", delay_s=2))

    (run,) = rt.wait_for_runs(rt.step(g.id, user("hi")).run_ids, timeout=30)

    assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.TIMEOUT)
    assert run.error is not None and "timeout_s=0.2 (2 attempts)" in run.error
    assert len([r for r in fake.received if r.from_sleeptime]) == 2


def test_server_errors_are_retried_then_fail_the_run(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake, max_retries=2)
    fake.script_sleeptime(
        Reply.error(500, "overloaded"),
        Reply.error(503, "overloaded"),
        Reply.call("memory_finish_edits"),
        Reply.error(500, "down"),
        Reply.error(502, "down"),
        Reply.error(500, "still down"),
    )

    first = rt.step(g.id, user("one")).run_ids
    second = rt.step(g.id, user("two")).run_ids
    recovered, failed = rt.wait_for_runs(first + second, timeout=30)

    assert (recovered.status, recovered.stop_reason) == (RunStatus.COMPLETED, StopReason.END_TURN)
    assert (failed.status, failed.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
    assert failed.error is not None
    assert "answered HTTP 500 (3 attempts, max_retries=2): still down" in failed.error
    assert len([r for r in fake.received if r.from_sleeptime]) == 6


def test_429_waits_for_retry_after(rt: Runtime, fake: FakeOpenAI) -> None:
    # Without Retry-After the first retry would wait 5-10 s (backoff_s=10).
    g = group(rt, fake, backoff_s=10)
    fake.script_sleeptime(
        Reply.error(429, "slow down", retry_after="0.3"), Reply.call("memory_finish_edits")
    )

    (run,) = rt.wait_for_runs(rt.step(g.id, user("hi")).run_ids, timeout=30)

    assert run.status is RunStatus.COMPLETED
    first, second = [r for r in fake.received if r.from_sleeptime]
    assert 0.3 <= second.at - first.at < 3


def test_malformed_answer_fails_the_run_at_once(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake)
    fake.script_sleeptime(Reply.malformed(), Reply.malformed(b'{"id": "chatcmpl-9"}'))

    first = rt.step(g.id, user("one")).run_ids
    second = rt.step(g.id, user("two")).run_ids
    not_json, no_choices = rt.wait_for_runs(first + second, timeout=30)

    for failed in (not_json, no_choices):
        assert (failed.status, failed.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
    assert not_json.error is not None and "malformed answer" in not_json.error
    assert "not JSON" in not_json.error
    assert no_choices.error is not None and "has no choices" in no_choices.error
    assert len([r for r in fake.received if r.from_sleeptime]) == 2  # not retried


def test_cancelling_mid_run_stops_before_the_next_tool_call(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake)
    gate = threading.Event()
    fake.script_sleeptime(
        Reply.call("memory_insert", {"label": "human", "text": "name: Ada"}),
        Reply.call("memory_rethink", {"label": "human", "text": "forgotten"}, gate=gate),
    )
    run_id = rt.step(g.id, user("I am Ada")).run_ids[0]
    fake.wait_for_requests(3)  # the primary's, then the run's two: the second is held

    assert rt.cancel_run(run_id).status is RunStatus.CANCELLED
    gate.set()
    # The agent's runs go one at a time: once the next one ended, the cancelled step returned.
    rt.wait_for_runs(rt.step(g.id, user("next")).run_ids, timeout=30)

    assert rt.get_run(run_id).status is RunStatus.CANCELLED
    assert rt.get_blocks(g.primary_agent_id)["human"].value.endswith("name: Ada")
    sleeptime = [r for r in fake.received if r.from_sleeptime]
    assert len(sleeptime) == 3  # two for the cancelled run, one for the next


def test_cancelling_during_a_retry_wait_ends_the_wait(rt: Runtime, fake: FakeOpenAI) -> None:
    g = group(rt, fake)
    fake.script_sleeptime(Reply.error(429, "slow down", retry_after="25"))
    run_id = rt.step(g.id, user("hi")).run_ids[0]
    fake.wait_for_requests(2)

    rt.cancel_run(run_id)
    # The next run starts only when the cancelled step returned: long before 25 s.
    (later,) = rt.wait_for_runs(rt.step(g.id, user("next")).run_ids, timeout=10)

    assert later.status is RunStatus.COMPLETED
    assert rt.get_run(run_id).status is RunStatus.CANCELLED


# -- the command line ---------------------------------------------------------------------


@pytest.mark.usefixtures("cli_logging")
def test_demo_against_an_llm_server(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeOpenAI(keep_notes) as server:
        argv = ["demo", "--db", db_url, "--llm-url", server.url, "--model", "fake-model"]
        assert run.main([*argv, "--quiet-transcript"]) == 0
        received = server.received

    out = capsys.readouterr().out
    assert f"Both agents are LLMs here (model fake-model at {server.url})" in " ".join(out.split())
    assert "  assistant: fake answer" in out
    assert "+ the user said: Hi! My name is Ada and I live in Lisbon." in out
    assert "3 sleeptime run(s):" in out
    assert len([r for r in received if r.from_sleeptime]) == 6  # 3 runs x 2 model calls


@pytest.mark.usefixtures("cli_logging")
def test_loadtest_against_an_llm_server(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "load.json"
    with FakeOpenAI(keep_notes) as server:
        argv = ["loadtest", "--db", db_url, "--llm-url", server.url, "--model", "fake-model"]
        argv += ["--rate", "30", "--duration", "1", "--groups", "3", "--no-progress"]
        code = run.main([*argv, "--report", str(report_path)])
        received = server.received

    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["turns"] > 0 and report["errors"]["count"] == 0
    assert report["runs"]["completed"] == report["turns"]  # frequency 1: a run per turn
    assert all(report["invariants"].values())
    assert report["parameters"]["llm_url"] == server.url
    assert "openai agents, model fake-model" in out
    assert len([r for r in received if not r.from_sleeptime]) == report["turns"]


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--model", "m"], "--llm-url and --model go together"),
        (["loadtest", "--llm-url", "http://127.0.0.1:9/v1"], "--llm-url and --model go together"),
        (
            ["loadtest", "--llm-url", "http://127.0.0.1:9/v1", "--model", "m", "--latency-ms", "5"],
            "--latency-ms shape simulated agents",
        ),
    ],
)
def test_llm_options_are_checked(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_readme_llm_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes sleeptime.db in the working directory
    readme = (Path(run.__file__).parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (example,) = [block for block in blocks if '"kind": "openai"' in block]

    with FakeOpenAI(keep_notes) as server:
        code = example.replace("http://127.0.0.1:11434/v1", server.url)
        exec(compile(code, "README.md", "exec"), {})

    assert capsys.readouterr().out == "the user said: I'm Ada; I love coral.\n"


# -- config -------------------------------------------------------------------------------


def test_unknown_config_key_is_rejected_naming_it(rt: Runtime, fake: FakeOpenAI) -> None:
    with pytest.raises(ValidationError, match="temprature"):
        rt.create_group(primary=llm(fake, temprature=0.2), sleeptime=[llm(fake)])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"base_url": "127.0.0.1:11434/v1", "model": "m"}, "http:// or https://"),
        ({"base_url": "http://x/v1"}, "model"),
        ({"model": "m", "api_key": "k", "api_key_env": "KEY"}, "not both"),
        ({"model": "m", "timeout_s": 0}, "timeout_s"),
        ({"model": "m", "max_steps": 0}, "max_steps"),
    ],
)
def test_bad_config_is_rejected(config: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        OpenAIAgent(config)


def test_api_key_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLEEPTIME_TEST_KEY", raising=False)

    with pytest.raises(AgentConfigError, match="'SLEEPTIME_TEST_KEY', which is not set"):
        OpenAIAgent({"model": "m", "api_key_env": "SLEEPTIME_TEST_KEY"})


def test_api_key_from_the_environment_is_sent(
    rt: Runtime, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLEEPTIME_TEST_KEY", "sk-test-123")
    g = rt.create_group(
        primary=llm(fake, api_key_env="SLEEPTIME_TEST_KEY"), sleeptime=[llm(fake)], frequency=0
    )

    rt.step(g.id, user("hi"))

    assert fake.received[0].headers["authorization"] == "Bearer sk-test-123"
    assert OpenAIConfig(model="m").api_key is None  # no key: none is sent


# -- the HTTP client ----------------------------------------------------------------------


def test_connections_are_kept_alive_and_a_dropped_one_is_replaced(fake: FakeOpenAI) -> None:
    endpoint = ChatEndpoint(fake.url, api_key=None, timeout_s=5)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    fake.script(Reply.text("one"), Reply.text("two", drop_connection=True), Reply.text("three"))

    answers = [parse_completion(endpoint.complete(body), 1).content for _ in range(3)]

    assert answers == ["one", "two", "three"]
    assert fake.connections == 2  # the server closed the first one after "two"
    assert "authorization" not in fake.received[0].headers


def test_unreachable_server_is_reported() -> None:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        endpoint = ChatEndpoint(
            f"http://127.0.0.1:{probe.getsockname()[1]}/v1", api_key=None, timeout_s=1
        )
        with pytest.raises(ServerUnreachable, match="ConnectionRefusedError"):
            endpoint.complete({"model": "m", "messages": []})


# -- pure pieces --------------------------------------------------------------------------


def test_retry_delay_honours_retry_after_and_backs_off_with_jitter() -> None:
    config = OpenAIConfig(model="m", max_retries=3, backoff_s=1.0)

    assert retry_delay(ServerStatus(429, "slow", 2.5), 1, config, jitter=0.9) == 2.5
    assert retry_delay(ServerStatus(503, "busy", 120.0), 1, config, 0.0) == MAX_BACKOFF_S
    assert retry_delay(ServerStatus(500, "oops"), 1, config, 0.0) == 0.5
    assert retry_delay(ServerStatus(500, "oops"), 3, config, 0.999) == pytest.approx(4.0, 0.01)
    assert retry_delay(ServerTimeout("late"), 2, config, 0.5) == 1.5
    assert retry_delay(ServerUnreachable("refused"), 1, config, 0.0) == 0.5
    assert retry_delay(ServerStatus(500, "oops"), 4, config, 0.0) is None  # out of retries
    assert retry_delay(ServerStatus(400, "bad request"), 1, config, 0.0) is None
    assert retry_delay(MalformedAnswer("not JSON"), 1, config, 0.0) is None
    rng = random.Random(3)
    delays = [retry_delay(ServerStatus(502, "x"), 2, config, rng.random()) for _ in range(50)]
    assert all(d is not None and 1.0 <= d < 2.0 for d in delays) and len(set(delays)) > 1


def test_parse_retry_after() -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    now = (later - timedelta(seconds=7)).timestamp()

    assert parse_retry_after({"Retry-After": "0.05"}) == 0.05
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": format_datetime(later, usegmt=True)}, now) == 7.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "-5"}) == 0.0
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"id": "x"}, "has no choices"),
        ({"choices": []}, "has no choices"),
        ({"error": {"message": "boom"}}, "is an error"),
        ({"choices": [{"text": "hi"}]}, "no message object"),
        ({"choices": [{"message": {"content": 3}}]}, "content is not text"),
        ({"choices": [{"message": {"tool_calls": [{"function": {}}]}}]}, "no function name"),
        ({"choices": [{"message": {"tool_calls": "x"}}]}, "not a list"),
    ],
)
def test_malformed_completions_say_what_is_missing(payload: dict[str, Any], expected: str) -> None:
    with pytest.raises(MalformedAnswer, match=expected):
        parse_completion(payload, step=1)


def test_completion_tool_calls_get_ids_and_json_arguments() -> None:
    payload = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [
                        {"function": {"name": "memory_rethink", "arguments": {"label": "h"}}},
                        {"id": "call_9", "function": {"name": "memory_finish_edits"}},
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }

    answer = parse_completion(payload, step=4)

    assert answer.tool_calls == [
        ToolCall(id="call-4-0", name="memory_rethink", arguments='{"label": "h"}'),
        ToolCall(id="call_9", name="memory_finish_edits", arguments="{}"),
    ]
    assert answer.content == "" and answer.finish_reason == "tool_calls"


def test_streamed_tool_calls_are_put_together() -> None:
    streamed = StreamedAnswer()
    pieces: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "memory_insert"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"label": "hu'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'man", "text": "x"}'}}]},
    ]
    for delta in pieces:
        streamed.add({"choices": [{"index": 0, "delta": delta}]})
    streamed.add({"choices": []})  # usage only

    (call,) = streamed.answer(step=1).tool_calls

    assert (call.id, call.name, call.parsed_arguments()) == (
        "c1",
        "memory_insert",
        {"label": "human", "text": "x"},
    )
    with pytest.raises(ServerStatus, match="overloaded"):
        streamed.add({"error": {"message": "overloaded", "code": 503}})


def test_system_prompt_lists_blocks_with_limits() -> None:
    blocks = [
        Block(id="b1", group_id="g", label="human", value="name: Ada", limit=50),
        Block(id="b2", group_id="g", label="rules", value="", limit=9, read_only=True),
    ]

    prompt = system_prompt("Be brief.", blocks, ["Answer in French."])

    assert prompt.startswith("Be brief.\n\nAnswer in French.\n\nMemory blocks")
    assert '<block label="human" chars="9/50">\nname: Ada\n</block>' in prompt
    assert '<block label="rules" chars="0/9" read_only="true">' in prompt
    assert system_prompt("Be brief.", []).endswith("There are no memory blocks.")


class _Editor:
    """A block store of one block, for the memory tools."""

    def __init__(self, block: Block) -> None:
        self.block = block

    def edit_block(self, block_id: str, change: Any, **by: Any) -> Block:
        self.block = self.block.model_copy(update={"value": change(self.block)})
        return self.block


def test_memory_tool_arguments_are_checked_before_the_tool_runs() -> None:
    editor = _Editor(Block(id="b", group_id="g", label="human", value="a", limit=100))
    memory = Memory(Blocks([editor.block]), editor)

    def call(name: str, arguments: str) -> tuple[bool, str]:
        result = call_memory_tool(memory, ToolCall(id="c", name=name, arguments=arguments))
        return result.ok, result.message

    assert call("memory_insert", '{"label": "human", "text": "b", "line": "1"}')[0]
    assert call("memory_insert", '{"label": "human", "text": "c", "extra": 1}')[0]
    assert call("memory_finish_edits", "")[0] and memory.finished
    assert call("memory_replace", '{"label": "human", "old": "a"}') == (
        False,
        "invalid arguments for memory_replace: new: Field required",
    )
    assert call("memory_rethink", "[1]") == (
        False,
        "the arguments of memory_rethink are not a JSON object: [1]",
    )
    deep = '{"label": "human", "text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert call("memory_insert", deep)[0] is False  # too deep to read: not a JSON object
    assert editor.block.value == "a\nb\nc"


def test_an_answer_nested_too_deeply_to_read_is_malformed() -> None:
    with pytest.raises(MalformedAnswer, match="not JSON"):
        _json_object(b"[" * 100_000 + b"]" * 100_000)
    assert error_message(b"[" * 100_000 + b"]" * 100_000).startswith("[[[")


def _stored(sequence: int, role: Any, text: str) -> Message:
    return Message(
        id=f"m{sequence}",
        agent_id="a",
        group_id="g",
        sequence=sequence,
        role=role,
        content=[TextContent(text=text)],
        created_at=datetime.now(UTC),
    )


def test_recent_chat_reads_the_store_only_when_the_turns_do_not_follow() -> None:
    loads: list[int] = []
    stored = [_stored(1, "user", "hi"), _stored(2, "assistant", "hello")]

    def load(limit: int) -> list[Message]:
        loads.append(limit)
        return stored[-limit:]

    recent = RecentChat(limit=3)
    assert recent.before([_stored(3, "user", "a")], load) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    recent.after([_stored(3, "user", "a")], MessageCreate(role="assistant", content="b"))
    # Turn 2 starts at sequence 5: the cache holds the last 3 messages, no read.
    assert recent.before([_stored(5, "user", "c")], load) == [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert loads == [3]
    recent.after([_stored(5, "user", "c")], None)
    recent.before([_stored(7, "user", "e")], load)  # 6 was recorded elsewhere: read again
    assert loads == [3, 3]
    assert RecentChat(limit=0).before([_stored(1, "user", "x")], load) == []


def test_fake_responders_play_both_agents() -> None:
    with FakeOpenAI(keep_notes) as fake:
        endpoint = ChatEndpoint(fake.url, api_key="k", timeout_s=5)
        tools = {"tools": [{"type": "function", "function": {"name": "memory_rethink"}}]}
        said = {"role": "user", "content": "Messages:\nuser: I like tea"}
        first = endpoint.complete({"model": "m", "messages": [said], **tools})
        done = endpoint.complete(
            {"model": "m", "messages": [said, {"role": "tool", "content": "{}"}], **tools}
        )
    assert parse_completion(first, 1).tool_calls[0].parsed_arguments() == {
        "label": "human",
        "text": "the user said: I like tea",
    }
    assert parse_completion(done, 2).tool_calls[0].name == "memory_finish_edits"
    assert answer_text(fake.received[0]).content == "fake answer"
