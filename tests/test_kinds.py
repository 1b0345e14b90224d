"""The built-in agent kinds: scripted, memory and simulated."""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from actors._transcript import render_transcript
from actors.kinds import (
    MAX_LATENCY_MS,
    AgentContext,
    AgentKinds,
    Memory,
    MemoryAgent,
    ScriptedAgent,
    SimulatedAgent,
    SimulatedConfig,
    SimulatedFailure,
    builtin_kinds,
    extract_facts,
    sample_latency_ms,
)
from actors.kinds.memory import user_lines
from messages import (
    AgentRoleError,
    Block,
    Blocks,
    ImageContent,
    Message,
    MessageCreate,
    NotOwner,
    Role,
    ShardLost,
    TextContent,
    UnknownAgentKind,
)

# --- helpers ------------------------------------------------------------------------------


class InMemoryBlocks:
    """A `BlockEditor` that keeps blocks in a dict: each edit makes a new version."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = {block.id: block for block in blocks}
        self.edits = 0

    def edit_block(self, block_id: str, change: Callable[[Block], str], **by: Any) -> Block:
        block = self.blocks[block_id]
        updated = block.model_copy(update={"value": change(block), "version": block.version + 1})
        self.blocks[block_id] = updated
        self.edits += 1
        return updated


class RecordingEvent(threading.Event):
    """A cancel event whose `wait` records the timeout and returns at once (no real time)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def make_context(
    blocks: dict[str, str] | None = None,
    read_only: Sequence[str] = (),
    cancelled: bool = False,
) -> tuple[AgentContext, InMemoryBlocks]:
    """A context over in-memory blocks (default: empty `human` and `persona`)."""
    values = {"human": "", "persona": ""} if blocks is None else blocks
    stored = [
        Block(
            id=f"block-{label}",
            group_id="g1",
            label=label,
            value=value,
            limit=500,
            read_only=label in read_only,
        )
        for label, value in values.items()
    ]
    editor = InMemoryBlocks(stored)
    event = RecordingEvent()
    if cancelled:
        event.set()
    memory = Memory(Blocks(stored), editor, cancelled=event.is_set)
    context = AgentContext(
        agent_id="a1", group_id="g1", run_id="run-1", memory=memory, cancel_event=event
    )
    return context, editor


_sequence = iter(range(1, 1_000_000))


def message(role: Role, text: str | None, name: str | None = None) -> Message:
    content = [] if text is None else [TextContent(text=text)]
    n = next(_sequence)
    return Message(
        id=f"m{n}",
        agent_id="primary",
        group_id="g1",
        sequence=n,
        role=role,
        content=content,
        name=name,
        created_at=datetime.now(UTC),
    )


def transcript(*said: tuple[Role, str], preamble: str | None = None) -> Message:
    """The one user message a sleeptime agent receives for these primary messages."""
    window = [message(role, text) for role, text in said]
    return message("user", render_transcript(window, preamble=preamble))


def human(editor: InMemoryBlocks) -> str:
    return editor.blocks["block-human"].value


def tool_calls_of(output: Sequence[MessageCreate]) -> list[tuple[str, dict[str, Any], bool]]:
    """(tool name, arguments, ok) per tool call, checking that ids pair calls with results."""
    calls = [call for m in output for call in m.tool_calls or []]
    results = {m.tool_call_id: json.loads(m.text()) for m in output if m.role == "tool"}
    assert [c.id for c in calls] == list(results)
    return [(c.name, c.parsed_arguments() or {}, results[c.id]["ok"]) for c in calls]


# --- extract_facts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "facts"),
    [
        ("my favorite color is coral", [("favorite color", "coral")]),
        ("my favorite color is coral.", [("favorite color", "coral")]),
        ("My Favorite Color is Coral!", [("favorite color", "Coral")]),
        ("my favourite ice cream flavour is mint", [("favourite ice cream flavour", "mint")]),
        ("my favorite foods are pizza and pasta", [("favorite foods", "pizza and pasta")]),
        ("my dog's name is Rex", [("dog's name", "Rex")]),
        ("my height is 1.85 m.", [("height", "1.85 m")]),
        ("my name is Bob", [("name", "Bob")]),
        ("call me Ishmael.", [("name", "Ishmael")]),
        ("Please call me Dr. Watson", [("name", "Dr. Watson")]),
        ("I live in Paris", [("lives in", "Paris")]),
        ("i live in Paris, France.", [("lives in", "Paris, France")]),
        ("I live in St. Louis", [("lives in", "St. Louis")]),
        ("I work as an engineer", [("job", "engineer")]),
        ("I work as a nurse at St. Mary's.", [("job", "nurse at St. Mary's")]),
        ("my name is Bob and I live in Paris", [("name", "Bob"), ("lives in", "Paris")]),
        (
            "Hi! My favorite color is coral. Call me Ada.",
            [("favorite color", "coral"), ("name", "Ada")],
        ),
        (
            "my favorite color is orange, but my favorite food is sushi",
            [("favorite color", "orange"), ("favorite food", "sushi")],
        ),
        ("what's my name? my name is Zed.", [("name", "Zed")]),
        ("what is my favorite color?", []),
        ("is my name Bob?", []),
        ("my very own favorite ice cream flavor is mint", []),
        ("hello there", []),
        ("", []),
        ("my is", []),
    ],
)
def test_extract_facts(text: str, facts: list[tuple[str, str]]) -> None:
    assert extract_facts(text) == facts


@given(st.text())
def test_extract_facts_gives_lowercase_keys_and_stripped_values(text: str) -> None:
    for attribute, value in extract_facts(text):
        assert attribute and attribute == attribute.lower()
        assert value and value == value.strip()
        assert "\n" not in value


def test_user_lines_skip_preamble_assistant_lines_and_left_out_marker() -> None:
    text = (
        "<system-reminder>\nmy name is Preamble\n</system-reminder>\n\nMessages:\n"
        "[2 earlier message(s) of this conversation were left out]\n"
        "user: my favorite color is coral\n"
        "assistant: my favorite color is blue\n"
        "alice: I live in Oslo\n"
        "\n"
        "user: [Image Here]"
    )
    assert user_lines(text) == ["my favorite color is coral", "I live in Oslo", "[Image Here]"]
    assert user_lines("no messages header here\nuser: call me Al") == []


# --- memory -------------------------------------------------------------------------------


def test_memory_agent_replaces_an_older_value() -> None:
    context, editor = make_context()
    agent = MemoryAgent({})

    agent.step(
        context,
        [transcript(("user", "my favorite color is orange"), ("assistant", "Orange is lovely."))],
    )
    assert human(editor) == "favorite color: orange"

    output = agent.step(
        context,
        [transcript(("user", "actually, my favorite color is coral"), ("assistant", "Noted."))],
    )
    assert human(editor).split("\n") == ["favorite color: coral"]
    assert context.memory.value("human") == "favorite color: coral"
    assert tool_calls_of(output) == [
        (
            "memory_replace",
            {"label": "human", "old": "favorite color: orange", "new": "favorite color: coral"},
            True,
        ),
        ("memory_finish_edits", {}, True),
    ]
    assert output[-1] == MessageCreate(
        role="assistant", content="Remembered 1 fact(s): favorite color."
    )
    assert context.memory.finished


def test_memory_agent_history_pairs_each_tool_call_with_its_result() -> None:
    context, editor = make_context({"human": "name: Ada", "persona": ""})
    output = MemoryAgent({}).step(
        context,
        [
            transcript(
                ("user", "my favorite color is coral. I live in Oslo."),
                ("user", "call me Bea"),
            )
        ],
    )

    assert [m.role for m in output] == ["assistant", "tool", "tool", "tool", "tool", "assistant"]
    assert output[0].tool_calls is not None
    assert [c.id for c in output[0].tool_calls] == ["call-1", "call-2", "call-3", "call-4"]
    assert [m.tool_call_id for m in output[1:5]] == ["call-1", "call-2", "call-3", "call-4"]
    for result in output[1:5]:
        assert set(json.loads(result.text())) == {"message", "ok"}
    assert [name for name, _, _ in tool_calls_of(output)] == [
        "memory_insert",
        "memory_insert",
        "memory_replace",
        "memory_finish_edits",
    ]
    assert human(editor).split("\n") == [
        "name: Bea",
        "favorite color: coral",
        "lives in: Oslo",
    ]
    assert output[-1].text() == "Remembered 3 fact(s): favorite color, lives in, name."


def test_memory_agent_keeps_the_latest_statement_of_one_transcript() -> None:
    context, editor = make_context()
    MemoryAgent({}).step(
        context,
        [
            transcript(
                ("user", "my favorite color is orange"),
                ("assistant", "ok"),
                ("user", "no wait, my favorite color is coral"),
            )
        ],
    )
    assert human(editor) == "favorite color: coral"
    assert editor.edits == 1


def test_memory_agent_makes_no_edit_for_what_it_already_knows() -> None:
    context, editor = make_context({"human": "Favorite Color: coral"})
    output = MemoryAgent({}).step(context, [transcript(("user", "my favorite color is coral"))])
    assert editor.edits == 0
    assert output == [MessageCreate(role="assistant", content="Nothing new to remember.")]


def test_memory_agent_ignores_the_primary_agent_and_the_preamble() -> None:
    context, editor = make_context()
    output = MemoryAgent({}).step(
        context,
        [
            transcript(
                ("assistant", "my favorite color is blue"),
                ("user", "hello"),
                preamble="my name is Preamble",
            )
        ],
    )
    assert editor.edits == 0
    assert output[-1].text() == "Nothing new to remember."


def test_memory_agent_reads_named_users() -> None:
    context, editor = make_context()
    said = message("user", "I work as a baker", name="alice")
    MemoryAgent({}).step(context, [message("user", render_transcript([said]))])
    assert human(editor) == "job: baker"


def test_memory_agent_rewrites_the_block_when_the_old_line_is_not_unique() -> None:
    # "color: orange" also occurs inside "favorite color: orange", so replace refuses it.
    context, editor = make_context({"human": "favorite color: orange\ncolor: orange"})
    output = MemoryAgent({}).step(context, [transcript(("user", "my color is red"))])
    assert [(name, ok) for name, _, ok in tool_calls_of(output)] == [
        ("memory_replace", False),
        ("memory_rethink", True),
        ("memory_finish_edits", True),
    ]
    assert human(editor) == "favorite color: orange\ncolor: red"
    assert output[-1].text() == "Remembered 1 fact(s): color."


def test_memory_agent_writes_into_its_configured_block() -> None:
    context, editor = make_context({"human": "", "notes": "x"})
    MemoryAgent({"block": "notes"}).step(context, [transcript(("user", "call me Al"))])
    assert editor.blocks["block-notes"].value == "x\nname: Al"
    assert human(editor) == ""


def test_cancelled_memory_agent_makes_no_edits() -> None:
    context, editor = make_context(cancelled=True)
    output = MemoryAgent({}).step(context, [transcript(("user", "my favorite color is coral"))])
    assert editor.edits == 0
    assert human(editor) == ""
    assert not context.memory.finished
    assert output == [
        MessageCreate(role="assistant", content="Stopped early: the run was cancelled.")
    ]


def test_read_only_block_gives_a_failed_tool_result_not_a_crash() -> None:
    context, editor = make_context({"human": "favorite color: orange"}, read_only=["human"])
    output = MemoryAgent({}).step(
        context, [transcript(("user", "my favorite color is coral"), ("user", "call me Al"))]
    )
    calls = tool_calls_of(output)
    assert [(name, ok) for name, _, ok in calls] == [
        ("memory_replace", False),
        ("memory_insert", False),
        ("memory_finish_edits", True),
    ]
    results = [json.loads(m.text()) for m in output if m.role == "tool"]
    assert "read-only" in results[0]["message"]
    assert human(editor) == "favorite color: orange"
    assert output[-1].text().startswith("Could not remember 2 fact(s): favorite color (")


def test_memory_agent_reports_a_missing_block() -> None:
    context, editor = make_context({"persona": ""})
    output = MemoryAgent({}).step(context, [transcript(("user", "my favorite color is coral"))])
    assert editor.edits == 0
    assert len(output) == 1
    assert "no block labelled 'human'" in output[0].text()


def test_memory_agent_without_a_transcript_remembers_nothing() -> None:
    context, editor = make_context()
    output = MemoryAgent({}).step(
        context, [message("user", "my favorite color is coral"), message("user", None)]
    )
    assert editor.edits == 0
    assert output[-1].text() == "Nothing new to remember."


# --- scripted -----------------------------------------------------------------------------


def test_scripted_replies_cycle_one_per_step() -> None:
    context, _ = make_context()
    agent = ScriptedAgent({"replies": ["one", "two"]})
    said = [message("user", "hi")]
    replies = [agent.step(context, said) for _ in range(5)]
    assert [r[0].text() for r in replies] == ["one", "two", "one", "two", "one"]
    assert all(len(r) == 1 and r[0].role == "assistant" for r in replies)


@pytest.mark.parametrize(
    ("said", "answer"),
    [
        ("What is my favorite color?", "Your favorite color is coral."),
        ("what's my favorite color", "Your favorite color is coral."),
        ("WHAT\u2019S MY NAME?", "Your name is Ada."),
        ("Do you remember my name?", "Your name is Ada."),
        ("Hi. What is my job?", "I don't know your job yet."),
        ("hello", "Got it: hello."),
        ("is it   raining\ntoday?", "Got it: is it raining today?"),
        ("", "Got it."),
    ],
)
def test_scripted_answers_from_the_human_block(said: str, answer: str) -> None:
    context, _ = make_context({"human": "Favorite Color: coral\nname: Ada"})
    output = ScriptedAgent({}).step(context, [message("user", said)])
    assert output == [MessageCreate(role="assistant", content=answer)]


def test_scripted_answers_the_newest_user_message() -> None:
    context, _ = make_context({"human": "name: Ada"})
    said = [
        message("user", "what is my name?"),
        message("assistant", "hm"),
        message("user", "thanks"),
        message("system", "be nice"),
    ]
    assert ScriptedAgent({}).step(context, said)[0].text() == "Got it: thanks."


def test_scripted_without_a_human_block_does_not_know() -> None:
    context, _ = make_context({"persona": ""})
    output = ScriptedAgent({}).step(context, [message("user", "what is my name?")])
    assert output[0].text() == "I don't know your name yet."


def test_memory_improves_the_scripted_answer() -> None:
    context, _ = make_context()
    primary, sleeptime = ScriptedAgent({}), MemoryAgent({})
    question = [message("user", "what is my favorite color?")]
    assert primary.step(context, question)[0].text() == "I don't know your favorite color yet."
    sleeptime.step(context, [transcript(("user", "my favorite color is coral"))])
    assert primary.step(context, question)[0].text() == "Your favorite color is coral."


# Only text the runtime stores (utf-8: no surrogates; no NUL), and every message
# with content, as MessageCreate requires.
_chars = st.characters(codec="utf-8", exclude_characters="\x00")
_parts = st.one_of(
    st.builds(TextContent, text=st.text(_chars, min_size=1)),
    st.builds(ImageContent, url=st.none() | st.just("https://example.com/cat.png")),
)
_inputs = st.builds(
    MessageCreate,
    role=st.sampled_from(["user", "assistant", "system"]),
    content=st.text(_chars, min_size=1) | st.lists(_parts, min_size=1, max_size=3),
    name=st.none() | st.text(_chars, min_size=1, max_size=10),
)


@given(st.lists(_inputs, max_size=4), st.text(_chars, max_size=200))
def test_scripted_answers_any_input_with_one_message(
    inputs: list[MessageCreate], known: str
) -> None:
    context, _ = make_context({"human": known})
    output = ScriptedAgent({}).step(context, inputs)
    assert len(output) == 1
    assert output[0].role == "assistant"
    assert output[0].text()


# --- simulated ----------------------------------------------------------------------------


def outcomes(agent: SimulatedAgent, steps: int) -> tuple[list[str], list[float | None]]:
    context, _ = make_context()
    results = []
    for _ in range(steps):
        try:
            results.append(agent.step(context, [message("user", "hi")])[0].text())
        except SimulatedFailure:
            results.append("failed")
    assert isinstance(context.cancel_event, RecordingEvent)
    return results, context.cancel_event.waits


def test_simulated_same_seed_same_latencies_and_failures() -> None:
    config = {"latency_ms": 40, "distribution": "lognormal", "failure_rate": 0.5, "seed": 7}
    first, second = outcomes(SimulatedAgent(config), 50), outcomes(SimulatedAgent(config), 50)
    assert first == second
    assert {"ok", "failed"} <= set(first[0])
    assert outcomes(SimulatedAgent({**config, "seed": 8}), 50) != first


def test_simulated_waits_the_sampled_latency() -> None:
    config = {"latency_ms": 30, "distribution": "uniform", "jitter_ms": 10, "seed": 3}
    rng = random.Random(3)
    expected = []
    for _ in range(10):
        expected.append(sample_latency_ms(rng, SimulatedConfig.model_validate(config)) / 1000)
        rng.random()
    _, waits = outcomes(SimulatedAgent(config), 10)
    assert waits == expected
    assert all(w is not None and 0.02 <= w <= 0.04 for w in waits)


def test_simulated_failure_rate_one_always_fails() -> None:
    context, _ = make_context()
    agent = SimulatedAgent({"failure_rate": 1})
    for _ in range(20):
        with pytest.raises(SimulatedFailure, match=r"simulated failure \(failure_rate=1\)"):
            agent.step(context, [])


def test_simulated_failure_rate_zero_never_fails() -> None:
    results, waits = outcomes(SimulatedAgent({"reply": "pong"}), 200)
    assert results == ["pong"] * 200
    assert waits == []


def test_cancelled_simulated_agent_returns_nothing() -> None:
    context, _ = make_context(cancelled=True)
    assert SimulatedAgent({"latency_ms": 60_000, "failure_rate": 1}).step(context, []) == []


@given(
    latency=st.floats(0, MAX_LATENCY_MS),
    jitter=st.floats(0, MAX_LATENCY_MS),
    distribution=st.sampled_from(["constant", "uniform", "exponential", "lognormal"]),
    seed=st.integers(),
)
def test_sampled_latency_is_never_negative(
    latency: float, jitter: float, distribution: str, seed: int
) -> None:
    config = SimulatedConfig.model_validate(
        {"latency_ms": latency, "jitter_ms": jitter, "distribution": distribution}
    )
    rng = random.Random(seed)
    for _ in range(5):
        sample = sample_latency_ms(rng, config)
        assert math.isfinite(sample)
        assert 0 <= sample <= MAX_LATENCY_MS


@given(latency=st.floats(0, 10_000), jitter=st.floats(0, 10_000), seed=st.integers())
def test_constant_and_uniform_stay_within_the_jitter(
    latency: float, jitter: float, seed: int
) -> None:
    for distribution in ("constant", "uniform"):
        config = SimulatedConfig(latency_ms=latency, jitter_ms=jitter, distribution=distribution)
        sample = sample_latency_ms(random.Random(seed), config)
        assert max(0.0, latency - jitter) <= sample <= latency + jitter


def test_constant_without_jitter_is_exact() -> None:
    config = SimulatedConfig(latency_ms=25)
    assert {sample_latency_ms(random.Random(s), config) for s in range(10)} == {25.0}


@pytest.mark.parametrize(
    ("distribution", "statistic"),
    [("exponential", statistics.fmean), ("lognormal", statistics.median)],
)
def test_exponential_mean_and_lognormal_median_are_the_latency(
    distribution: str, statistic: Callable[[list[float]], float]
) -> None:
    config = SimulatedConfig.model_validate({"latency_ms": 100, "distribution": distribution})
    rng = random.Random(11)
    samples = [sample_latency_ms(rng, config) for _ in range(20_000)]
    assert statistic(samples) == pytest.approx(100, rel=0.05)


@pytest.mark.parametrize(
    "config",
    [
        {"latency_ms": -1},
        {"jitter_ms": -0.5},
        {"failure_rate": 1.5},
        {"failure_rate": -0.1},
        {"distribution": "normal"},
        {"latency_ms": float("inf")},
        {"latency_ms": MAX_LATENCY_MS + 1},
    ],
)
def test_simulated_rejects_bad_values(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SimulatedAgent(config)


# --- every kind ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["scripted", "memory", "simulated"])
def test_unknown_config_key_is_rejected_by_name(kind: str) -> None:
    with pytest.raises(ValidationError, match="latncy_ms"):
        builtin_kinds()[kind]({"latncy_ms": 5})


def test_builtin_kinds_build_through_the_registry() -> None:
    kinds = AgentKinds()
    for name, factory in builtin_kinds().items():
        kinds.register(name, factory)
    assert kinds.names() == ["memory", "openai", "scripted", "simulated"]
    assert isinstance(kinds.build("scripted", {"replies": ["hi"]}), ScriptedAgent)
    assert isinstance(kinds.build("memory", {"block": "notes"}), MemoryAgent)
    assert isinstance(kinds.build("simulated", {"seed": 1}), SimulatedAgent)
    with pytest.raises(ValidationError, match="colour"):
        kinds.build("memory", {"colour": "red"})


def test_builtin_kinds_declare_their_roles() -> None:
    kinds = AgentKinds()
    for name, factory in builtin_kinds().items():
        kinds.register(name, factory)
    roles = {name: kinds.roles(name) for name in kinds.names()}
    assert roles == {
        "memory": ("sleeptime",),
        "openai": ("primary", "sleeptime"),
        "scripted": ("primary",),
        "simulated": ("primary", "sleeptime"),
    }
    with pytest.raises(AgentRoleError, match="'memory' cannot be a primary agent") as error:
        kinds.check_role("memory", "primary")
    assert error.value.supported == ["sleeptime"]


def test_a_users_kind_plays_both_roles_unless_it_says_otherwise() -> None:
    kinds = AgentKinds()
    kinds.register("echo", lambda config: ScriptedAgent({}))
    kinds.register("notes", MemoryAgent, roles=["sleeptime"])
    kinds.register("both", MemoryAgent, roles=["sleeptime", "primary"])  # overrides agent_roles
    assert kinds.roles("echo") == ("primary", "sleeptime")
    assert kinds.roles("notes") == ("sleeptime",)
    assert kinds.roles("both") == ("sleeptime", "primary")
    with pytest.raises(UnknownAgentKind):
        kinds.roles("nobody")


@pytest.mark.parametrize(
    ("kind", "factory", "roles", "says"),
    [
        ("", ScriptedAgent, None, "kind"),
        ("a\x00", ScriptedAgent, None, "NUL"),
        (5, ScriptedAgent, None, "kind"),
        ("x" * 101, ScriptedAgent, None, "at most 100"),
        ("ok", "not callable", None, "callable"),
        ("ok", ScriptedAgent, [], "roles"),
        ("ok", ScriptedAgent, ["boss"], "roles"),
        ("ok", ScriptedAgent, "primary", "roles"),
    ],
    ids=["empty", "NUL", "not text", "too long", "factory", "no role", "unknown role", "str"],
)
def test_registering_a_bad_kind_is_refused(kind: Any, factory: Any, roles: Any, says: str) -> None:
    kinds = AgentKinds()
    with pytest.raises(ValidationError, match=says):
        kinds.register(kind, factory, roles=roles)
    assert kinds.names() == []


@pytest.mark.parametrize("error", [ShardLost(3), NotOwner("g1", 3)])
def test_a_memory_tool_answers_a_group_taken_over_with_a_tool_error(error: Exception) -> None:
    """A step resumed after its process lost the group's shard: the edit is fenced, and the
    agent reads why (a tool never raises into the agent)."""

    class TakenOver(InMemoryBlocks):
        def edit_block(self, block_id: str, change: Callable[[Block], str], **by: Any) -> Block:
            raise error

    block = Block(id="block-human", group_id="g1", label="human", value="", limit=500)
    memory = Memory(Blocks([block]), TakenOver([block]))
    result = memory.memory_insert("human", "likes tea")
    assert not result.ok and "cannot be edited from here" in result.message
