"""The `scripted` kind: a deterministic primary agent for demos and tests."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from actors.sdk import AgentContext, AgentRole, parse_config
from messages import Message, MessageCreate

# "what is my X?", "what's my X?", "do you remember my X?"; X stops at the end of the sentence.
# \u2019 is the typographic apostrophe that phones type.
_QUESTION = re.compile(
    r"\b(?:what\s+is|what['\u2019]s|do\s+you\s+remember)\s+my\s+"
    r"(?P<attribute>[^?.!\n]+?)\s*(?:[?.!]|$)",
    re.IGNORECASE | re.MULTILINE,
)
_ACKNOWLEDGED_CHARS = 200


class ScriptedConfig(BaseModel):
    """The config of a `scripted` agent.

    `replies`, when non-empty, are answered in order, one per step, starting over at the end;
    each is a message, so it cannot be empty.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    replies: list[Annotated[str, Field(min_length=1)]] = []


class ScriptedAgent:
    """A primary agent that answers every input with one assistant message, deterministically.

    With `replies` it cycles through them; otherwise it answers "what is my X?" from the
    `human` block (so a demo shows memory improving) and acknowledges anything else.

    Example:
        >>> agent = ScriptedAgent({"replies": ["hello", "bye"]})
    """

    agent_roles: ClassVar[tuple[AgentRole, ...]] = ("primary",)

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = parse_config(ScriptedConfig, config)
        self._replies_given = 0

    def step(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> list[MessageCreate]:
        """Answer the newest user message with one assistant message."""
        return [MessageCreate(role="assistant", content=self._answer(context, messages))]

    def _answer(self, context: AgentContext, messages: Sequence[Message | MessageCreate]) -> str:
        if self.config.replies:
            reply = self.config.replies[self._replies_given % len(self.config.replies)]
            self._replies_given += 1
            return reply
        said = last_user_text(messages)
        human = context.memory.blocks.get("human")
        return answer_from_memory(said, human.value if human is not None else "")


def last_user_text(messages: Sequence[Message | MessageCreate]) -> str:
    """The text of the newest user message, or "" when there is none."""
    for message in reversed(messages):
        if message.role == "user":
            return message.text()
    return ""


def answer_from_memory(said: str, human: str) -> str:
    """The scripted reply to `said`, given the text of the `human` block.

    >>> answer_from_memory("What is my favorite color?", "favorite color: coral")
    'Your favorite color is coral.'
    """
    question = _QUESTION.search(said)
    if question is not None:
        attribute = " ".join(question["attribute"].lower().split())
        value = recall(human, attribute)
        if value is None:
            return f"I don't know your {attribute} yet."
        return f"Your {attribute} is {value}."
    text = " ".join(said.split())
    if not text:
        return "Got it."
    if len(text) > _ACKNOWLEDGED_CHARS:
        text = text[:_ACKNOWLEDGED_CHARS].rstrip() + "..."
    return f"Got it: {text}" if text[-1] in ".!?" else f"Got it: {text}."


def recall(human: str, attribute: str) -> str | None:
    """The value of the line "<attribute>: <value>" in a block (key case-insensitive)."""
    wanted = attribute.casefold()
    for line in human.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip().casefold() == wanted and value.strip():
            return value.strip()
    return None
