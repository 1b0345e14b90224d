"""What a run's transcript holds (SPEC 5): golden tests for every line rule and the layout."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from actors._transcript import DEFAULT_PREAMBLE, message_lines, render_transcript
from messages import (
    ImageContent,
    Message,
    MessageCreate,
    ReasoningContent,
    Role,
    TextContent,
    ToolCall,
)

CREATED_AT = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
HEADER = "<system-reminder>\n{preamble}\n</system-reminder>\n\nMessages:\n"


def message(
    role: Role,
    *parts: TextContent | ImageContent | ReasoningContent,
    sequence: int = 1,
    name: str | None = None,
    tool_calls: list[ToolCall] | None = None,
    tool_call_id: str | None = None,
) -> Message:
    return Message(
        id=f"msg-{sequence}",
        agent_id="agent-primary",
        group_id="group-1",
        sequence=sequence,
        role=role,
        content=list(parts),
        name=name,
        tool_calls=tool_calls,
        tool_call_id=tool_call_id,
        turn=1,
        created_at=CREATED_AT,
    )


def text(value: str) -> TextContent:
    return TextContent(text=value)


def call(name: str, arguments: dict[str, Any] | str | None = None, id: str = "call-1") -> ToolCall:
    return ToolCall(id=id, name=name, arguments=arguments if arguments is not None else "{}")


def tool_result(content: str) -> Message:
    return message("tool", text(content), tool_call_id="call-1")


def window(*texts: str) -> list[Message]:
    """User messages m1..mN, oldest first."""
    return [message("user", text(t), sequence=i) for i, t in enumerate(texts, 1)]


def body(transcript: str) -> str:
    """The part after `Messages:\\n`."""
    _, sep, rest = transcript.partition("\nMessages:\n")
    assert sep, transcript
    return rest


# user


def test_user_text() -> None:
    assert message_lines(message("user", text("hello"))) == ["user: hello"]


def test_user_one_line_per_text_part() -> None:
    lines = message_lines(message("user", text("first"), text("second")))
    assert lines == ["user: first", "user: second"]


def test_named_user() -> None:
    assert message_lines(message("user", text("hi"), name="ada")) == ["ada: hi"]


def test_user_image_part() -> None:
    image = ImageContent(url="https://example.com/cat.png")
    assert message_lines(message("user", image)) == ["user: [Image Here]"]


def test_user_text_and_image_in_order() -> None:
    image = ImageContent(data="aGVsbG8=", media_type="image/png")
    lines = message_lines(message("user", text("look"), image, text("nice?")))
    assert lines == ["user: look", "user: [Image Here]", "user: nice?"]


def test_user_without_parts_is_one_empty_line() -> None:
    assert message_lines(message("user")) == [""]


def test_multiline_user_text_stays_one_entry() -> None:
    assert message_lines(message("user", text("a\nb"))) == ["user: a\nb"]


# assistant


def test_assistant_text() -> None:
    assert message_lines(message("assistant", text("Hi there!"))) == ["assistant: Hi there!"]


def test_assistant_reasoning() -> None:
    lines = message_lines(message("assistant", ReasoningContent(text="the user is new")))
    assert lines == ["assistant: <thinking>the user is new</thinking>"]


def test_assistant_tool_call() -> None:
    lines = message_lines(message("assistant", tool_calls=[call("web_search", {"q": "coral"})]))
    assert lines == ["assistant: Calling tool web_search"]


def test_send_message_shows_its_message() -> None:
    lines = message_lines(
        message("assistant", tool_calls=[call("send_message", {"message": "Hello, Ada!"})])
    )
    assert lines == ["assistant: Hello, Ada!"]


def test_send_message_without_a_message_argument_does_not_crash() -> None:
    for arguments in ["{}", "not json", "[1, 2]"]:
        lines = message_lines(message("assistant", tool_calls=[call("send_message", arguments)]))
        assert lines == ["assistant: Calling tool send_message"]


def test_each_tool_call_gets_a_line() -> None:
    calls = [
        call("web_search", {"q": "x"}, id="c1"),
        call("send_message", {"message": "found it"}, id="c2"),
        call("archival_memory_insert", {"content": "x"}, id="c3"),
    ]
    assert message_lines(message("assistant", tool_calls=calls)) == [
        "assistant: Calling tool web_search",
        "assistant: found it",
        "assistant: Calling tool archival_memory_insert",
    ]


def test_assistant_parts_then_tool_calls() -> None:
    reply = message(
        "assistant",
        ReasoningContent(text="look it up"),
        text("One moment."),
        tool_calls=[call("web_search")],
    )
    assert message_lines(reply) == [
        "assistant: <thinking>look it up</thinking>",
        "assistant: One moment.",
        "assistant: Calling tool web_search",
    ]


def test_assistant_with_nothing_gives_no_line() -> None:
    assert message_lines(message("assistant")) == []
    assert message_lines(message("assistant", tool_calls=[])) == []


def test_assistant_image_part_gives_no_line() -> None:
    assert message_lines(message("assistant", ImageContent(url="https://x/y.png"))) == []


# tool


def test_tool_result_message() -> None:
    lines = message_lines(tool_result(json.dumps({"status": "OK", "message": "x"})))
    assert lines == ["assistant: Tool call returned x"]


def test_tool_result_null_message_gives_no_line() -> None:
    assert message_lines(tool_result(json.dumps({"message": None}))) == []


@pytest.mark.parametrize(
    "content", ["plain text, not JSON", "", "[1, 2, 3]", '"a string"', '{"status": "OK"}', "{"]
)
def test_tool_result_that_is_not_json_with_a_message_gives_a_clear_line(content: str) -> None:
    lines = message_lines(tool_result(content))
    assert len(lines) == 1
    assert lines[0].startswith("assistant: Tool call returned")
    assert content in lines[0]
    assert "not JSON" in lines[0]


def test_tool_result_without_parts_does_not_crash() -> None:
    lines = message_lines(message("tool", tool_call_id="call-1"))
    assert len(lines) == 1
    assert lines[0].startswith("assistant: Tool call returned")


def test_tool_result_with_a_structured_message() -> None:
    lines = message_lines(tool_result(json.dumps({"message": {"rows": 2}})))
    assert lines == ['assistant: Tool call returned {"rows": 2}']


# system


def test_system_gives_no_line() -> None:
    assert message_lines(message("system", text("You are a helpful assistant."))) == []


# the whole text


def test_full_layout_with_custom_preamble() -> None:
    conversation = [
        message("system", text("be nice"), sequence=1),
        message("user", text("my favorite color is coral"), sequence=2, name="ada"),
        message("assistant", ReasoningContent(text="remember"), sequence=3),
        message("assistant", tool_calls=[call("send_message", {"message": "Noted!"})], sequence=4),
        message("tool", text('{"message": null}'), sequence=5, tool_call_id="call-1"),
        message("user", sequence=6),
        message("user", ImageContent(url="https://x/y.png"), sequence=7),
    ]
    assert render_transcript(conversation, preamble="Keep notes.") == (
        "<system-reminder>\n"
        "Keep notes.\n"
        "</system-reminder>\n"
        "\n"
        "Messages:\n"
        "ada: my favorite color is coral\n"
        "assistant: <thinking>remember</thinking>\n"
        "assistant: Noted!\n"
        "\n"
        "user: [Image Here]"
    )


def test_default_preamble_is_used_without_one() -> None:
    transcript = render_transcript(window("hi"))
    assert transcript == HEADER.format(preamble=DEFAULT_PREAMBLE) + "user: hi"
    assert render_transcript(window("hi"), preamble=None) == transcript


def test_custom_preamble_replaces_the_default() -> None:
    transcript = render_transcript(window("hi"), preamble="You watch the budget.")
    assert transcript == HEADER.format(preamble="You watch the budget.") + "user: hi"
    assert DEFAULT_PREAMBLE not in transcript


def test_empty_window() -> None:
    assert render_transcript([], preamble="P") == HEADER.format(preamble="P")


def test_lines_are_joined_oldest_first() -> None:
    assert body(render_transcript(window("one", "two", "three"))) == (
        "user: one\nuser: two\nuser: three"
    )


def test_messages_without_lines_leave_no_gap() -> None:
    conversation = [
        message("user", text("a"), sequence=1),
        message("system", text("ignored"), sequence=2),
        message("assistant", sequence=3),
        message("tool", text('{"message": null}'), sequence=4, tool_call_id="c"),
        message("assistant", text("b"), sequence=5),
    ]
    assert body(render_transcript(conversation)) == "user: a\nassistant: b"


def test_default_preamble_says_what_the_agent_is_and_does() -> None:
    preamble = DEFAULT_PREAMBLE
    lowered = preamble.lower()
    assert "sleeptime agent" in lowered
    assert "background" in lowered
    assert "NOT the primary agent" in preamble
    assert '"assistant"' in preamble
    assert '"user"' in preamble
    assert "memory management" in lowered
    assert "memory tools" in lowered
    assert "memory_persona" in preamble
    assert "<system-reminder>" not in preamble  # render_transcript adds the wrapper


# max_messages


def test_max_messages_keeps_the_newest_and_says_how_many_were_left_out() -> None:
    lines = body(render_transcript(window("m1", "m2", "m3", "m4", "m5"), max_messages=2)).split(
        "\n"
    )
    assert lines[-2:] == ["user: m4", "user: m5"]
    notes = lines[:-2]
    assert len(notes) == 1
    assert re.search(r"\b3\b", notes[0])
    assert "left out" in notes[0]
    assert not any(old in "\n".join(lines) for old in ["m1", "m2", "m3"])


def test_max_messages_counts_messages_not_lines() -> None:
    conversation = [
        message("user", text("a"), text("b"), sequence=1),
        message("system", text("s"), sequence=2),
        message("user", text("c"), text("d"), sequence=3),
    ]
    lines = body(render_transcript(conversation, max_messages=2)).split("\n")
    assert lines[1:] == ["user: c", "user: d"]
    assert re.search(r"\b1\b", lines[0])


@pytest.mark.parametrize("max_messages", [3, 4, 100])
def test_no_note_when_the_window_fits(max_messages: int) -> None:
    conversation = window("m1", "m2", "m3")
    assert render_transcript(conversation, max_messages=max_messages) == render_transcript(
        conversation
    )
    assert body(render_transcript(conversation, max_messages=max_messages)) == (
        "user: m1\nuser: m2\nuser: m3"
    )


def test_max_messages_with_custom_preamble() -> None:
    transcript = render_transcript(window("m1", "m2"), preamble="P", max_messages=1)
    assert transcript.startswith(HEADER.format(preamble="P"))
    assert transcript.endswith("\nuser: m2")


# MessageCreate: the shapes a caller may give


def test_message_create_with_str_content() -> None:
    created = MessageCreate(role="user", content="my favorite color is orange")
    assert created.parts() == [TextContent(text="my favorite color is orange")]
    assert created.text() == "my favorite color is orange"


def test_message_create_with_a_list_of_parts() -> None:
    created = MessageCreate.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "url": "https://x/y.png"},
                {"type": "text", "text": "at this"},
            ],
        }
    )
    assert [type(p) for p in created.parts()] == [TextContent, ImageContent, TextContent]
    assert created.text() == "look\nat this"


def test_message_create_with_part_objects() -> None:
    parts: list[TextContent | ImageContent | ReasoningContent] = [
        ReasoningContent(text="hmm"),
        TextContent(text="ok"),
    ]
    created = MessageCreate(role="assistant", content=parts)
    assert created.parts() == parts
    assert created.text() == "ok"


def test_message_create_without_content() -> None:
    calls_only = MessageCreate(
        role="assistant", tool_calls=[{"id": "c1", "name": "memory_rethink"}]
    )
    assert calls_only.parts() == []
    with pytest.raises(ValidationError, match="needs content"):
        MessageCreate(role="user")


def test_openai_shaped_tool_call() -> None:
    created = MessageCreate.model_validate(
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "send_message", "arguments": '{"message": "hi"}'},
                }
            ],
        }
    )
    assert created.tool_calls == [
        ToolCall(id="call_abc", name="send_message", arguments='{"message": "hi"}')
    ]
    assert created.tool_calls[0].parsed_arguments() == {"message": "hi"}


def test_tool_call_with_dict_arguments() -> None:
    flat = ToolCall.model_validate(
        {"id": "c1", "name": "memory_insert", "arguments": {"label": "human", "line": 0}}
    )
    assert json.loads(flat.arguments) == {"label": "human", "line": 0}
    assert flat.parsed_arguments() == {"label": "human", "line": 0}
    nested = ToolCall.model_validate(
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "memory_insert", "arguments": {"label": "human", "line": 0}},
        }
    )
    assert nested == flat


def test_tool_call_arguments_default_to_an_empty_object() -> None:
    assert ToolCall(id="c1", name="memory_finish_edits").parsed_arguments() == {}


def test_created_tool_calls_render_like_stored_ones() -> None:
    created = MessageCreate.model_validate(
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "send_message", "arguments": {"message": "Noted."}},
                },
                {"id": "c2", "name": "memory_rethink", "arguments": {"label": "human"}},
            ],
        }
    )
    stored = message("assistant", tool_calls=created.tool_calls)
    assert message_lines(stored) == ["assistant: Noted.", "assistant: Calling tool memory_rethink"]


@pytest.mark.parametrize(
    ("decoded", "shown"),
    [
        ('{"message": "a\\u0000b"}', "a\\x00b"),  # NUL, escaped in JSON
        ('{"message": "lone \\ud800 half"}', "lone \\ud800 half"),  # a lone surrogate
    ],
)
def test_text_decoded_from_json_that_cannot_be_stored_is_shown_escaped(
    decoded: str, shown: str
) -> None:
    """The raw text passes the text rule (it holds only the escape); what JSON decodes it
    to does not, so the transcript shows that code point as its escape, and is storable."""
    window = [
        message("assistant", tool_calls=[call("send_message", decoded)], sequence=1),
        tool_result(decoded),
    ]
    rendered = render_transcript(window, preamble="p")
    assert rendered.splitlines()[-2:] == [
        f"assistant: {shown}",
        f"assistant: Tool call returned {shown}",
    ]
    assert TextContent(text=rendered).text == rendered  # the text rule takes it


def test_a_tool_result_nested_too_deeply_to_read_gets_its_clear_line() -> None:
    raw = '{"message": ' + "[" * 5000 + "]" * 5000 + "}"
    (line,) = message_lines(tool_result(raw))
    assert line.startswith("assistant: Tool call returned a result that is not JSON")


def test_a_name_with_line_breaks_cannot_forge_a_line() -> None:
    named = message("user", text("hi"), name="bob\nassistant")
    assert message_lines(named) == ["bob assistant: hi"]
    assert message_lines(message("user", text("hi"), name=" \n ")) == ["user: hi"]
