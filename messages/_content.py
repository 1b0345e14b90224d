"""Message content: what users send, what agents produce, and what is stored."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from messages._text import Name, NonEmptyText, Text, check_json_object

Role = Literal["user", "assistant", "tool", "system"]


class TextContent(BaseModel):
    """A plain text part of a message."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["text"] = "text"
    text: Text


class ImageContent(BaseModel):
    """An image part, by URL or inline data; transcripts show it as `[Image Here]`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["image"] = "image"
    url: Text | None = None
    data: Text | None = None
    media_type: Text | None = None


class ReasoningContent(BaseModel):
    """The agent's reasoning; transcripts show it inside `<thinking>` tags."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["reasoning"] = "reasoning"
    text: Text


ContentPart = Annotated[TextContent | ImageContent | ReasoningContent, Field(discriminator="type")]


def _content_shape(value: Any) -> str:
    return "text" if isinstance(value, str) else "parts"


# Tagged, so that a bad content reports only what is wrong with the shape it was given.
Content = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
    Discriminator(_content_shape),
]


class ToolCall(BaseModel):
    """One tool call of an assistant message.

    `arguments` is kept as the JSON text the model produced, as OpenAI does; the OpenAI
    shape `{"id", "type": "function", "function": {"name", "arguments"}}` and a dict of
    arguments are both accepted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: NonEmptyText
    name: NonEmptyText
    arguments: Text = "{}"

    @model_validator(mode="before")
    @classmethod
    def _flatten_openai_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and "function" in data:
            function = data["function"]
            if not isinstance(function, dict):
                raise ValueError("tool call 'function' must be an object with name and arguments")
            return {"id": data.get("id"), **function}
        return data

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_as_json(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return json.dumps(check_json_object(value, "tool call arguments"))
        return value

    def parsed_arguments(self) -> dict[str, Any] | None:
        """The arguments as a dict, or None when they are not a JSON object (nested too
        deeply to read included)."""
        try:
            parsed = json.loads(self.arguments)
        except (TypeError, ValueError, RecursionError):
            return None
        return parsed if isinstance(parsed, dict) else None


class MessageCreate(BaseModel):
    """A message as given to the runtime or produced by an agent, before it is stored.

    Example:
        >>> MessageCreate(role="user", content="my favorite color is orange")
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    role: Role
    content: Content = Field(default_factory=list)
    name: Name | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Name | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> MessageCreate:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r} ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if not self.has_content() and not (self.role == "assistant" and self.tool_calls):
            needs = "content or tool_calls" if self.role == "assistant" else "content"
            raise ValueError(
                f"a message of role {self.role!r} needs {needs}: give 'content' as "
                "non-empty text or a list of parts"
            )
        return self

    def has_content(self) -> bool:
        """Whether some part says something: an image, or text that is not empty."""
        if isinstance(self.content, str):  # one text part, without building it
            return bool(self.content)
        return any(isinstance(p, ImageContent) or p.text for p in self.content)

    def parts(self) -> list[TextContent | ImageContent | ReasoningContent]:
        """The content as a list of parts (a string is one text part)."""
        if isinstance(self.content, str):
            return [TextContent(text=self.content)]
        return list(self.content)

    def text(self) -> str:
        """All text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextContent))


class Message(BaseModel):
    """A stored message of one agent's history.

    `sequence` increases by one per message of that agent; transcript windows and the
    group's cursor are defined on it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    agent_id: str
    group_id: str
    sequence: int
    role: Role
    content: list[ContentPart]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    turn: int | None = None
    run_id: str | None = None
    created_at: datetime

    def text(self) -> str:
        """All text parts joined by newlines."""
        return "\n".join(p.text for p in self.content if isinstance(p, TextContent))
