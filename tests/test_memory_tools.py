"""The memory tools' edits (SPEC 8): pure functions that refuse bad input with a clear error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors._memory_tools import MemoryToolError, insert, replace, rethink
from messages import Block


def block(
    value: str = "", *, limit: int = 5000, read_only: bool = False, label: str = "human"
) -> Block:
    return Block(
        id="block-1",
        group_id="group-1",
        label=label,
        value=value,
        limit=limit,
        read_only=read_only,
    )


# replace


def test_replace_one_match() -> None:
    human = block("Name: Ada\nFavorite color: orange")
    assert replace(human, "orange", "coral") == "Name: Ada\nFavorite color: coral"


def test_replace_with_empty_new_text_deletes() -> None:
    assert replace(block("likes tea and cake"), " and cake", "") == "likes tea"


def test_replace_does_not_change_the_block() -> None:
    human = block("color: orange")
    replace(human, "orange", "coral")
    assert human.value == "color: orange"


def test_replace_no_match_says_so() -> None:
    with pytest.raises(MemoryToolError, match="does not occur") as error:
        replace(block("color: orange"), "purple", "coral")
    assert "purple" in str(error.value)
    assert "human" in str(error.value)


def test_replace_two_matches_says_how_many_and_what_to_do() -> None:
    with pytest.raises(MemoryToolError, match="2 times") as error:
        replace(block("likes cats\nlikes dogs"), "likes", "loves")
    assert "exactly once" in str(error.value)


def test_replace_overlapping_matches_are_more_than_one() -> None:
    # "aa" matches "aaa" at positions 0 and 1: which one to replace is ambiguous.
    with pytest.raises(MemoryToolError):
        replace(block("aaa"), "aa", "b")


def test_replace_empty_old_text_is_refused() -> None:
    with pytest.raises(MemoryToolError, match="empty"):
        replace(block("anything"), "", "x")


def test_replace_over_the_limit_names_the_limit() -> None:
    with pytest.raises(MemoryToolError, match="limit of 12") as error:
        replace(block("color: red", limit=12), "red", "orange")
    assert "human" in str(error.value)


def test_replace_up_to_the_limit_is_fine() -> None:
    assert replace(block("color: red", limit=12), "red", "blue") == "color: blue"  # 11 chars
    assert replace(block("color: red", limit=13), "red", "coral") == "color: coral"  # 12


# insert


def test_insert_at_zero() -> None:
    assert insert(block("b\nc"), "a", 0) == "a\nb\nc"


def test_insert_at_end_with_minus_one() -> None:
    assert insert(block("a\nb"), "c", -1) == "a\nb\nc"
    assert insert(block("a\nb"), "c") == "a\nb\nc"  # -1 is the default


def test_insert_at_the_line_count_is_the_end() -> None:
    assert insert(block("a\nb"), "c", 2) == "a\nb\nc"


def test_insert_in_the_middle() -> None:
    assert insert(block("a\nc"), "b", 1) == "a\nb\nc"


def test_insert_into_an_empty_block() -> None:
    assert insert(block(""), "first", 0) == "first"
    assert insert(block(""), "first", -1) == "first"


@pytest.mark.parametrize(("value", "line"), [("a\nb", 3), ("a\nb", 99), ("a\nb", -2), ("", 1)])
def test_insert_out_of_range(value: str, line: int) -> None:
    with pytest.raises(MemoryToolError, match="out of range") as error:
        insert(block(value), "x", line)
    assert str(line) in str(error.value)
    assert "-1" in str(error.value)  # tells the agent how to append


def test_insert_over_the_limit_names_the_limit() -> None:
    with pytest.raises(MemoryToolError, match="limit of 5"):
        insert(block("abc", limit=5), "def", -1)


# rethink


def test_rethink_replaces_the_whole_block() -> None:
    assert rethink(block("old\nnotes"), "new notes") == "new notes"
    assert rethink(block("old"), "") == ""


def test_rethink_over_the_limit_names_the_limit() -> None:
    with pytest.raises(MemoryToolError, match="limit of 4"):
        rethink(block("", limit=4), "12345")
    assert rethink(block("", limit=4), "1234") == "1234"


# read-only blocks


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: replace(b, "fixed", "changed"),
        lambda b: insert(b, "more", -1),
        lambda b: rethink(b, "changed"),
    ],
    ids=["replace", "insert", "rethink"],
)
def test_read_only_blocks_are_refused(edit: Callable[[Block], str]) -> None:
    persona = block("fixed text", read_only=True, label="persona")
    with pytest.raises(MemoryToolError, match="read-only") as error:
        edit(persona)
    assert "persona" in str(error.value)


UNSTORABLE = {"NUL": "a\x00b", "lone surrogate": "a\ud800b", "surrogate pair": "\ud83d\ude00"}


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.parametrize(
    "edit",
    [
        lambda b, t: replace(b, "Ada", t),
        lambda b, t: replace(b, t, "Bo"),
        lambda b, t: insert(b, t, -1),
        rethink,
    ],
    ids=["replace new", "replace old", "insert", "rethink"],
)
def test_text_a_block_cannot_hold_is_refused(edit: Callable[[Block, str], str], text: str) -> None:
    with pytest.raises(MemoryToolError, match=r"cannot go into a memory block.*at index \d"):
        edit(block("name: Ada"), text)


@pytest.mark.parametrize("line", [True, 1.0, "2", None])
def test_insert_line_must_be_a_whole_number(line: object) -> None:
    with pytest.raises(MemoryToolError, match="line must be a whole number"):
        insert(block("a\nb"), "c", line)  # type: ignore[arg-type]


def test_non_text_is_refused() -> None:
    with pytest.raises(MemoryToolError, match="text must be text, not int"):
        rethink(block(), 5)  # type: ignore[arg-type]


def test_emoji_as_one_code_point_is_kept() -> None:
    assert rethink(block(), "likes \U0001f600") == "likes \U0001f600"


def test_memory_tool_error_is_an_ordinary_exception() -> None:
    assert issubclass(MemoryToolError, Exception)


# properties

# Text a block can hold (utf-8: no surrogates; no NUL), without line breaks.
line_text = st.text(st.characters(codec="utf-8", exclude_characters="\n\x00"), max_size=10)
block_lines = st.lists(line_text, max_size=10).filter(lambda lines: lines != [""])


@given(lines=block_lines, text=line_text, data=st.data())
def test_inserted_line_appears_at_its_index(
    lines: list[str], text: str, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(lines)))
    result = insert(block("\n".join(lines)), text, index).split("\n")
    assert result[index] == text
    assert result[:index] + result[index + 1 :] == lines


@given(lines=block_lines, text=line_text)
def test_insert_minus_one_appends(lines: list[str], text: str) -> None:
    assert insert(block("\n".join(lines)), text, -1).split("\n") == [*lines, text]


@given(before=line_text, after=line_text, new=line_text)
def test_replace_a_unique_marker(before: str, after: str, new: str) -> None:
    marker = "\n<<marker>>\n"
    value = before + marker + after
    assert replace(block(value), marker, new) == before + new + after
