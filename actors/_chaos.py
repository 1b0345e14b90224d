"""Chaos: faults injected from outside, for tests and simulations, seeded to be replayed.

Nothing in the production actors knows about it. The wiring (`actors/_parts.py`) puts
wrappers around what it starts, in Akka's "behaviour + wrapper" shape:

- `CrashInjection.wrapper(address)` goes around an actor incarnation's receive and
  crashes it on a `crash_rate` fraction of its messages (the message is handed to the
  next incarnation, as if it had never arrived);
- `failing_steps(build, ...)` wraps each agent the kind registry builds for a sleeptime
  agent in a `ChaosAgent`, whose step fails on a `failure_rate` fraction of steps.

Each decision comes from dice seeded by (seed, identity, incarnation): the same seed makes
an actor's incarnation take the same decisions for the same sequence of messages or steps.

Example:
    >>> Runtime.start(url, chaos=Chaos(crash_rate=0.02, failure_rate=0.05, seed=7))
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors._address import Address
from actors._supervised import CrashedBeforeReceive, ReceiveWrapper
from actors.sdk import AgentBehaviour, AgentContext, StepResult
from messages import Message, MessageCreate

BuildAgent = Callable[[str, Mapping[str, Any]], AgentBehaviour]
"""Builds the agent of a kind from its config (`AgentKinds.build`)."""


class InjectedCrash(CrashedBeforeReceive):  # the name says what it is
    """A crash injected by the chaos setting, to prove recovery works."""


class InjectedFailure(Exception):  # the name says what it is
    """An agent step failed on purpose by the chaos setting."""


@dataclass(frozen=True, slots=True)
class Chaos:
    """Fault injection for tests and simulations, seeded so a run can be replayed.

    Each actor crashes on a `crash_rate` fraction of the messages it receives; each agent
    step fails on a `failure_rate` fraction. With the same seed, an actor (by identity and
    incarnation) makes the same decisions for the same sequence of messages. `only`
    limits crashes to actors whose identity starts with it (`"tracker"`, `"group:"`,
    `"agent:<id>"`); `crash_limit` caps the crashes injected into one actor; `after`
    spares the first messages of each incarnation.
    """

    crash_rate: float = 0.0
    failure_rate: float = 0.0
    seed: int = 0
    only: str | None = None
    crash_limit: int | None = None
    after: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.crash_rate <= 1 and 0 <= self.failure_rate <= 1):
            raise ValueError("crash_rate and failure_rate are fractions between 0 and 1")

    def dice(self, identity: str, incarnation: int = 0) -> random.Random:
        """The random source of one identity's incarnation: the same for the same seed."""
        return random.Random(f"{self.seed}/{identity}/{incarnation}")

    def crashes(self, identity: str) -> bool:
        """Whether crashes are injected into the actor with this identity."""
        return self.crash_rate > 0 and (self.only is None or identity.startswith(self.only))


class CrashInjection:
    """The crashes chaos injects into one runtime's actors, and how many so far.

    `injected` counts them all (`rt.stats()["injected_crashes"]`); `crash_limit` caps
    those of one identity, across its incarnations.
    """

    def __init__(self, chaos: Chaos | None) -> None:
        self._chaos = chaos
        self._lock = threading.Lock()
        self._by_identity: dict[str, int] = {}
        self.injected = 0

    def wrapper(self, address: Address) -> ReceiveWrapper | None:
        """What to put around the receive of the incarnation about to start at `address`
        (None: it is spared)."""
        chaos = self._chaos
        if chaos is None or not chaos.crashes(address.identity):
            return None
        return _CrashingReceive(self, chaos, address.identity, address.incarnation)

    def _count(self, identity: str) -> bool:
        """Count a crash of `identity`, unless it had its share already."""
        assert self._chaos is not None
        limit = self._chaos.crash_limit
        with self._lock:
            done = self._by_identity.get(identity, 0)
            if limit is not None and done >= limit:
                return False
            self._by_identity[identity] = done + 1
            self.injected += 1
            return True


class _CrashingReceive:
    """One incarnation's crash dice, around its receive."""

    __slots__ = ("_chaos", "_dice", "_identity", "_injection", "_seen")

    def __init__(
        self, injection: CrashInjection, chaos: Chaos, identity: str, incarnation: int
    ) -> None:
        self._injection = injection
        self._chaos = chaos
        self._identity = identity
        self._dice = chaos.dice(identity, incarnation)
        self._seen = 0

    def __call__(self, message: Any, receive: Callable[[Any], Any]) -> Any:
        self._seen += 1
        if (
            self._seen > self._chaos.after
            and self._dice.random() < self._chaos.crash_rate
            and self._injection._count(self._identity)
        ):
            raise InjectedCrash(f"chaos crashed {self._identity}")
        return receive(message)


class ChaosAgent:
    """A sleeptime agent whose step fails (`InjectedFailure`) on a `failure_rate`
    fraction of steps, drawn from `dice`; otherwise the wrapped agent steps."""

    __slots__ = ("_behaviour", "_dice", "_failure_rate")

    def __init__(self, behaviour: AgentBehaviour, dice: random.Random, failure_rate: float):
        self._behaviour = behaviour
        self._dice = dice
        self._failure_rate = failure_rate

    def step(
        self, context: AgentContext, messages: list[Message]
    ) -> Sequence[MessageCreate | Mapping[str, Any]] | StepResult:
        if self._dice.random() < self._failure_rate:
            raise InjectedFailure("chaos: this step fails on purpose (failure_rate)")
        return self._behaviour.step(context, messages)


def failing_steps(
    build: BuildAgent, chaos: Chaos | None, agent_id: str, incarnation: int
) -> BuildAgent:
    """`build`, wrapping each agent it builds for this sleeptime agent's incarnation in a
    `ChaosAgent` (one dice for the incarnation, whatever is rebuilt); `build` itself when
    chaos fails no steps."""
    if chaos is None or chaos.failure_rate <= 0:
        return build
    dice = chaos.dice(f"steps/{agent_id}", incarnation)
    rate = chaos.failure_rate

    def build_failing(kind: str, config: Mapping[str, Any]) -> AgentBehaviour:
        return ChaosAgent(build(kind, config), dice, rate)

    return build_failing
