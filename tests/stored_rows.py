"""Stored-row fixtures shared by the tests of how rows are written: an instant, another
time zone, awkward text, and messages of every content kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from messages import ImageContent, Message, ReasoningContent, TextContent, ToolCall

AT = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
ELSEWHERE = timezone(timedelta(hours=5, minutes=30))  # stored as the same instant in UTC
UNICODE = 'h\u00e9llo \u2713 \u6f22\u5b57 \U0001f600 \u202e \u2028 "quoted" \\ back\nslash'


def message(number: int, **fields: Any) -> Message:
    values: dict[str, Any] = {
        "id": f"m-{number:03d}",
        "agent_id": "agent-p",
        "group_id": "g1",
        "sequence": number,
        "role": "user",
        "content": [TextContent(text="my favorite color is coral")],
        "created_at": AT,
    }
    return Message(**{**values, **fields})


# Every content kind, tool calls, unicode, None and set optional fields, other time zones.
MESSAGES = [
    message(1),
    message(2, content=[TextContent(text=UNICODE)], turn=4, run_id="r-created"),
    message(3, content=[ImageContent(url="https://example.com/a.png")]),
    message(4, content=[ImageContent(data="aGVsbG8=", media_type="image/png")]),
    message(5, content=[ReasoningContent(text="think"), TextContent(text="say")], role="assistant"),
    message(
        6,
        role="assistant",
        content=[],
        tool_calls=[
            ToolCall(id="call-1", name="core_memory_append", arguments='{"label": "human"}'),
            ToolCall(id="call-2", name="noop"),
        ],
    ),
    message(7, role="tool", tool_call_id="call-1", name="core_memory_append"),
    message(8, content=[TextContent(text="")], created_at=AT.astimezone(ELSEWHERE)),
    message(9, created_at=AT.replace(microsecond=0)),
    message(10, role="system", content=[TextContent(text="\x01 control ~ \t tab")]),
]
