"""The restart policy and its decision, a pure function: restart after a delay, or escalate.

OTP's restart intensity (`{one_for_one, MaxR, MaxT}`) with an exponential backoff and
jitter between restarts of one child.

Example:
    >>> policy = RestartPolicy(max_restarts=3, within_seconds=60, jitter=0)
    >>> decide_restart([0.0, 1.0], 2.0, policy, random.Random(0))
    Restart(delay=0.04, crashes=3)
    >>> decide_restart([0.0, 1.0, 2.0], 3.0, policy, random.Random(0))
    Escalate(reason='4 crashes within 60s', crashes=4)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How often a child may crash before it escalates, and how long to wait between.

    More than `max_restarts` crashes within `within_seconds` escalates. The n-th restart
    in that window waits `backoff_base * 2**(n-1)` seconds, at most `backoff_max`, moved
    by up to `jitter` of itself either way. A policy whose steady backoff lets fewer than
    `max_restarts + 1` crashes fit in the window (`backoff_max * max_restarts` well over
    `within_seconds`) never escalates a crash loop: it only slows it down.

    With `reset_on_progress`, a crash of an incarnation that had handled a message forgets
    the earlier crashes: only a crash loop (no message handled between crashes: a start
    that fails, a message that crashes every incarnation) escalates, however often a busy
    child crashes while it still gets its work done.
    """

    max_restarts: int = 5
    within_seconds: float = 10.0
    backoff_base: float = 0.01
    backoff_max: float = 1.0
    jitter: float = 0.2
    reset_on_progress: bool = False

    def __post_init__(self) -> None:
        if not (self.max_restarts >= 0 and self.within_seconds > 0):
            raise ValueError("max_restarts must be >= 0 and within_seconds > 0")
        if not (0 <= self.jitter < 1 and self.backoff_base >= 0 and self.backoff_max >= 0):
            raise ValueError("backoff_base, backoff_max >= 0 and 0 <= jitter < 1")

    def backoff(self, restarts_in_window: int, rng: random.Random) -> float:
        """Seconds to wait before the given restart (1 = the first in the window)."""
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** max(0, restarts_in_window - 1))
        return float(delay * (1 + rng.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, slots=True)
class Restart:
    """Start a fresh instance after `delay` seconds; `crashes` fell within the window."""

    delay: float
    crashes: int


@dataclass(frozen=True, slots=True)
class Escalate:
    """Too many crashes: stop restarting and escalate, for `reason`."""

    reason: str
    crashes: int


def crashes_within(
    crash_times: Iterable[float], now: float, policy: RestartPolicy, progressed: bool = False
) -> list[float]:
    """The earlier crash times that still count at `now`: at most `within_seconds` old,
    and none if the policy resets on progress and the crashed incarnation `progressed`
    (handled a message)."""
    if progressed and policy.reset_on_progress:
        return []
    return [at for at in crash_times if now - at <= policy.within_seconds]


def decide_restart(
    crash_times: Iterable[float],
    now: float,
    policy: RestartPolicy,
    rng: random.Random,
    progressed: bool = False,
) -> Restart | Escalate:
    """What to do about a child that crashes at `now`, after earlier crashes at `crash_times`.

    The crash at `now` counts too: escalate exactly when more than `max_restarts` crashes
    fall within `within_seconds` (a crash that old still counts), else restart after the
    backoff for that many crashes (`rng` draws the jitter). `progressed` says whether the
    crashed incarnation handled a message (see `RestartPolicy.reset_on_progress`).
    """
    crashes = len(crashes_within(crash_times, now, policy, progressed)) + 1
    if crashes > policy.max_restarts:
        return Escalate(f"{crashes} crashes within {policy.within_seconds:g}s", crashes)
    return Restart(policy.backoff(crashes, rng), crashes)
