r"""What the runtime accepts to store: one rule for text, and the bounds of its columns.

The text rule: stored text is a string of Unicode scalar values without NUL, that is no
U+0000 and no code point in U+D800..U+DFFF (a lone surrogate, or a pair of surrogates
left as two code points). PostgreSQL cannot store either, and SQLite stores them only to
give some back altered (a surrogate pair comes back as the one character it encodes), so
both backends refuse them here, the same way, before anything is written.

Example:
    >>> MessageCreate(role="user", content="I like \U0001f600")      # one code point: fine
    >>> MessageCreate(role="user", content="I like \ud83d\ude00")   # ValidationError
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationInfo

INT32_MAX: Final = 2**31 - 1
"""The largest value of an Integer column (32 bits on PostgreSQL)."""
ID_MAX_LENGTH: Final = 64
NAME_MAX_LENGTH: Final = 200
KIND_MAX_LENGTH: Final = 100
MAX_JSON_DEPTH: Final = 32
STORED: Final = MappingProxyType({"stored": True})
"""Validation context for rows read back from the database: they are taken as they are,
so rows written before the text rule existed stay readable."""

_REFUSED = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored under the text rule, or None when it can."""
    found = _REFUSED.search(value)
    if found is None:
        return None
    char, index = found.group(), found.start()
    if char == "\x00":
        return (
            f"text holds a NUL character (U+0000) at index {index}: remove it, stored text "
            "cannot contain NUL"
        )
    return (
        f"text holds a surrogate code point (U+{ord(char):04X}) at index {index}: stored "
        "text must be valid Unicode; give a character outside the BMP as one code point "
        "(e.g. '\\U0001F600', not the pair '\\ud83d\\ude00') and remove lone surrogates"
    )


def check_text(value: str) -> str:
    """Return `value` if it follows the text rule, else raise ValueError saying why."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def storable(text: str) -> str:
    """`text` with each code point the text rule refuses written as its escape (`\\x00`,
    `\\ud800`): for text the runtime writes from what it does not control, such as an
    agent's error message, where refusing it would lose the error itself."""
    return _REFUSED.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def _validate_text(value: Any, info: ValidationInfo) -> Any:
    # Before pydantic's own checks: its length checks cannot read a surrogate at all.
    if not isinstance(value, str) or (info.context is not None and info.context.get("stored")):
        return value
    return check_text(value)


_TEXT_RULE = BeforeValidator(_validate_text)
Text = Annotated[str, Strict(), _TEXT_RULE]
"""A string the runtime may store: valid Unicode without NUL (see the module docstring)."""
NonEmptyText = Annotated[str, Strict(), Field(min_length=1), _TEXT_RULE]
Name = Annotated[str, Strict(), Field(max_length=NAME_MAX_LENGTH), _TEXT_RULE]
"""A name as stored (agent and message names, tool call ids): at most 200 characters."""
Id = Annotated[str, Strict(), Field(min_length=1, max_length=ID_MAX_LENGTH), _TEXT_RULE]
"""An id as the runtime makes them (`group-<uuid>`): text of 1 to 64 characters."""
Kind = Annotated[str, Strict(), Field(min_length=1, max_length=KIND_MAX_LENGTH), _TEXT_RULE]
"""The name of an agent kind, as registered and stored: text of 1 to 100 characters."""


@cache
def _id_adapter(name: str) -> TypeAdapter[str]:
    return TypeAdapter(Id, config=ConfigDict(title=name))


def check_id(value: object, name: str = "id") -> str:
    """`value` as an id, or pydantic's ValidationError titled `name` (e.g. `group_id`).

    Called at the entry of every public method that takes an id, so that a non-string, a
    malformed or an overlong id is refused the same way on every backend.
    """
    return _id_adapter(name).validate_python(value)


def check_json(value: Any, where: str = "value", depth: int = 0) -> Any:
    """`value` as JSON data (tuples become lists), or ValueError naming the first part
    that is not: only dicts with string keys, lists, strings under the text rule, finite
    numbers, booleans and None round-trip through JSON the same on every backend."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which JSON cannot hold: give a finite number")
        return value
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        return value
    if isinstance(value, list | tuple):
        return [check_json(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return check_json_object(value, where, depth)
    raise ValueError(
        f"{where} is of type {type(value).__name__!r}, which JSON cannot hold: use a dict, "
        "list, string, number, boolean or None"
    )


def check_json_object(value: Any, where: str = "value", depth: int = 0) -> dict[str, Any]:
    """`value` as a JSON object (see `check_json`), or ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object (a dict), not {type(value).__name__!r}")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{where} has the key {key!r}: JSON object keys must be strings")
        problem = text_problem(key)
        if problem is not None:
            raise ValueError(f"{where} has a key whose {problem}")
        checked[key] = check_json(item, f"{where}[{key!r}]", depth + 1)
    return checked
