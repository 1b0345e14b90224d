"""The text a sleeptime agent receives: a preamble, then one line per primary message.

Pure functions of stored messages; the line rules are those of SPEC 5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from messages import ImageContent, Message, ReasoningContent, TextContent
from messages._text import storable

DEFAULT_PREAMBLE = (
    "You are a sleeptime agent: a background agent that works on a conversation after it "
    "happened, not during it.\n\n"
    "You are NOT the primary agent. The messages below are a conversation that already took "
    "place between the primary agent and its user:\n"
    '- lines labelled "assistant" were written by the primary agent, not by you;\n'
    '- lines labelled "user" were written by the primary agent\'s user.\n\n'
    "Your job is memory management: read the conversation and use your memory tools to keep "
    "the memory blocks up to date with what is worth remembering. Follow the instructions in "
    "your memory_persona block."
)


def message_lines(message: Message) -> list[str]:
    """The transcript lines of one message (possibly none)."""
    if message.role == "user":
        return _user_lines(message)
    if message.role == "assistant":
        return _assistant_lines(message)
    if message.role == "tool":
        return _tool_lines(message)
    return []


def _user_lines(message: Message) -> list[str]:
    # A name on one line: a name with a line break in it cannot forge a line of its own.
    speaker = " ".join((message.name or "").split()) or "user"
    lines = []
    for part in message.content:
        if isinstance(part, TextContent):
            lines.append(f"{speaker}: {part.text}")
        elif isinstance(part, ImageContent):
            lines.append(f"{speaker}: [Image Here]")
    # A user message with no parts still shows that the user spoke: one empty line.
    return lines if message.content else [""]


def _assistant_lines(message: Message) -> list[str]:
    lines = []
    for part in message.content:
        if isinstance(part, TextContent):
            lines.append(f"assistant: {part.text}")
        elif isinstance(part, ReasoningContent):
            lines.append(f"assistant: <thinking>{part.text}</thinking>")
    for call in message.tool_calls or []:
        arguments = call.parsed_arguments()
        said = arguments.get("message") if arguments is not None else None
        if call.name == "send_message" and isinstance(said, str):
            lines.append(f"assistant: {said}")
        else:
            lines.append(f"assistant: Calling tool {call.name}")
    return lines


def _tool_lines(message: Message) -> list[str]:
    raw = message.text()
    try:
        result = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
        result = None
    if not isinstance(result, dict) or "message" not in result:
        # Never crash a run on a tool result we cannot read: say what it was instead.
        return [
            f"assistant: Tool call returned a result that is not JSON with a 'message' field: {raw}"
        ]
    said = result["message"]
    if said is None:
        return []
    return [f"assistant: Tool call returned {said if isinstance(said, str) else json.dumps(said)}"]


def render_transcript(
    window: Sequence[Message], preamble: str | None = None, max_messages: int | None = None
) -> str:
    """The whole transcript of a window, oldest message first.

    With `max_messages`, only the newest that many messages are rendered and the
    transcript says how many earlier ones were left out.
    """
    kept = list(window)
    lines: list[str] = []
    if max_messages is not None and len(kept) > max_messages:
        left_out = len(kept) - max_messages
        kept = kept[left_out:]
        lines.append(f"[{left_out} earlier message(s) of this conversation were left out]")
    for message in kept:
        lines.extend(message_lines(message))
    text = preamble if preamble is not None else DEFAULT_PREAMBLE
    rendered = f"<system-reminder>\n{text}\n</system-reminder>\n\nMessages:\n" + "\n".join(lines)
    # Text decoded from JSON (a tool result, a send_message call) may hold what the text
    # rule refuses ("\u0000" decodes to NUL): written as its escape, the transcript stays
    # storable and the run goes on.
    return storable(rendered)
