"""Whether a turn fires sleeptime: a pure function of (frequency, counter), as in Letta."""

from __future__ import annotations

from typing import NamedTuple


class TriggerDecision(NamedTuple):
    fired: bool
    counter: int


def decide_fire(frequency: int | None, counter: int) -> TriggerDecision:
    """Decide one turn and return the counter to store.

    `None` fires every turn and `0` never does; both leave the counter as it is. `N >= 1`
    stores `(counter + 1) % N` and fires when that is 0, so from the initial -1 it fires on
    turns 1, N+1, 2N+1, ...

    >>> decide_fire(2, -1)
    TriggerDecision(fired=True, counter=0)
    >>> decide_fire(2, 0)
    TriggerDecision(fired=False, counter=1)
    """
    if frequency is None:
        return TriggerDecision(True, counter)
    if frequency == 0:
        return TriggerDecision(False, counter)
    if frequency < 0:
        raise ValueError(f"frequency must be None or >= 0, not {frequency}")
    stored = (counter + 1) % frequency
    return TriggerDecision(stored == 0, stored)
