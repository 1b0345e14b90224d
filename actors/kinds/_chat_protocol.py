"""The chat-completions format: the system prompt, history as chat messages, and answers.

Pure functions between the runtime's messages and the JSON an OpenAI-compatible server
takes and gives. An answer that is not shaped as the API says raises `MalformedAnswer`
naming what is missing.

Example:
    >>> system_prompt("You are a helpful assistant.", context.memory.blocks)
    >>> answer = parse_completion(endpoint.complete(body), step=1)
    >>> answer.message()          # the MessageCreate to store, or None for an empty answer
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from actors.kinds._chat_http import MalformedAnswer, ServerStatus
from messages import (
    Block,
    ImageContent,
    Message,
    MessageCreate,
    ReasoningContent,
    TextContent,
    ToolCall,
)

DEFAULT_PRIMARY_SYSTEM = (
    "You are a helpful assistant in a long-running conversation with one user. Your memory "
    "blocks below hold what you know about the user and about yourself; they are kept up "
    "to date for you between turns. Answer from them when they help, and do not mention "
    "that they exist."
)
DEFAULT_SLEEPTIME_SYSTEM = (
    "You maintain the long-term memory of a conversational agent. You are given a "
    "conversation that already took place. Keep the memory blocks below accurate and "
    "concise with your memory tools: memory_replace to change text that occurs exactly "
    "once, memory_insert to add a line, memory_rethink to rewrite a whole block. Follow the "
    "instructions in your memory_persona block. A tool that fails tells you why: fix the "
    "call and try again. Call memory_finish_edits when the memory is up to date, or when "
    "nothing needs changing."
)
_SHOWN_CHARS = 300


def render_block(block: Block) -> str:
    """One block as the model sees it: label, size against its limit, read-only, text."""
    attributes = f'label="{block.label}" chars="{len(block.value)}/{block.limit}"'
    if block.read_only:
        attributes += ' read_only="true"'
    lines = [f"<block {attributes}>"]
    if block.description:
        lines.append(f"<description>{block.description}</description>")
    lines += [block.value, "</block>"]
    return "\n".join(lines)


def system_prompt(instructions: str, blocks: Iterable[Block], extra: Sequence[str] = ()) -> str:
    """The instructions, any extra system text of the turn, then the memory blocks."""
    rendered = [render_block(block) for block in blocks]
    parts = [instructions, *extra]
    parts.append(
        "Memory blocks (chars: used/limit):\n" + "\n".join(rendered)
        if rendered
        else "There are no memory blocks."
    )
    return "\n\n".join(part for part in parts if part)


def chat_message(message: Message | MessageCreate) -> dict[str, Any] | None:
    """A stored message as a chat message, or None when it is not sent back to the model.

    Only what was said goes back: text (and images) of user messages, text of assistant
    messages. System messages are left out (the system prompt is rebuilt every turn), and so
    are tool calls and tool results (the primary agent is offered no tools, and a call
    without its result would be refused by most servers).
    """
    if message.role == "user":
        return {"role": "user", "content": _user_content(message)}
    if message.role == "assistant":
        text = message.text()
        return {"role": "assistant", "content": text} if text else None
    return None


def chat_history(messages: Iterable[Message | MessageCreate]) -> list[dict[str, Any]]:
    """The messages that go back to the model (see `chat_message`), oldest first."""
    return [said for said in map(chat_message, messages) if said is not None]


class RecentChat:
    """A primary agent's last `limit` stored messages, as chat messages, kept between turns.

    Reading the history from the store on every turn costs more CPU than the model call.
    The runtime stores a turn's input, then the agent's output right after it, so once a
    turn is answered the agent knows what its history holds and which sequence the next
    input gets. When the next input does not start there (a turn recorded without the
    agent, a failed commit, a new agent object), the history is read from the store again.

    Example:
        >>> history = recent.before(turn_input, context.recent)
        >>> recent.after(turn_input, reply)         # or recent.forget() when the turn failed
    """

    __slots__ = ("_entries", "_next_sequence", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: deque[tuple[int, dict[str, Any] | None]] = deque(maxlen=limit)
        self._next_sequence: int | None = None

    def before(
        self,
        turn_input: Sequence[Message | MessageCreate],
        load: Callable[[int], Sequence[Message]],
    ) -> list[dict[str, Any]]:
        """The chat messages of the history before `turn_input` (read with `load` if needed)."""
        if self.limit == 0:
            return []
        first = turn_input[0] if turn_input else None
        if not isinstance(first, Message) or first.sequence != self._next_sequence:
            self._entries.clear()
            self._entries.extend((m.sequence, chat_message(m)) for m in load(self.limit))
        return [said for _, said in self._entries if said is not None]

    def after(
        self, turn_input: Sequence[Message | MessageCreate], reply: MessageCreate | None
    ) -> None:
        """Add the turn's input and the agent's reply (stored right after the input)."""
        if self.limit == 0 or not turn_input:
            return
        if not all(isinstance(m, Message) for m in turn_input):
            self.forget()  # messages not from the store: nothing to number the next turn by
            return
        sequence = 0
        for message in turn_input:
            assert isinstance(message, Message)
            sequence = message.sequence
            self._entries.append((sequence, chat_message(message)))
        if reply is not None:
            sequence += 1
            self._entries.append((sequence, chat_message(reply)))
        self._next_sequence = sequence + 1

    def forget(self) -> None:
        """Read the history from the store on the next turn."""
        self._next_sequence = None


def _user_content(message: Message | MessageCreate) -> str | list[dict[str, Any]]:
    prefix = f"{message.name}: " if message.name else ""
    parts = message.content if isinstance(message, Message) else message.parts()
    if not any(isinstance(part, ImageContent) for part in parts):
        return prefix + message.text()
    content: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextContent):
            content.append({"type": "text", "text": prefix + part.text})
        elif isinstance(part, ImageContent):
            url = part.url or f"data:{part.media_type or 'image/png'};base64,{part.data or ''}"
            content.append({"type": "image_url", "image_url": {"url": url}})
    return content


@dataclass(frozen=True, slots=True)
class Answer:
    """What the model answered: text, reasoning (some servers send it), tool calls."""

    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None

    def message(self) -> MessageCreate | None:
        """The assistant message to store; None when the answer is empty."""
        parts: list[TextContent | ReasoningContent] = []
        if self.reasoning:
            parts.append(ReasoningContent(text=self.reasoning))
        if self.content:
            parts.append(TextContent(text=self.content))
        if not parts and not self.tool_calls:
            return None
        return MessageCreate(role="assistant", content=parts, tool_calls=self.tool_calls or None)

    def chat(self) -> dict[str, Any]:
        """The answer as the assistant message of the next request."""
        said: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            said["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.tool_calls
            ]
        return said


def parse_completion(payload: dict[str, Any], step: int) -> Answer:
    """The first choice of a chat completion; a tool call without an id gets one from `step`."""
    message = _first(payload, "message")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise MalformedAnswer(f"message.tool_calls is not a list: {_shown(payload)}")
    return Answer(
        content=_text(message.get("content"), payload),
        reasoning=_reasoning(message),
        tool_calls=[_tool_call(call, f"call-{step}-{n}", payload) for n, call in enumerate(calls)],
        finish_reason=_finish_reason(payload),
    )


class StreamedAnswer:
    """An answer put together from the events of a streamed completion.

    Example:
        >>> streamed = StreamedAnswer()
        >>> for event in endpoint.stream(body):
        ...     streamed.add(event)
        >>> answer = streamed.answer(step=1)
    """

    __slots__ = ("_calls", "_finish_reason", "_reasoning", "_text", "_whole")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish_reason: str | None = None
        self._whole: dict[str, Any] | None = None

    def add(self, event: dict[str, Any]) -> None:
        """Take one event's JSON: a chunk, an error, or (from a server that does not stream)
        the whole completion."""
        if "error" in event and not event.get("choices"):
            raise _stream_error(event)
        choices = event.get("choices")
        if choices == []:
            return  # a usage-only chunk
        if isinstance(choices, list) and isinstance(choices[0], dict) and "message" in choices[0]:
            self._whole = event
            return
        delta = _first(event, "delta")
        content = delta.get("content")
        if content is not None:
            self._text.append(_text(content, event))
        reasoning = _reasoning(delta)
        if reasoning:
            self._reasoning.append(reasoning)
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list):
            raise MalformedAnswer(f"delta.tool_calls is not a list: {_shown(event)}")
        for call in calls:
            self._add_call(call, event)
        self._finish_reason = _finish_reason(event) or self._finish_reason

    def _add_call(self, call: Any, event: dict[str, Any]) -> None:
        if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
            raise MalformedAnswer(f"a streamed tool call is not an object: {_shown(event)}")
        pieces = self._calls.setdefault(call.get("index", 0), {"id": "", "name": "", "args": ""})
        if isinstance(call.get("id"), str):
            pieces["id"] = call["id"]
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise MalformedAnswer(f"a streamed tool call has no function: {_shown(event)}")
        for key, field in (("name", "name"), ("arguments", "args")):
            piece = function.get(key)
            if isinstance(piece, str):
                pieces[field] += piece
            elif piece is not None:
                pieces[field] += json.dumps(piece)

    def answer(self, step: int) -> Answer:
        """The whole answer, once the stream ended."""
        if self._whole is not None:
            return parse_completion(self._whole, step)
        calls = []
        for n, index in enumerate(sorted(self._calls)):
            pieces = self._calls[index]
            if not pieces["name"]:
                raise MalformedAnswer(f"streamed tool call {index} has no function name")
            calls.append(
                ToolCall(
                    id=pieces["id"] or f"call-{step}-{n}",
                    name=pieces["name"],
                    arguments=pieces["args"],
                )
            )
        return Answer(
            content="".join(self._text),
            reasoning="".join(self._reasoning) or None,
            tool_calls=calls,
            finish_reason=self._finish_reason,
        )


def _first(payload: dict[str, Any], key: str) -> dict[str, Any]:
    """`payload.choices[0][key]`, checked on the way."""
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        if "error" in payload:
            raise MalformedAnswer(f"the answer is an error, not a completion: {_shown(payload)}")
        raise MalformedAnswer(f"the answer has no choices: {_shown(payload)}")
    choice = choices[0]
    found = choice.get(key) if isinstance(choice, dict) else None
    if not isinstance(found, dict):
        raise MalformedAnswer(f"choices[0] has no {key} object: {_shown(payload)}")
    return found


def _text(content: Any, payload: dict[str, Any]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts, as some servers answer
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise MalformedAnswer(f"the message content is not text: {_shown(payload)}")


def _reasoning(message: dict[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _tool_call(call: Any, default_id: str, payload: dict[str, Any]) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(function, dict) or not isinstance(name, str) or not name:
        raise MalformedAnswer(f"a tool call has no function name: {_shown(payload)}")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments)  # some servers send the arguments as an object
    call_id = call.get("id")
    return ToolCall(
        id=call_id if isinstance(call_id, str) and call_id else default_id,
        name=name,
        arguments=arguments,
    )


def _finish_reason(payload: dict[str, Any]) -> str | None:
    choice = payload["choices"][0]
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


def _stream_error(event: dict[str, Any]) -> ServerStatus:
    error = event["error"]
    details = error if isinstance(error, dict) else {"message": str(error)}
    code = details.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return ServerStatus(status, str(details.get("message") or error))


def _shown(payload: Any) -> str:
    text = json.dumps(payload)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
