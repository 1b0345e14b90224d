"""The restart decision, a pure function: intensity window, backoff, jitter, escalation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import RestartPolicy
from actors._parts import TRACKER_POLICY
from actors._restart import Escalate, Restart, crashes_within, decide_restart

EXACT = RestartPolicy(max_restarts=3, within_seconds=10, backoff_base=0.1, backoff_max=1, jitter=0)


def _rng() -> random.Random:
    return random.Random(0)


# -- the policy itself ----------------------------------------------------------------------


@given(
    st.integers(1, 30),
    st.floats(0.001, 1.0),
    st.floats(0.001, 60.0),
    st.floats(0, 0.9),
    st.integers(0, 2**32),
)
def test_backoff_doubles_up_to_its_cap_within_the_jitter(
    restart: int, base: float, cap: float, jitter: float, seed: int
) -> None:
    policy = RestartPolicy(backoff_base=base, backoff_max=cap, jitter=jitter)
    nominal = min(cap, base * 2.0 ** (restart - 1))
    delay = policy.backoff(restart, random.Random(seed))
    assert nominal * (1 - jitter) - 1e-12 <= delay <= nominal * (1 + jitter) + 1e-12


@pytest.mark.parametrize(
    "bad",
    [
        {"max_restarts": -1},
        {"within_seconds": 0},
        {"within_seconds": float("nan")},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"backoff_base": -1},
        {"backoff_max": -1},
    ],
)
def test_nonsense_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**bad)  # type: ignore[arg-type]


# -- the decision, as a table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("earlier", "now", "expected"),
    [
        ([], 0.0, Restart(0.1, 1)),  # the first crash: the base delay
        ([0.0], 1.0, Restart(0.2, 2)),  # doubling
        ([0.0, 1.0], 2.0, Restart(0.4, 3)),
        ([0.0, 1.0, 2.0], 3.0, Escalate("4 crashes within 10s", 4)),  # more than 3
        ([0.0, 1.0, 2.0], 10.0, Escalate("4 crashes within 10s", 4)),  # 10 s old still counts
        ([0.0, 1.0, 2.0], 10.5, Restart(0.4, 3)),  # the first one left the window
        ([0.0, 1.0, 2.0], 100.0, Restart(0.1, 1)),  # all of them did
    ],
)
def test_decision_table(earlier: list[float], now: float, expected: Restart | Escalate) -> None:
    decision = decide_restart(earlier, now, EXACT, _rng())
    assert type(decision) is type(expected) and decision.crashes == expected.crashes
    if isinstance(expected, Restart):
        assert isinstance(decision, Restart) and decision.delay == pytest.approx(expected.delay)
    else:
        assert isinstance(decision, Escalate) and decision.reason == expected.reason


@pytest.mark.parametrize(
    ("crashes", "delay"),
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (6, 1.0), (30, 1.0)],
)
def test_backoff_grows_then_stays_at_its_cap(crashes: int, delay: float) -> None:
    policy = RestartPolicy(max_restarts=100, backoff_base=0.1, backoff_max=1, jitter=0)
    decision = decide_restart([0.0] * (crashes - 1), 0.0, policy, _rng())
    assert isinstance(decision, Restart) and decision.delay == pytest.approx(delay)


def test_zero_restarts_escalates_the_first_crash() -> None:
    policy = RestartPolicy(max_restarts=0)
    assert decide_restart([], 5.0, policy, _rng()) == Escalate("1 crashes within 10s", 1)


@pytest.mark.parametrize(
    ("reset", "progressed", "crashes"),
    [(False, False, 3), (False, True, 3), (True, False, 3), (True, True, 1)],
)
def test_progress_forgets_earlier_crashes_only_when_the_policy_says_so(
    reset: bool, progressed: bool, crashes: int
) -> None:
    policy = RestartPolicy(max_restarts=5, reset_on_progress=reset)
    decision = decide_restart([1.0, 2.0], 3.0, policy, _rng(), progressed)
    assert isinstance(decision, Restart) and decision.crashes == crashes
    assert len(crashes_within([1.0, 2.0], 3.0, policy, progressed)) == crashes - 1


# -- the decision, as properties ------------------------------------------------------------

crash_histories = st.lists(st.floats(0, 1000, allow_nan=False), max_size=40).map(sorted)


@given(
    crash_histories,
    st.floats(0, 100),
    st.integers(0, 10),
    st.floats(0.1, 100),
    st.integers(0, 2**32),
)
def test_escalates_exactly_when_more_than_max_restarts_fall_within_the_window(
    earlier: list[float], after: float, max_restarts: int, within: float, seed: int
) -> None:
    now = (earlier[-1] if earlier else 0.0) + after
    policy = RestartPolicy(max_restarts=max_restarts, within_seconds=within)
    in_window = sum(1 for at in earlier if now - at <= within) + 1  # this crash counts too
    decision = decide_restart(earlier, now, policy, random.Random(seed))
    assert decision.crashes == in_window
    assert isinstance(decision, Escalate) == (in_window > max_restarts)
    if isinstance(decision, Escalate):
        assert decision.reason == f"{in_window} crashes within {within:g}s"


@given(
    crash_histories,
    st.floats(0, 100),
    st.floats(0.001, 1),
    st.floats(0.001, 10),
    st.floats(0, 0.9),
    st.integers(0, 2**32),
)
def test_a_restart_waits_the_backoff_of_its_window_within_the_jitter(
    earlier: list[float], after: float, base: float, cap: float, jitter: float, seed: int
) -> None:
    now = (earlier[-1] if earlier else 0.0) + after
    policy = RestartPolicy(
        max_restarts=1000, within_seconds=30, backoff_base=base, backoff_max=cap, jitter=jitter
    )
    decision = decide_restart(earlier, now, policy, random.Random(seed))
    assert isinstance(decision, Restart)
    nominal = min(cap, base * 2.0 ** (decision.crashes - 1))
    assert nominal * (1 - jitter) - 1e-12 <= decision.delay <= nominal * (1 + jitter) + 1e-12
    assert 0 <= decision.delay <= cap * (1 + jitter) + 1e-12


def _loop(policy: RestartPolicy, progressed: bool, seed: int, limit: int = 10_000) -> float | None:
    """Crash again as soon as each restart is up; when it escalates (None: never)."""
    rng, now = random.Random(seed), 0.0
    crashes: list[float] = []
    for _ in range(limit):
        decision = decide_restart(crashes, now, policy, rng, progressed)
        if isinstance(decision, Escalate):
            return now
        crashes = [*crashes_within(crashes, now, policy, progressed), now]
        now += decision.delay
    return None


@given(st.integers(0, 2**32))
def test_the_trackers_crash_loop_escalates_within_seconds(seed: int) -> None:
    escalated_at = _loop(TRACKER_POLICY, progressed=False, seed=seed)
    assert escalated_at is not None and escalated_at < 6.0


@given(st.integers(0, 2**32))
def test_a_tracker_that_gets_work_done_between_crashes_is_always_restarted_soon(
    seed: int,
) -> None:
    assert _loop(TRACKER_POLICY, progressed=True, seed=seed, limit=2_000) is None
    decision = decide_restart([0.0] * 50, 0.0, TRACKER_POLICY, random.Random(seed), True)
    assert isinstance(decision, Restart)
    assert decision.delay <= TRACKER_POLICY.backoff_base * (1 + TRACKER_POLICY.jitter)
