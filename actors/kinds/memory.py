"""The `memory` kind: a deterministic sleeptime agent that records user facts in a block."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from actors.sdk import AgentContext, AgentRole, Memory, ToolResult, parse_config
from messages import Message, MessageCreate, ToolCall

# A sentence ends at . ! ? ; before a space, except after a title such as "St." or "Dr.".
_SENTENCE_END = re.compile(r"(?<=[.!?;])(?<!\b[A-Z][a-z]\.)(?<!\bMrs\.)\s+|\n")
# "my name is Bob and I live in Paris" holds two facts; "pizza and pasta" holds one.
_CLAUSE_BREAK = re.compile(r",?\s+(?:and|but|so)\s+(?=(?:i|my|call)\b)", re.IGNORECASE)
_TRAILING = ".,!?;: \t"

# One row per phrasing: (pattern, attribute). A None attribute means the pattern captures
# it; the value is the rest of the clause. "my name is X" is covered by the first row.
FACT_PATTERNS: list[tuple[re.Pattern[str], str | None]] = [
    (
        re.compile(
            r"\bmy\s+(?P<attribute>[\w'-]+(?:\s+[\w'-]+){0,3}?)\s+(?:is|are)\s+(?P<value>.+)",
            re.IGNORECASE,
        ),
        None,
    ),
    (re.compile(r"\bI\s+live\s+in\s+(?P<value>.+)", re.IGNORECASE), "lives in"),
    (re.compile(r"\bI\s+work\s+as\s+an?\s+(?P<value>.+)", re.IGNORECASE), "job"),
    (re.compile(r"\bcall\s+me\s+(?P<value>.+)", re.IGNORECASE), "name"),
]


def extract_facts(text: str) -> list[tuple[str, str]]:
    """The (attribute, value) facts a user states in `text`, in the order stated.

    Attribute keys are lowercased, values keep their case; questions state nothing.

    >>> extract_facts("Hi! My favorite color is coral. Call me Ada.")
    [('favorite color', 'coral'), ('name', 'Ada')]
    """
    facts: list[tuple[str, str]] = []
    for sentence in _SENTENCE_END.split(text):
        if sentence.rstrip().endswith("?"):
            continue
        for clause in _CLAUSE_BREAK.split(sentence):
            for pattern, attribute in FACT_PATTERNS:
                found = pattern.search(clause)
                if found is None:
                    continue
                key = attribute or " ".join(found["attribute"].lower().split())
                value = found["value"].strip().rstrip(_TRAILING).strip()
                if value:
                    facts.append((key, value))
                    break
    return facts


def user_lines(transcript: str) -> list[str]:
    """What the users said in a transcript: the text of each user line after "Messages:".

    Lines of the primary agent ("assistant: ...") and the left-out marker ("[...]") are
    skipped; a speaker prefix ("user: ", "<name>: ") is removed.
    """
    lines = transcript.split("\n")
    if "Messages:" not in lines:
        return []
    said = []
    for line in lines[lines.index("Messages:") + 1 :]:
        if not line.strip() or line.startswith(("assistant: ", "[")):
            continue
        _, colon, rest = line.partition(": ")
        said.append(rest if colon else line)
    return said


def latest_facts(transcripts: Sequence[str]) -> dict[str, str]:
    """The facts stated in transcripts, one value per attribute: the latest statement wins."""
    facts: dict[str, str] = {}
    for transcript in transcripts:
        for line in user_lines(transcript):
            for attribute, value in extract_facts(line):
                facts.pop(attribute, None)
                facts[attribute] = value
    return facts


class MemoryConfig(BaseModel):
    """The config of a `memory` agent: the label of the block it writes facts into."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    block: str = "human"


@dataclass(frozen=True, slots=True)
class _Call:
    id: str
    name: str
    arguments: dict[str, Any]
    result: ToolResult


class _ToolLog:
    """Calls memory tools and remembers each call, to be returned as the run's history."""

    __slots__ = ("calls", "memory")

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.calls: list[_Call] = []

    def call(self, name: str, **arguments: Any) -> ToolResult:
        tool: Callable[..., ToolResult] = getattr(self.memory, name)
        call_id = f"call-{len(self.calls) + 1}"
        result = tool(**arguments, tool_call_id=call_id)
        self.calls.append(_Call(call_id, name, arguments, result))
        return result

    def messages(self) -> list[MessageCreate]:
        if not self.calls:
            return []
        tool_calls = [
            ToolCall(id=c.id, name=c.name, arguments=json.dumps(c.arguments)) for c in self.calls
        ]
        results = [
            MessageCreate(
                role="tool",
                tool_call_id=c.id,
                content=json.dumps({"message": c.result.message, "ok": c.result.ok}),
            )
            for c in self.calls
        ]
        return [MessageCreate(role="assistant", tool_calls=tool_calls), *results]


class MemoryAgent:
    """A sleeptime agent that records what users say about themselves in a block.

    It reads the user lines of its transcript, extracts facts such as "my favorite color is
    coral" (see `extract_facts`), and keeps one line "<attribute>: <value>" per attribute in
    its block, replacing an older value with the memory tools. It returns the tool calls it
    made, their results, and a summary.

    Example:
        >>> agent = MemoryAgent({"block": "human"})
    """

    agent_roles: ClassVar[tuple[AgentRole, ...]] = ("sleeptime",)

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = parse_config(MemoryConfig, config)

    def step(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> list[MessageCreate]:
        """Record the facts of the transcript(s) in `messages` and report what was done."""
        label = self.config.block
        facts = latest_facts([m.text() for m in messages if m.role == "user"])
        if context.memory.blocks.get(label) is None:
            labels = ", ".join(context.memory.blocks.labels()) or "none"
            summary = (
                (f"There is no block labelled {label!r} to remember facts in (blocks: {labels}).")
                if facts
                else "Nothing new to remember."
            )
            return [MessageCreate(role="assistant", content=summary)]
        log = _ToolLog(context.memory)
        remembered: list[str] = []
        failed: list[str] = []
        cancelled = False
        for attribute, value in facts.items():
            if context.cancelled():
                cancelled = True
                break
            result = _store_fact(log, label, attribute, value)
            if result is None:
                continue
            if result.ok:
                remembered.append(attribute)
            else:
                failed.append(f"{attribute} ({result.message})")
        if log.calls and not cancelled:
            log.call("memory_finish_edits")
        summary = _summary(remembered, failed, cancelled)
        return [*log.messages(), MessageCreate(role="assistant", content=summary)]


def _store_fact(log: _ToolLog, label: str, attribute: str, value: str) -> ToolResult | None:
    """Write "<attribute>: <value>" into the block; None when it is already there.

    A new attribute is inserted at the end; an older value is replaced, or, when its line
    also occurs inside another line, the block is rewritten with that line changed.
    """
    new_line = f"{attribute}: {value}"
    block = log.memory.blocks.get(label)  # None once deleted: the tool says so
    lines = (block.value if block is not None else "").split("\n")
    index = _line_of(lines, attribute)
    if index is None:
        return log.call("memory_insert", label=label, text=new_line, line=-1)
    old_line = lines[index]
    if old_line[len(attribute) + 2 :].strip() == value:
        return None
    result = log.call("memory_replace", label=label, old=old_line, new=new_line)
    # Only an old line that also occurs inside another line is worth a rewrite; any other
    # failure (read-only, cancelled, too long) would fail the rewrite too.
    if result.ok or "\n".join(lines).count(old_line) < 2:
        return result
    lines[index] = new_line
    kept = [line for i, line in enumerate(lines) if i <= index or not _states(line, attribute)]
    return log.call("memory_rethink", label=label, text="\n".join(kept))


def _line_of(lines: list[str], attribute: str) -> int | None:
    return next((i for i, line in enumerate(lines) if _states(line, attribute)), None)


def _states(line: str, attribute: str) -> bool:
    """Whether `line` is "<attribute>: ..." (key case-insensitive)."""
    return line.lower().startswith(f"{attribute}: ")


def _summary(remembered: list[str], failed: list[str], cancelled: bool) -> str:
    parts = []
    if remembered:
        parts.append(f"Remembered {len(remembered)} fact(s): {', '.join(remembered)}.")
    if failed:
        parts.append(f"Could not remember {len(failed)} fact(s): {'; '.join(failed)}.")
    if cancelled:
        parts.append("Stopped early: the run was cancelled.")
    return " ".join(parts) or "Nothing new to remember."
