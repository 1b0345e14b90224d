"""The memory tools as OpenAI function tools: their schemas, and running a model's call.

A call's arguments are checked before the tool runs; arguments that are not a JSON object,
or that miss or mistype a field, come back to the model as an error result it can act on,
exactly like a tool's own refusal (no match, line out of range, block too long).

Example:
    >>> result = call_memory_tool(context.memory, ToolCall(id="call_1", name="memory_rethink",
    ...                           arguments='{"label": "human", "text": "name: Ada"}'))
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from actors.sdk import Memory, ToolResult
from messages import MessageCreate, ToolCall

_LABEL = {"type": "string", "description": "The label of the memory block, e.g. human."}


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> Any:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


MEMORY_TOOLS: list[dict[str, Any]] = [
    _function(
        "memory_replace",
        "Replace text in a memory block. `old` must occur exactly once in the block: include "
        "enough surrounding text to make it unique. An empty `new` deletes `old`.",
        {
            "label": _LABEL,
            "old": {"type": "string", "description": "The exact text to replace."},
            "new": {"type": "string", "description": "The text to put in its place."},
        },
        ["label", "old", "new"],
    ),
    _function(
        "memory_insert",
        "Insert text into a memory block as a new line.",
        {
            "label": _LABEL,
            "text": {"type": "string", "description": "The text to insert."},
            "line": {
                "type": "integer",
                "description": "The line number it becomes (0 = first); -1, the default, "
                "appends it at the end.",
            },
        },
        ["label", "text"],
    ),
    _function(
        "memory_rethink",
        "Rewrite a memory block as a whole, e.g. to reorganise or condense it.",
        {"label": _LABEL, "text": {"type": "string", "description": "The block's new text."}},
        ["label", "text"],
    ),
    _function(
        "memory_finish_edits",
        "Say that the memory is up to date: call it when done, or when nothing needs changing.",
        {},
        [],
    ),
]
"""The tools offered to a sleeptime agent, in the chat-completions `tools` format."""


class _Arguments(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _Replace(_Arguments):
    label: str
    old: str
    new: str


class _Insert(_Arguments):
    label: str
    text: str
    line: int = -1


class _Rethink(_Arguments):
    label: str
    text: str


_ARGUMENTS: dict[str, type[_Arguments]] = {
    "memory_replace": _Replace,
    "memory_insert": _Insert,
    "memory_rethink": _Rethink,
    "memory_finish_edits": _Arguments,
}
TOOL_NAMES: tuple[str, ...] = tuple(_ARGUMENTS)
FINISH = "memory_finish_edits"


def call_memory_tool(memory: Memory, call: ToolCall) -> ToolResult:
    """Run one of the model's tool calls on `memory` (its name must be in `TOOL_NAMES`)."""
    schema = _ARGUMENTS[call.name]
    text = call.arguments.strip()
    arguments = call.parsed_arguments() if text else {}
    if arguments is None:
        shown = text if len(text) <= 200 else text[:200] + "..."
        return ToolResult(
            ok=False, message=f"the arguments of {call.name} are not a JSON object: {shown}"
        )
    try:
        checked = schema.model_validate(arguments)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in problem['loc']) or 'arguments'}: {problem['msg']}"
            for problem in error.errors()
        )
        return ToolResult(ok=False, message=f"invalid arguments for {call.name}: {problems}")
    match checked:
        case _Replace(label=label, old=old, new=new):
            return memory.memory_replace(label, old, new, tool_call_id=call.id)
        case _Insert(label=label, text=inserted, line=line):
            return memory.memory_insert(label, inserted, line, tool_call_id=call.id)
        case _Rethink(label=label, text=rewritten):
            return memory.memory_rethink(label, rewritten, tool_call_id=call.id)
        case _:
            return memory.memory_finish_edits(tool_call_id=call.id)


def tool_message(call: ToolCall, result: ToolResult) -> MessageCreate:
    """A tool result as stored and as sent back: `{"message": ..., "ok": ...}`."""
    content = json.dumps({"message": result.message, "ok": result.ok})
    return MessageCreate(role="tool", tool_call_id=call.id, content=content)
