"""Bad input is refused at the boundary with a pydantic ValidationError that says what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from actors import Runtime
from messages import DEFAULT_BLOCK_LIMIT, MAX_RUN_TIMEOUT, AgentSpec, BlockCreate, MessageCreate
from messages._groups import GroupCreate
from messages._text import INT32_MAX, KIND_MAX_LENGTH, NAME_MAX_LENGTH


def group(**overrides: Any) -> GroupCreate:
    fields: dict[str, Any] = {"primary": {"kind": "scripted"}, "sleeptime": [{"kind": "memory"}]}
    return GroupCreate.model_validate({**fields, **overrides})


def locations(error: ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


# messages


def test_message_with_unknown_role() -> None:
    with pytest.raises(ValidationError) as error:
        MessageCreate(role="robot", content="beep")
    assert ("role",) in locations(error.value)
    assert "'user'" in str(error.value)  # lists the roles that are allowed


def test_tool_calls_on_a_user_message() -> None:
    with pytest.raises(ValidationError, match="only assistant messages carry tool_calls"):
        MessageCreate(
            role="user",
            content="hi",
            tool_calls=[{"id": "c1", "name": "send_message"}],
        )


def test_tool_message_without_tool_call_id() -> None:
    with pytest.raises(ValidationError, match="tool_call_id"):
        MessageCreate(role="tool", content='{"message": "ok"}')


def test_unknown_field() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as error:
        MessageCreate.model_validate({"role": "user", "content": "hi", "contents": "oops"})
    assert ("contents",) in locations(error.value)


def test_unknown_content_part_type() -> None:
    with pytest.raises(ValidationError, match="video"):
        MessageCreate.model_validate({"role": "user", "content": [{"type": "video"}]})


def test_tool_call_without_a_name() -> None:
    with pytest.raises(ValidationError, match="name"):
        MessageCreate.model_validate(
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {}}]}
        )


def test_well_formed_messages_pass() -> None:
    MessageCreate(role="user", content="hi", name="ada")
    MessageCreate(role="tool", content='{"message": "ok"}', tool_call_id="c1")
    MessageCreate(role="system", content="be brief")


# groups


def test_minimal_group_is_valid() -> None:
    created = group()
    assert created.frequency is None
    assert set(created.block_specs()) == {"human", "persona"}


@pytest.mark.parametrize("frequency", [None, 0, 1, 7])
def test_frequencies_that_are_accepted(frequency: int | None) -> None:
    assert group(frequency=frequency).frequency == frequency


@pytest.mark.parametrize("frequency", [-1, -5])
def test_negative_frequency(frequency: int) -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0") as error:
        group(frequency=frequency)
    assert ("frequency",) in locations(error.value)


def test_empty_sleeptime_list() -> None:
    with pytest.raises(ValidationError, match="at least 1") as error:
        group(sleeptime=[])
    assert ("sleeptime",) in locations(error.value)


def test_missing_primary() -> None:
    with pytest.raises(ValidationError) as error:
        GroupCreate.model_validate({"sleeptime": [{"kind": "memory"}]})
    assert ("primary",) in locations(error.value)


@pytest.mark.parametrize("label", ["", "1human", "has space", "bad/label", "x" * 65])
def test_bad_block_label(label: str) -> None:
    with pytest.raises(ValidationError, match="must start with a letter") as error:
        group(blocks={label: "value"})
    assert repr(label) in str(error.value)


def test_good_block_labels() -> None:
    labels = ["human", "persona", "Notes_2", "to-do", "x" * 64]
    assert set(group(blocks=dict.fromkeys(labels, "")).block_specs()) == set(labels)


def test_block_string_over_the_default_limit() -> None:
    with pytest.raises(ValidationError, match=f"limit of {DEFAULT_BLOCK_LIMIT}"):
        group(blocks={"human": "x" * (DEFAULT_BLOCK_LIMIT + 1)})
    group(blocks={"human": "x" * DEFAULT_BLOCK_LIMIT})


def test_block_over_the_limit_names_the_block() -> None:
    # With several blocks, the caller must learn which one is too long.
    with pytest.raises(ValidationError) as error:
        group(blocks={"persona": "ok", "human": "x" * (DEFAULT_BLOCK_LIMIT + 1)})
    assert "human" in str(error.value)
    with pytest.raises(ValidationError) as error:
        group(blocks={"persona": "ok", "human": {"value": "abcd", "limit": 3}})
    assert "human" in str(error.value)


def test_block_over_its_own_limit() -> None:
    with pytest.raises(ValidationError, match="limit of 3"):
        group(blocks={"human": {"value": "abcd", "limit": 3}})
    with pytest.raises(ValidationError, match="limit of 3"):
        BlockCreate(value="abcd", limit=3)


@pytest.mark.parametrize("limit", [0, -1])
def test_block_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValidationError, match="greater than 0") as error:
        BlockCreate(limit=limit)
    assert ("limit",) in locations(error.value)


def test_memory_persona_is_not_a_shared_block() -> None:
    with pytest.raises(ValidationError, match="memory_persona") as error:
        group(blocks={"memory_persona": "keep notes"})
    assert "config" in str(error.value)  # says where to set it instead


@pytest.mark.parametrize("run_timeout", [0, -1, -0.5])
def test_run_timeout_must_be_positive(run_timeout: float) -> None:
    with pytest.raises(ValidationError, match="greater than 0") as error:
        group(run_timeout=run_timeout)
    assert ("run_timeout",) in locations(error.value)


def test_max_attempts_zero() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1") as error:
        group(max_attempts=0)
    assert ("max_attempts",) in locations(error.value)


def test_transcript_max_messages_zero() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1") as error:
        group(transcript_max_messages=0)
    assert ("transcript_max_messages",) in locations(error.value)


def test_empty_preamble() -> None:
    with pytest.raises(ValidationError) as error:
        group(preamble="")
    assert ("preamble",) in locations(error.value)


def test_unknown_group_field() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as error:
        group(frequncy=2)
    assert ("frequncy",) in locations(error.value)


# agent specs


def test_agent_spec_needs_a_kind() -> None:
    with pytest.raises(ValidationError) as error:
        AgentSpec(kind="")
    assert ("kind",) in locations(error.value)


def test_agent_spec_unknown_field() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AgentSpec.model_validate({"kind": "memory", "cfg": {}})


def test_bad_sleeptime_spec_is_located() -> None:
    with pytest.raises(ValidationError) as error:
        group(sleeptime=[{"kind": "memory"}, {"config": {}}])
    assert ("sleeptime", 1, "kind") in locations(error.value)


# bounds: what PostgreSQL's columns refuse is refused on every backend


@pytest.mark.parametrize(
    "field", ["frequency", "transcript_max_messages", "max_attempts"], ids=lambda f: f
)
@pytest.mark.parametrize("value", [INT32_MAX + 1, 2**63, 2**64])
def test_integers_beyond_32_bits(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match="less than or equal to 2147483647") as error:
        group(**{field: value})
    assert (field,) in locations(error.value)
    assert getattr(group(**{field: INT32_MAX}), field) == INT32_MAX


@pytest.mark.parametrize("run_timeout", [float("inf"), float("nan"), MAX_RUN_TIMEOUT + 1])
def test_run_timeout_must_be_finite_and_sane(run_timeout: float) -> None:
    with pytest.raises(ValidationError) as error:
        group(run_timeout=run_timeout)
    assert ("run_timeout",) in locations(error.value)
    assert group(run_timeout=MAX_RUN_TIMEOUT).run_timeout == MAX_RUN_TIMEOUT


def test_block_limit_beyond_32_bits() -> None:
    with pytest.raises(ValidationError, match="2147483647"):
        BlockCreate(limit=INT32_MAX + 1)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"kind": "scripted", "name": "x" * (NAME_MAX_LENGTH + 1)}, "at most 200 characters"),
        ({"kind": "x" * (KIND_MAX_LENGTH + 1)}, "at most 100 characters"),
        ({"kind": 5}, "valid string"),
        ({"kind": b"scripted"}, "valid string"),
    ],
    ids=["long name", "long kind", "kind not text", "kind as bytes"],
)
def test_agent_spec_strings_fit_their_columns(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        AgentSpec.model_validate(spec)


@pytest.mark.parametrize("label", ["human\n", "human\x00"])
def test_block_label_with_a_trailing_control_character(label: str) -> None:
    with pytest.raises(ValidationError, match="must start with a letter"):
        group(blocks={label: ""})


def test_message_names_and_call_ids_fit_their_columns() -> None:
    long = "x" * (NAME_MAX_LENGTH + 1)
    with pytest.raises(ValidationError, match="at most 200 characters"):
        MessageCreate(role="user", content="hi", name=long)
    with pytest.raises(ValidationError, match="at most 200 characters"):
        MessageCreate(role="tool", content="{}", tool_call_id=long)


# content: what each role needs


@pytest.mark.parametrize("role", ["user", "system", "tool"])
@pytest.mark.parametrize(
    "content",
    ["", [], [{"type": "text", "text": ""}]],
    ids=["empty text", "no parts", "an empty text part"],
)
def test_message_without_content(role: str, content: Any) -> None:
    with pytest.raises(ValidationError, match="needs content"):
        MessageCreate.model_validate({"role": role, "content": content, "tool_call_id": "c1"})


def test_assistant_message_needs_content_or_tool_calls() -> None:
    with pytest.raises(ValidationError, match="needs content or tool_calls"):
        MessageCreate(role="assistant")
    calls_only = MessageCreate.model_validate(
        {"role": "assistant", "tool_calls": [{"id": "c1", "name": "memory_finish_edits"}]}
    )
    assert calls_only.parts() == []
    MessageCreate.model_validate(
        {"role": "assistant", "content": [{"type": "reasoning", "text": "hm"}]}
    )
    MessageCreate.model_validate({"role": "user", "content": [{"type": "image", "url": "u"}]})


# config: JSON that every backend stores alike


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"a": object()}, "config\\['a'\\] is of type 'object'"),
        ({"a": {"b": [1, float("inf")]}}, "config\\['a'\\]\\['b'\\]\\[1\\] is inf"),
        ({"a": b"x"}, "type 'bytes'"),
        ({1: "x"}, "key 1"),
        ({"a": {2: "x"}}, "key 2"),
        ({"a\x00": "x"}, "NUL"),
        ({"a": ["\ud800"]}, "surrogate"),
        ({"a": {1, 2}}, "type 'set'"),
        ([("a", 1)], "must be a JSON object"),
    ],
    ids=[
        "object",
        "inf",
        "bytes",
        "int key",
        "nested int key",
        "NUL key",
        "surrogate",
        "set",
        "list",
    ],
)
def test_config_must_be_json(config: Any, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        AgentSpec.model_validate({"kind": "simulated", "config": config})


def test_config_nested_too_deep() -> None:
    deep: Any = "leaf"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested more than"):
        AgentSpec(kind="simulated", config={"deep": deep})


def test_config_as_json_keeps_its_values() -> None:
    config = {"n": 2**70, "x": 1.5, "ok": True, "none": None, "pair": (1, "a"), "\U0001f600": "y"}
    assert AgentSpec(kind="simulated", config=config).config == {**config, "pair": [1, "a"]}


def test_tool_call_arguments_as_a_dict_must_be_json() -> None:
    with pytest.raises(ValidationError, match="tool call arguments"):
        MessageCreate.model_validate(
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "name": "f", "arguments": {"a": object()}}],
            }
        )


def test_stop_refuses_a_drain_timeout_that_is_not_seconds(tmp_path: Path) -> None:
    rt = Runtime.start(f"sqlite:///{tmp_path / 'stop.db'}")
    try:
        for bad in ("soon", -1, float("nan"), None):
            with pytest.raises(ValidationError):
                rt.stop(drain_timeout=bad)  # type: ignore[arg-type]
            assert not rt.stopped  # refused before anything stopped
    finally:
        rt.stop(drain_timeout=0)
    assert rt.stopped
