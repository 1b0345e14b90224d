"""The memory tools' edits as pure functions of a block's current value.

Each returns the new value or raises `MemoryToolError` with a message meant for the agent
(an LLM reads it and tries again), so a bad tool call never crashes a run. Text given
to a tool follows the text rule of `messages` (no NUL, no surrogate code points), as every
stored text does.
"""

from __future__ import annotations

from messages import Block
from messages._text import text_problem


class MemoryToolError(Exception):
    """A memory tool call that cannot be applied; the message tells the agent why."""


def check_text(name: str, value: object) -> str:
    """`value` if it is text a block can hold (the text rule of `messages`), else raise."""
    if not isinstance(value, str):
        raise MemoryToolError(f"{name} must be text, not {type(value).__name__}")
    problem = text_problem(value)
    if problem is not None:
        raise MemoryToolError(f"{name} cannot go into a memory block: {problem}")
    return value


def check_writable(block: Block) -> None:
    if block.read_only:
        raise MemoryToolError(f"block {block.label!r} is read-only and cannot be edited")


def check_fits(block: Block, value: str) -> str:
    if len(value) > block.limit:
        raise MemoryToolError(
            f"the edit would make block {block.label!r} {len(value)} characters long, over its "
            f"limit of {block.limit}: shorten or summarise it first"
        )
    return value


def replace(block: Block, old: str, new: str) -> str:
    """`old` must occur exactly once in the block; it becomes `new`."""
    check_writable(block)
    check_text("old text", old)
    check_text("new text", new)
    if not old:
        raise MemoryToolError("old text is empty: give the exact text to replace")
    count = _occurrences(block.value, old)
    if count == 0:
        raise MemoryToolError(f"old text {old!r} does not occur in block {block.label!r}")
    if count > 1:
        raise MemoryToolError(
            f"old text {old!r} occurs {count} times in block {block.label!r}: include more "
            "surrounding text so that it matches exactly once"
        )
    return check_fits(block, block.value.replace(old, new, 1))


def _occurrences(text: str, part: str) -> int:
    """How many times `part` occurs in `text`, overlapping ones included ("aa" in "aaa": 2)."""
    count, start = 0, text.find(part)
    while start != -1:
        count += 1
        start = text.find(part, start + 1)
    return count


def insert(block: Block, text: str, line: int = -1) -> str:
    """Insert `text` as line number `line` (0 = first); -1 appends at the end."""
    check_writable(block)
    check_text("text", text)
    if isinstance(line, bool) or not isinstance(line, int):
        raise MemoryToolError(f"line must be a whole number (-1 for the end), not {line!r}")
    lines = block.value.split("\n") if block.value else []
    if line == -1:
        line = len(lines)
    if not 0 <= line <= len(lines):
        raise MemoryToolError(
            f"line {line} is out of range for block {block.label!r}, which has {len(lines)} "
            f"line(s): use 0 to {len(lines)}, or -1 for the end"
        )
    lines[line:line] = text.split("\n")
    return check_fits(block, "\n".join(lines))


def rethink(block: Block, text: str) -> str:
    """Replace the whole block with `text`."""
    check_writable(block)
    check_text("text", text)
    return check_fits(block, text)
