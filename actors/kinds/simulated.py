"""The `simulated` kind: an agent with configurable latency and failures, for load tests."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.sdk import AgentContext, AgentRole, parse_config
from messages import Message, MessageCreate

MAX_LATENCY_MS = 86_400_000.0
"""One day: the most a config may ask for, and the most one step ever waits."""

# Past this sigma a lognormal is almost all zeros and huge outliers: no longer a latency model.
_MAX_SIGMA = 4.0
_DEFAULT_SIGMA = 0.5

Distribution = Literal["constant", "uniform", "exponential", "lognormal"]


class SimulatedFailure(Exception):
    """The failure a `simulated` agent raises on purpose, at its `failure_rate`."""

    def __init__(self, failure_rate: float) -> None:
        self.failure_rate = failure_rate
        super().__init__(
            f"simulated failure (failure_rate={failure_rate:g}): this agent fails on purpose; "
            "set failure_rate to 0 to turn it off"
        )


class SimulatedConfig(BaseModel):
    """The config of a `simulated` agent; times are in milliseconds.

    How `latency_ms` and `jitter_ms` shape one step's latency, by `distribution`:

    - `constant`: `latency_ms`, plus a uniform offset in [-jitter_ms, +jitter_ms] when
      jitter_ms > 0, clipped at 0;
    - `uniform`: uniform in [max(0, latency_ms - jitter_ms), latency_ms + jitter_ms];
    - `exponential`: mean `latency_ms`; jitter_ms is not used;
    - `lognormal`: median `latency_ms` and sigma = jitter_ms / latency_ms (so for a small
      jitter the spread is about jitter_ms), or 0.5 when jitter_ms is 0; sigma is capped
      at 4.

    Every sample is also capped at `MAX_LATENCY_MS` (one day).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    latency_ms: float = Field(default=0.0, ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    distribution: Distribution = "constant"
    jitter_ms: float = Field(default=0.0, ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    failure_rate: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    reply: str = Field(default="ok", min_length=1)  # a message: never empty


def sample_latency_ms(rng: random.Random, config: SimulatedConfig) -> float:
    """One step's latency in milliseconds, drawn from `rng` as `config` says (always >= 0).

    >>> sample_latency_ms(random.Random(1), SimulatedConfig(latency_ms=20))
    20.0
    """
    latency, jitter = config.latency_ms, config.jitter_ms
    if config.distribution == "constant":
        sample = latency + rng.uniform(-jitter, jitter) if jitter else latency
    elif config.distribution == "uniform":
        sample = rng.uniform(max(0.0, latency - jitter), latency + jitter)
    elif config.distribution == "exponential":
        sample = latency * rng.expovariate(1.0)
    else:
        sigma = min(jitter / latency, _MAX_SIGMA) if jitter and latency else _DEFAULT_SIGMA
        sample = latency * rng.lognormvariate(0.0, sigma)
    return min(max(sample, 0.0), MAX_LATENCY_MS)


class SimulatedAgent:
    """An agent that waits a sampled latency, then fails at `failure_rate` or replies.

    Usable as a primary or a sleeptime agent. One seeded random generator per agent, so the
    same `seed` gives the same latencies and failures, step after step.

    Example:
        >>> agent = SimulatedAgent({"latency_ms": 50, "distribution": "lognormal", "seed": 7})
    """

    agent_roles: ClassVar[tuple[AgentRole, ...]] = ("primary", "sleeptime")

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = parse_config(SimulatedConfig, config)
        self._rng = random.Random(self.config.seed)

    def step(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> list[MessageCreate]:
        """Wait, then raise `SimulatedFailure` or answer with `reply`; nothing if cancelled."""
        # Both draws happen before the wait, so a cancelled step does not shift the sequence.
        latency_ms = sample_latency_ms(self._rng, self.config)
        fails = self._rng.random() < self.config.failure_rate
        cancelled = context.wait(latency_ms / 1000) if latency_ms > 0 else context.cancelled()
        if cancelled:
            return []
        if fails:
            raise SimulatedFailure(self.config.failure_rate)
        return [MessageCreate(role="assistant", content=self.config.reply)]
