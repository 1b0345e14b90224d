"""The pure rules of SPEC 4-6 (actors/rules.py), called directly: tables and properties."""

from __future__ import annotations

import doctest
import itertools
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import rules
from actors.rules import (
    INITIAL_COUNTER,
    GiveUp,
    Requeue,
    after_interruption,
    claim_window,
    decide_fire,
    new_group,
)
from messages import Group, GroupSettings, Message, RunStatus, TextContent

AT = datetime(2026, 1, 1, tzinfo=UTC)


def group(agents: int = 2, frequency: int | None = 1) -> Group:
    return new_group(
        "group-1",
        "agent-primary",
        [f"agent-s{n}" for n in range(agents)],
        GroupSettings(frequency=frequency),
        AT,
    )


def message(sequence: int, role: str = "user") -> Message:
    return Message(
        id=f"message-{sequence}",
        agent_id="agent-primary",
        group_id="group-1",
        sequence=sequence,
        role=role,
        content=[TextContent(text=f"m{sequence}")],
        created_at=AT,
    )


def ids() -> Callable[[str], str]:
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}-{next(counter)}"


def test_a_new_group_has_not_turned_yet() -> None:
    fresh = new_group("g", "p", ["s1", "s2"], GroupSettings(frequency=3, max_attempts=5), AT)
    assert (fresh.counter, fresh.cursor, fresh.turns) == (INITIAL_COUNTER, None, 0)
    assert (fresh.frequency, fresh.max_attempts, fresh.run_timeout) == (3, 5, 600.0)
    assert fresh.sleeptime_agent_ids == ["s1", "s2"]
    assert fresh.created_at == fresh.updated_at == AT


@pytest.mark.parametrize(
    ("fired", "produced", "claims"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_only_a_firing_turn_with_output_claims(fired: bool, produced: bool, claims: bool) -> None:
    start = group()
    recorded = [message(1), message(2, "assistant")]
    runs, cursor, cursor_seq = claim_window(
        start,
        0,
        1,
        recorded,
        fired,
        produced,
        AT,
        ids(),
    )
    if claims:
        assert [r.agent_id for r in runs] == ["agent-s0", "agent-s1"]  # the group's order
        assert [r.metadata["position"] for r in runs] == [0, 1]
        assert {(r.window_first_seq, r.window_last_seq) for r in runs} == {(1, 2)}
        assert {(r.status, r.attempt, r.turn) for r in runs} == {(RunStatus.CREATED, 1, 1)}
        assert (cursor, cursor_seq) == ("message-2", 2)
    else:
        assert (runs, cursor, cursor_seq) == ([], None, 0)


def test_a_claim_starts_after_the_cursor() -> None:
    runs, cursor, cursor_seq = claim_window(
        group(1),
        4,
        3,
        [message(7), message(8, "assistant")],
        True,
        True,
        AT,
        ids(),
    )
    assert [(r.window_first_seq, r.window_last_seq) for r in runs] == [(5, 8)]
    assert (cursor, cursor_seq) == ("message-8", 8)


@given(
    frequency=st.one_of(st.none(), st.integers(0, 6)),
    turns=st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=40),
)
def test_windows_are_contiguous_disjoint_and_cover_up_to_the_cursor(
    frequency: int | None, turns: list[tuple[int, bool]]
) -> None:
    """Turns of any shape (outputs of 0-3 messages, recorded or not): the runs' windows
    tile the primary history from its first message to the cursor, exactly once."""
    state = group(1, frequency)
    counter, cursor_seq, last_seq = INITIAL_COUNTER, 0, 0
    windows: list[tuple[int, int]] = []
    make_id = ids()
    for turn, (outputs, _) in enumerate(turns, start=1):
        recorded = [message(last_seq + i + 1) for i in range(1 + outputs)]
        last_seq += len(recorded)
        fired, counter = decide_fire(frequency, counter)
        runs, _, cursor_seq = claim_window(
            state,
            cursor_seq,
            turn,
            recorded,
            fired,
            outputs > 0,
            AT,
            make_id,
        )
        windows += [(r.window_first_seq, r.window_last_seq) for r in runs]
    covered = [seq for first, last in windows for seq in range(first, last + 1)]
    assert covered == list(range(1, cursor_seq + 1))


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "outcome"),
    [
        (1, 3, Requeue(2)),
        (2, 3, Requeue(3)),
        (3, 3, GiveUp("interrupted 3 time(s), the group's max_attempts")),
        (1, 1, GiveUp("interrupted 1 time(s), the group's max_attempts")),
        (5, 3, GiveUp("interrupted 5 time(s), the group's max_attempts")),
    ],
)
def test_after_an_interruption(attempt: int, max_attempts: int, outcome: object) -> None:
    assert after_interruption(attempt, max_attempts) == outcome


@given(st.integers(1, 10_000), st.integers(1, 10_000))
def test_an_interrupted_run_is_tried_at_most_max_attempts_times(
    attempt: int, max_attempts: int
) -> None:
    outcome = after_interruption(attempt, max_attempts)
    if isinstance(outcome, Requeue):
        assert outcome.attempt == attempt + 1 <= max_attempts
    else:
        assert attempt >= max_attempts


def test_the_examples_in_the_rules_hold() -> None:
    assert doctest.testmod(rules).failed == 0
