"""When sleeptime fires (SPEC 4): `decide_fire` is a pure function of (frequency, counter)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.rules import INITIAL_COUNTER, FireDecision, decide_fire


def play(
    frequency: int | None, turns: int, counter: int = INITIAL_COUNTER
) -> tuple[list[int], int]:
    """Run `turns` turns; return the 1-based numbers of the turns that fired and the counter."""
    fired_on = []
    for turn in range(1, turns + 1):
        decision = decide_fire(frequency, counter)
        if decision.fired:
            fired_on.append(turn)
        counter = decision.counter
    return fired_on, counter


# frequency -> turns (1..12) that fire, starting from the initial counter.
FIRES_ON = {
    None: list(range(1, 13)),
    0: [],
    1: list(range(1, 13)),
    2: [1, 3, 5, 7, 9, 11],
    3: [1, 4, 7, 10],
    5: [1, 6, 11],
}


@pytest.mark.parametrize(("frequency", "expected"), FIRES_ON.items(), ids=str)
def test_fires_on_the_turns_of_the_table(frequency: int | None, expected: list[int]) -> None:
    fired_on, _ = play(frequency, 12)
    assert fired_on == expected


# (frequency, counter given) -> (fired, counter to store)
ONE_TURN = [
    (None, -1, True, -1),
    (None, 7, True, 7),
    (0, -1, False, -1),
    (0, 4, False, 4),
    (1, -1, True, 0),
    (1, 0, True, 0),
    (2, -1, True, 0),
    (2, 0, False, 1),
    (2, 1, True, 0),
    (3, -1, True, 0),
    (3, 0, False, 1),
    (3, 1, False, 2),
    (3, 2, True, 0),
    (5, -1, True, 0),
    (5, 3, False, 4),
    (5, 4, True, 0),
]


@pytest.mark.parametrize(("frequency", "counter", "fired", "stored"), ONE_TURN)
def test_one_turn(frequency: int | None, counter: int, fired: bool, stored: int) -> None:
    decision = decide_fire(frequency, counter)
    assert isinstance(decision, FireDecision)
    assert decision == FireDecision(fired=fired, counter=stored)
    assert (decision.fired, decision.counter) == (fired, stored)


@pytest.mark.parametrize("frequency", [2, 3, 5])
def test_stored_counter_cycles_from_zero(frequency: int) -> None:
    counter = INITIAL_COUNTER
    stored = []
    for _ in range(2 * frequency):
        counter = decide_fire(frequency, counter).counter
        stored.append(counter)
    assert stored == list(range(frequency)) * 2


@pytest.mark.parametrize("frequency", [None, 0])
@pytest.mark.parametrize("counter", [-1, 0, 1, 41])
def test_none_and_zero_leave_the_counter_unchanged(frequency: int | None, counter: int) -> None:
    _, final = play(frequency, 7, counter)
    assert final == counter


@pytest.mark.parametrize("frequency", [-1, -2, -100])
def test_negative_frequency_is_rejected(frequency: int) -> None:
    with pytest.raises(ValueError, match="frequency"):
        decide_fire(frequency, INITIAL_COUNTER)


@given(frequency=st.integers(1, 50), turns=st.integers(0, 500))
def test_fire_count_and_final_counter(frequency: int, turns: int) -> None:
    fired_on, counter = play(frequency, turns)
    assert len(fired_on) == math.ceil(turns / frequency)
    assert fired_on == list(range(1, turns + 1, frequency))
    if turns > 0:
        assert counter == (turns - 1) % frequency
    else:
        assert counter == INITIAL_COUNTER


frequencies = st.one_of(st.none(), st.integers(0, 50))


@given(schedule=st.lists(frequencies, max_size=60), start=st.integers(-1, 100))
def test_changing_frequency_keeps_the_counter(schedule: list[int | None], start: int) -> None:
    # Each turn may use a different frequency (update_group); the counter carries over as is.
    counter = start
    for frequency in schedule:
        decision = decide_fire(frequency, counter)
        if frequency is None or frequency == 0:
            assert decision == (frequency is None, counter)
        else:
            stored = (counter + 1) % frequency
            assert decision == (stored == 0, stored)
        counter = decision.counter


def test_changing_frequency_does_not_reset_the_counter() -> None:
    _, counter = play(3, 2)  # turns 1, 2 with frequency 3: stored 0, then 1
    assert counter == 1
    # Now frequency 5: a reset (to -1) would fire at once; the kept counter goes on to 2.
    assert decide_fire(5, counter) == FireDecision(fired=False, counter=2)
    # Pausing with 0 and resuming keeps it too.
    paused = decide_fire(0, counter)
    assert paused == FireDecision(fired=False, counter=1)
    assert decide_fire(2, paused.counter) == FireDecision(fired=True, counter=0)


def test_counter_larger_than_the_new_frequency_wraps() -> None:
    # After lowering 10 -> 3 the stored counter (7) can exceed the new frequency.
    assert decide_fire(3, 7) == FireDecision(fired=False, counter=2)
    assert decide_fire(4, 7) == FireDecision(fired=True, counter=0)


def test_a_new_group_counter_starts_at_minus_one() -> None:
    assert INITIAL_COUNTER == -1  # SPEC 4: so frequency N fires on turns 1, N+1, ...
