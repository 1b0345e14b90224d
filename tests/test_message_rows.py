"""A message's stored row is exactly its JSON dump (the store reads fields directly)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import TypeDecorator
from sqlalchemy.dialects import sqlite

from messages import Message
from persistence._models import UTCDateTime
from persistence._store import _message_values
from tests.stored_rows import MESSAGES


def reference_values(message: Message) -> dict[str, Any]:
    """A message's row as the store made it before `_message_values` read fields directly."""
    values = message.model_dump(mode="json", exclude={"created_at"})
    values["content"] = [p.model_dump(mode="json", exclude_none=True) for p in message.content]
    return {**values, "created_at": message.created_at}


@pytest.mark.parametrize("stored_message", MESSAGES, ids=lambda m: m.id)
def test_a_message_row_is_its_json_dump(stored_message: Message) -> None:
    values = _message_values(stored_message)
    expected = reference_values(stored_message)
    assert values == expected
    assert [list(part) for part in values["content"]] == [list(p) for p in expected["content"]]
    assert [type(v) for v in values.values()] == [type(v) for v in expected.values()]


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))]
        ),
    )
)
def test_datetimes_bound_for_sqlite_are_the_text_sqlalchemy_writes(moment: datetime) -> None:
    """UTCDateTime's one-step SQLite processor writes what SQLAlchemy's three steps do."""
    dialect = sqlite.dialect()
    adapted = UTCDateTime().dialect_impl(dialect)  # what SQLAlchemy asks for its processor
    assert isinstance(adapted, UTCDateTime)
    fast = adapted.bind_processor(dialect)
    general = TypeDecorator[datetime].bind_processor(adapted, dialect)
    assert fast is not None and general is not None and fast is not general
    assert fast(moment) == general(moment)
    assert fast(None) is general(None) is None


def test_naive_and_foreign_values_are_refused_as_before() -> None:
    dialect = sqlite.dialect()
    fast = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert fast is not None
    with pytest.raises(ValueError, match="naive datetimes are ambiguous"):
        fast(datetime(2026, 1, 1))
    with pytest.raises(AttributeError):  # not a datetime: SQLAlchemy's own path refuses it
        fast("2026-01-01")
