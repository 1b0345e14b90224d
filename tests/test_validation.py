"""Bad input is refused at the boundary with a pydantic ValidationError that says what to fix."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from messages import DEFAULT_BLOCK_LIMIT, AgentSpec, BlockCreate, GroupCreate, MessageCreate


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
