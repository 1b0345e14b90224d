"""Supervision, in the style of Erlang/OTP and Akka typed: restarts are data, not code.

A `ChildSpec` says how to start a fresh instance of an actor (its state comes from the
store), its `RestartPolicy` (OTP's intensity: `max_restarts` within `within_seconds`, and
an exponential backoff with jitter between restarts) and what escalation means for it.
The `Supervisor` is the one piece of code that restarts; actors only report that they
crashed, through the `SupervisedActor` base class, and never know how they come back.

Callers reach a supervised actor through its `Address`, which outlives incarnations:
messages told while the actor restarts are buffered and delivered to the new instance,
after the ones the dead instance had not handled yet, so nothing is silently dropped.
An address whose child was stopped or escalated refuses messages with a clear error.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pykka
import structlog
from pykka.messages import _ActorStop

from actors._scheduler import Scheduler
from messages import SleeptimeError, reject, resolve

log = structlog.get_logger("sleeptime.supervisor")

NUDGE_EVERY_S = 0.5
"""A child that declined to passivate (it was busy) is asked again after this long."""


class InjectedCrash(Exception):  # the name says what it is
    """A crash injected by the chaos setting, to prove recovery works."""


class ActorRaised(Exception):
    """An actor's code raised a BaseException that is no Exception (`SystemExit`, say).

    pykka answers those by stopping every actor of the process; here it is one actor's
    crash like any other, restarted by its supervisor."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")


def contained(error: BaseException) -> Exception:
    """`error` as an Exception that fails only the actor, turn or run that raised it."""
    return error if isinstance(error, Exception) else ActorRaised(error)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How often a child may crash before it escalates, and how long to wait between.

    More than `max_restarts` crashes within `within_seconds` escalates. The n-th restart
    in that window waits `backoff_base * 2**(n-1)` seconds, at most `backoff_max`, moved
    by up to `jitter` of itself either way.
    """

    max_restarts: int = 5
    within_seconds: float = 10.0
    backoff_base: float = 0.01
    backoff_max: float = 1.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.within_seconds <= 0:
            raise ValueError("max_restarts must be >= 0 and within_seconds > 0")
        if not 0 <= self.jitter < 1 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("backoff_base, backoff_max >= 0 and 0 <= jitter < 1")

    def backoff(self, restarts_in_window: int, rng: random.Random) -> float:
        """Seconds to wait before the given restart (1 = the first in the window)."""
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** max(0, restarts_in_window - 1))
        return float(delay * (1 + rng.uniform(-self.jitter, self.jitter)))


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
        return random.Random(f"{self.seed}/{identity}/{incarnation}")


@dataclass
class ChildSpec:
    """How to (re)start one supervised actor and what its escalation means.

    `start(reporter)` builds a fresh instance whose state comes from the store and returns
    its ref; `escalate(reason)` runs once when the child crashes too often.
    """

    identity: str
    start: Callable[[CrashReporter], pykka.ActorRef[Any]]
    escalate: Callable[[str], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    refuse: Callable[[str], Exception] = lambda reason: SleeptimeError(
        f"the actor was stopped: {reason}"
    )
    passivates: bool = False
    """Whether the child may be passivated when idle (and started again on demand)."""
    parent: str | None = None
    """The identity of the child this one works for: once the parent is passivated, this
    one is too, as soon as it is idle (a group's sleeptime agents follow their group)."""


class Passivate:
    """Told by the supervisor: stop now if idle; the next message starts a new instance."""

    __slots__ = ()


class Address:
    """The stable handle of a supervised actor, valid across its restarts.

    A passivated child has no instance; the first message told to it starts one (in
    the teller's thread), and waits in the buffer until it is up, like during a restart.
    """

    __slots__ = (
        "_activate",
        "_buffer",
        "_lock",
        "_passive",
        "_ref",
        "_refusal",
        "identity",
        "incarnation",
        "last_told",
    )

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.incarnation = 0
        self.last_told = time.monotonic()
        self._lock = threading.Lock()
        self._ref: pykka.ActorRef[Any] | None = None
        self._buffer: deque[Any] = deque()
        self._refusal: Exception | None = None
        self._passive = False
        self._activate: Callable[[], None] = lambda: None

    def tell(self, message: Any) -> None:
        """Deliver now, or after the restart under way; refuse if the child is gone."""
        with self._lock:
            if self._refusal is not None:
                _refuse(message, self._refusal)
                return
            self.last_told = time.monotonic()
            if self._ref is not None and not self._buffer:
                try:
                    self._ref.tell(message)
                    return
                except pykka.ActorDeadError:
                    pass  # it just crashed: its report will restart it
            self._buffer.append(message)
            wake, self._passive = self._passive, False
        if wake:
            self._activate()

    def tell_if_active(self, message: Any, on_passive: Callable[[], None] | None = None) -> bool:
        """Tell, unless the child is passivated or gone (then the message is dropped:
        for news that a new instance reads from the store anyway). `on_passive` runs
        when it is passivated, before anything can start it again."""
        with self._lock:
            if self._passive or self._refusal is not None:
                if self._passive and on_passive is not None:
                    on_passive()
                return False
        self.tell(message)
        return True

    @property
    def active(self) -> bool:
        with self._lock:
            return self._ref is not None

    def _nudge(self, message: Any) -> None:
        """Tell the running instance, if any, without counting as use or waking it."""
        with self._lock:
            if self._ref is None or self._buffer:
                return
            try:
                self._ref.tell(message)
            except pykka.ActorDeadError:
                pass

    def _passivate(self, inbox: Any) -> bool:
        """Detach the idle instance, unless a message is waiting for it."""
        with self._lock:
            if self._ref is None or self._buffer or not inbox.empty():
                return False
            self._ref = None
            self._passive = True
            return True

    def ask(self, message: Any, timeout: float | None = None) -> Any:
        """Tell a message that carries a `reply` future, and wait for that reply."""
        reply: Future[Any] = message.reply
        self.tell(message)
        return reply.result(timeout)

    @property
    def refused(self) -> bool:
        with self._lock:
            return self._refusal is not None

    def _attach(self, ref: pykka.ActorRef[Any]) -> None:
        """The new incarnation is up: hand it everything that waited, in order."""
        with self._lock:
            self._ref = ref
            while self._buffer:
                message = self._buffer.popleft()
                try:
                    ref.tell(message)
                except pykka.ActorDeadError:
                    self._buffer.appendleft(message)  # crashed already; the next one gets it
                    return

    def _detach(self, inbox: Any | None, first: list[Any]) -> None:
        """The current incarnation died: keep what it had not handled, ahead of the rest.

        `inbox` is None when the incarnation never started (its start raised)."""
        with self._lock:
            self._ref = None
            pending = list(first)
            while inbox is not None and not inbox.empty():
                envelope = inbox.get()
                if isinstance(envelope.message, _ActorStop):
                    if envelope.reply_to is not None:
                        envelope.reply_to.set(None)
                    continue
                pending.append(envelope.message)
            self._buffer.extendleft(reversed(pending))

    def _close(self, refusal: Exception) -> list[Any]:
        """No incarnation will come: refuse what waits and what comes."""
        with self._lock:
            self._refusal = refusal
            waiting = list(self._buffer)
            self._buffer.clear()
            ref, self._ref = self._ref, None
        for message in waiting:
            _refuse(message, refusal)
        return [ref] if ref is not None else []


def _refuse(message: Any, refusal: Exception) -> None:
    reply = getattr(message, "reply", None)
    if isinstance(reply, Future):
        reject(reply, refusal)


class CrashReporter:
    """What a supervised actor holds: where to report a crash, and the chaos dice."""

    __slots__ = ("_supervisor", "activation", "address", "chaos", "dice", "seen", "snapshot")

    def __init__(
        self,
        supervisor: Supervisor,
        address: Address,
        chaos: Chaos | None,
        activation: bool = False,
        snapshot: Any = None,
    ) -> None:
        self._supervisor = supervisor
        self.address = address
        self.activation = activation  # started again after a passivation, not a crash
        # After a passivation: the state the last instance left (exact, as nothing else
        # changes it meanwhile), so the new one need not read it back; None otherwise.
        self.snapshot = snapshot
        targeted = (
            chaos is not None
            and chaos.crash_rate > 0
            and (chaos.only is None or address.identity.startswith(chaos.only))
        )
        self.chaos = chaos if targeted else None
        self.dice = (
            chaos.dice(address.identity, address.incarnation)
            if targeted and chaos is not None
            else None
        )
        self.seen = 0

    def strikes(self) -> bool:
        """Whether chaos crashes the actor on this message."""
        if self.chaos is None or self.dice is None:
            return False
        self.seen += 1
        if self.seen <= self.chaos.after or self.dice.random() >= self.chaos.crash_rate:
            return False
        return self._supervisor._inject(self.address.identity, self.chaos.crash_limit)

    def crashed(self, error: BaseException, inbox: Any, unhandled: list[Any]) -> None:
        self._supervisor._crashed(self.address, error, inbox, unhandled)

    def passivate(self, inbox: Any, snapshot: Any = None) -> bool:
        """Whether the idle instance may stop now (it must, if True); `snapshot` is
        handed to the next instance."""
        return self._supervisor._passivated(self.address, inbox, snapshot)


@dataclass
class _Child:
    spec: ChildSpec
    address: Address
    crashes: deque[float] = field(default_factory=deque)
    escalated: bool = False
    snapshot: Any = None  # what the passivated instance left for the next one
    nudged: float = float("-inf")  # when it was last asked to passivate


class Supervisor:
    """Starts children, restarts them when they crash, escalates when they crash too often.

    Example:
        >>> address = supervisor.supervise(ChildSpec("group:g1", start, escalate))
        >>> address.tell(message)
    """

    def __init__(
        self,
        scheduler: Scheduler,
        chaos: Chaos | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
    ) -> None:
        self._scheduler = scheduler
        self._chaos = chaos
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._children: dict[str, _Child] = {}
        self._active: dict[str, _Child] = {}  # children with a running instance
        self._changed = threading.Condition(self._lock)
        self._generation = 0  # moves, under the lock, whenever the active set changes
        self.restarts = 0
        self.escalations = 0
        self.injected = 0
        self.passivations = 0
        self.activations = 0
        self._injected_by: dict[str, int] = {}

    def supervise(self, spec: ChildSpec) -> Address:
        """Start the child now (a failed start counts as a crash) and return its address."""
        address = Address(spec.identity)
        child = _Child(spec, address)
        address._activate = lambda: self._wake(child)
        with self._lock:
            self._children[spec.identity] = child
        self._start(child)
        return address

    def child(self, identity: str) -> Address | None:
        with self._lock:
            found = self._children.get(identity)
            return None if found is None else found.address

    def stop(
        self, identity: str, refusal: Exception, timeout: float = 10.0, wait: bool = True
    ) -> None:
        """Stop a child on purpose: what it had queued is handled first, later messages
        are refused with `refusal`. With `wait`, return once it has stopped."""
        with self._lock:
            child = self._children.pop(identity, None)
            self._deactivate(identity)
        if child is not None:
            for ref in child.address._close(refusal):
                if wait:
                    _stop(ref, timeout)
                else:
                    try:
                        ref.stop(block=False)
                    except pykka.ActorDeadError:
                        pass

    def close(self, identity: str, refusal: Exception) -> None:
        """Stop a child for good but keep its address, which refuses every message."""
        with self._lock:
            child = self._children.get(identity)
            self._deactivate(identity)
            if child is not None:
                child.escalated = True
        if child is not None:
            for ref in child.address._close(refusal):
                try:
                    ref.stop(block=False)
                except pykka.ActorDeadError:
                    pass

    def identities(self) -> list[str]:
        with self._lock:
            return list(self._children)

    def _inject(self, identity: str, limit: int | None) -> bool:
        """Count an injected crash, unless this actor had its share already."""
        with self._lock:
            done = self._injected_by.get(identity, 0)
            if limit is not None and done >= limit:
                return False
            self._injected_by[identity] = done + 1
            self.injected += 1
            return True

    def active_count(self, prefix: str = "") -> int:
        """How many children whose identity starts with `prefix` have an instance."""
        with self._lock:
            return sum(identity.startswith(prefix) for identity in self._active)

    def forget_snapshot(self, identity: str) -> None:
        """The passivated child's snapshot is out of date: its next start reads the store."""
        with self._lock:
            child = self._children.get(identity)
        if child is not None:
            child.snapshot = None

    def wait_until(self, condition: Callable[[Supervisor], bool], timeout: float) -> bool:
        """Wait until `condition(self)`, a function of which children are active, holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                seen = self._generation
                self._lock.release()  # the condition takes the lock itself
                try:
                    holds = condition(self)
                finally:
                    self._lock.acquire()
                remaining = deadline - time.monotonic()
                if holds or remaining <= 0:
                    return holds
                # Evaluate again once the active set moved (maybe while it was evaluated).
                self._changed.wait_for(partial(self._moved_since, seen), remaining)

    def reap(self, idle_after: float | None, max_active: int | None, prefix: str) -> int:
        """Ask children to passivate: those told nothing for `idle_after` seconds, the
        least recently told beyond `max_active` among those starting with `prefix`, and
        those whose parent is passivated. A busy child declines; it is asked again
        `NUDGE_EVERY_S` later at the soonest. Returns how many were asked."""
        now = time.monotonic()
        with self._lock:
            active = [c for c in self._active.values() if c.spec.passivates]
            parents_active = set(self._active)
        victims: dict[str, _Child] = {}
        for child in active:
            parent = child.spec.parent
            idle = idle_after is not None and now - child.address.last_told > idle_after
            if idle or (parent is not None and parent not in parents_active):
                victims[child.spec.identity] = child
        if max_active is not None:
            capped = [c for c in active if c.spec.identity.startswith(prefix)]
            if len(capped) > max_active:
                capped.sort(key=lambda c: c.address.last_told)
                victims.update((c.spec.identity, c) for c in capped[: len(capped) - max_active])
        asked = 0
        for child in victims.values():
            # A busy child declines; asking it again every reap would flood its inbox.
            if now - child.nudged >= NUDGE_EVERY_S:
                child.nudged = now
                child.address._nudge(Passivate())
                asked += 1
        return asked

    def _moved_since(self, generation: int) -> bool:
        return self._generation != generation

    def _deactivate(self, identity: str) -> None:
        """With the lock held: the child has no running instance any more."""
        if self._active.pop(identity, None) is not None:
            self._generation += 1
            self._changed.notify_all()

    def _passivated(self, address: Address, inbox: Any, snapshot: Any) -> bool:
        with self._lock:
            child = self._children.get(address.identity)
        if child is None or child.address is not address:
            return False
        child.snapshot = snapshot  # before the address lets a waker in
        if not address._passivate(inbox):
            child.snapshot = None
            return False
        with self._lock:
            self._deactivate(address.identity)
            self.passivations += 1
        return True

    def _wake(self, child: _Child) -> None:
        """A message came for a passivated child: start it again from the store."""
        with self._lock:
            if self._children.get(child.spec.identity) is not child or child.escalated:
                return
            self.activations += 1
        child.address.incarnation += 1
        self._start(child, activation=True)

    def _start(self, child: _Child, activation: bool = False) -> None:
        snapshot, child.snapshot = child.snapshot, None
        reporter = CrashReporter(
            self, child.address, self._chaos, activation, snapshot if activation else None
        )
        try:
            ref = child.spec.start(reporter)
        except Exception as error:
            self._crashed(child.address, error, None, [])
            return
        with self._lock:
            if self._children.get(child.spec.identity) is child:
                self._active[child.spec.identity] = child
                self._generation += 1
                self._changed.notify_all()
        child.address._attach(ref)

    def _crashed(
        self, address: Address, error: BaseException, inbox: Any, unhandled: list[Any]
    ) -> None:
        with self._lock:
            child = self._children.get(address.identity)
        if child is None or child.address is not address:
            return  # stopped on purpose meanwhile
        with self._lock:
            self._deactivate(address.identity)
        address._detach(inbox, unhandled)
        now = self._clock()
        with self._lock:
            child.crashes.append(now)
            while child.crashes and now - child.crashes[0] > child.spec.policy.within_seconds:
                child.crashes.popleft()
            in_window = len(child.crashes)
            escalate = in_window > child.spec.policy.max_restarts and not child.escalated
            child.escalated = child.escalated or escalate
            delay = child.spec.policy.backoff(in_window, self._rng)
        _log(address.identity).warning(
            "actor_crashed", error=repr(error), crashes_in_window=in_window
        )
        if escalate:
            self._escalate(
                child,
                f"{in_window} crashes within "
                f"{child.spec.policy.within_seconds:g}s, last: {error!r}",
            )
            return
        if child.escalated:
            return
        self._scheduler.call_later(delay, lambda: self._restart(child))

    def _restart(self, child: _Child) -> None:
        with self._lock:
            if self._children.get(child.spec.identity) is not child or child.escalated:
                return
            self.restarts += 1
        child.address.incarnation += 1
        self._start(child)
        _log(child.spec.identity).info("actor_restarted", incarnation=child.address.incarnation)

    def _escalate(self, child: _Child, reason: str) -> None:
        with self._lock:
            self.escalations += 1
        _log(child.spec.identity).error("group_escalated", reason=reason)
        try:
            child.spec.escalate(reason)  # stored first: whoever is refused then sees it
        except Exception as error:
            _log(child.spec.identity).error("escalation_failed", error=repr(error))
        child.address._close(child.spec.refuse(reason))  # its last incarnation is dead already


def _log(identity: str) -> Any:
    """The logger bound to a child's context: `group_id` or `agent_id` from its identity."""
    kind, _, object_id = identity.partition(":")
    context = (
        {"group_id": object_id}
        if kind == "group"
        else ({"agent_id": object_id} if kind == "agent" else {})
    )
    return log.bind(actor=kind, **context)


def _stop(ref: pykka.ActorRef[Any], timeout: float) -> None:
    try:
        ref.stop(block=True, timeout=timeout)
    except (pykka.ActorDeadError, pykka.Timeout):
        pass


class SupervisedActor(pykka.ThreadingActor):
    """Base of the runtime's actors: messages in, replies through futures, crashes reported.

    A subclass implements `receive(message)` (and may implement `started()`). A message
    with a `reply` future gets the return value, or the exception, as its reply; an
    exception from a message without one is a crash, reported to the supervisor, which
    redelivers the messages this incarnation had not handled to the next one.
    """

    use_daemon_thread = True

    def __init__(self, reporter: CrashReporter | None = None) -> None:
        super().__init__()
        self._reporter = reporter
        self._unhandled: list[Any] = []

    def started(self) -> None:
        """Load what the actor needs; runs in its own thread before any message."""

    def receive(self, message: Any) -> Any:
        raise NotImplementedError

    def idle(self) -> bool:
        """Whether the actor may be passivated now: nothing of its own under way that a
        new instance, started from the store, would not take over."""
        return True

    def snapshot(self) -> Any:
        """What the next instance may start from instead of reading the store (None:
        read it). Only state that nothing but this actor changes belongs here."""
        return None

    def on_start(self) -> None:
        try:
            self.started()
        except BaseException as error:
            failure = contained(error)
            self._report(failure)
            raise failure from error

    def on_receive(self, message: Any) -> Any:
        try:
            return self._on_receive(message)
        except BaseException as error:
            if isinstance(error, Exception):
                raise
            # pykka would stop every actor of the process: make it this actor's crash.
            raise ActorRaised(error) from error

    def _on_receive(self, message: Any) -> Any:
        if isinstance(message, Passivate):
            if (
                self._reporter is not None
                and self.idle()
                and self._reporter.passivate(self.actor_inbox, self.snapshot())
            ):
                self._stop()  # at once: nothing else can reach this instance any more
            return None
        if self._reporter is not None and self._reporter.strikes():
            self._unhandled = [message]  # nothing of it ran: the next incarnation takes it
            raise InjectedCrash(f"chaos crashed {self._reporter.address.identity}")
        reply = getattr(message, "reply", None)
        if not isinstance(reply, Future):
            return self.receive(message)
        try:
            outcome = self.receive(message)
        except BaseException as error:
            reject(reply, contained(error))
        else:
            resolve(reply, outcome)
        return None

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._report(exception_value)

    def _report(self, error: BaseException) -> None:
        if self._reporter is not None:
            self._reporter.crashed(error, self.actor_inbox, self._unhandled)
            self._unhandled = []
