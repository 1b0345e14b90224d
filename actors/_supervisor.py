"""The Supervisor, in the style of Erlang/OTP and Akka typed: restarts are data, not code.

A `ChildSpec` says how to start a fresh instance of an actor (its state comes from the
store), its `RestartPolicy` (intensity and backoff, decided by `decide_restart`), what
escalation means for it, and what wraps its receive. The `Supervisor` is the one piece
of code that restarts; actors only report that they crashed, through the `CrashReporter`
it hands each incarnation, and never know how they come back. Callers reach a child
through its `Address`, which outlives incarnations.

Example:
    >>> supervisor = Supervisor(scheduler)
    >>> address = supervisor.supervise(ChildSpec("group:g1", start, escalate))
    >>> address.tell(message)
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pykka

from actors._address import Address
from actors._observer import NO_OBSERVER, Observer
from actors._passivation import NUDGE_EVERY_S, Idle, Passivate, to_passivate
from actors._restart import Escalate, RestartPolicy, crashes_within, decide_restart
from actors._scheduler import Scheduler
from actors._supervised import CrashReporter, ReceiveWrapper
from messages import SleeptimeError
from messages._log import get_logger

log = get_logger("sleeptime.supervisor")


def _stopped(reason: str) -> Exception:
    return SleeptimeError(f"the actor was stopped: {reason}")


@dataclass
class ChildSpec:
    """How to (re)start one supervised actor and what its escalation means.

    `start(reporter)` builds a fresh instance whose state comes from the store and returns
    its ref; `escalate(reason)` runs once when the child crashes too often (under
    `policy`), after which every message is refused with `refuse(reason)`. `wrap`, if
    given, makes the receive wrapper of each incarnation about to start (or None).
    """

    identity: str
    start: Callable[[CrashReporter], pykka.ActorRef[Any]]
    escalate: Callable[[str], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    refuse: Callable[[str], Exception] = _stopped
    passivates: bool = False
    """Whether the child may be passivated when idle (and started again on demand)."""
    parent: str | None = None
    """The identity of the child this one works for: once the parent is passivated, this
    one is too, as soon as it is idle (a group's sleeptime agents follow their group)."""
    wrap: Callable[[Address], ReceiveWrapper | None] | None = None


@dataclass
class _Child:
    spec: ChildSpec
    address: Address
    crashes: deque[float] = field(default_factory=deque)
    closed: bool = False  # escalated or closed: never started again
    snapshot: Any = None  # what the passivated instance left for the next one
    nudged: float = float("-inf")  # when it was last asked to passivate


class Supervisor:
    """Starts children, restarts them when they crash, escalates when they crash too often.

    Also passivates idle children (`reap`) and starts them again on their next message.
    `shut_down(refusal)` gives up on every child at once, for good.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._scheduler = scheduler
        self._observer = observer
        self._clock = clock
        self._rng = random.Random(seed)  # the backoff's jitter
        self._lock = threading.Lock()
        self._children: dict[str, _Child] = {}
        self._active: dict[str, _Child] = {}  # children with a running instance
        self._active_kinds: dict[str, int] = {}  # how many of them, by kind ("group", ...)
        self._changed = threading.Condition(self._lock)
        self._generation = 0  # moves, under the lock, whenever the active set changes
        self._refusal: Exception | None = None  # set by shut_down
        self.restarts = 0
        self.escalations = 0
        self.passivations = 0
        self.activations = 0

    # -- children -------------------------------------------------------------------------

    def supervise(self, spec: ChildSpec) -> Address:
        """Start the child now (a failed start counts as a crash) and return its address.

        After `shut_down`, the address refuses every message and nothing starts."""
        child = _Child(spec, Address(spec.identity, on_wake=lambda: self._wake(child)))
        with self._lock:
            self._children[spec.identity] = child
            refusal = self._refusal
            child.closed = refusal is not None
        if refusal is not None:
            child.address.close(refusal)
        else:
            self._start(child)
        return child.address

    def child(self, identity: str) -> Address | None:
        with self._lock:
            found = self._children.get(identity)
            return None if found is None else found.address

    def identities(self) -> list[str]:
        with self._lock:
            return list(self._children)

    def parent_of(self, identity: str) -> str | None:
        """The identity of the child `identity` works for (see `ChildSpec.parent`)."""
        with self._lock:
            found = self._children.get(identity)
            return None if found is None else found.spec.parent

    def stop(
        self, identity: str, refusal: Exception, timeout: float = 10.0, wait: bool = True
    ) -> None:
        """Stop a child on purpose: what it had queued is handled first, later messages
        are refused with `refusal`. With `wait`, return once it has stopped."""
        with self._lock:
            child = self._children.pop(identity, None)
            self._deactivate(identity)
        if child is not None:
            _stop(child.address.close(refusal), timeout if wait else None)

    def stop_all(self, identities: Sequence[str], refusal: Exception, timeout: float) -> None:
        """`stop` the children all at once, and wait up to `timeout` s in all (not each):
        one stuck in a call that never returns (an agent's hung step) holds up no other,
        and the wait for it ends with the time."""
        stopping = []
        for identity in identities:
            with self._lock:
                child = self._children.pop(identity, None)
                self._deactivate(identity)
            if child is not None:
                stopping.append(child.address.close(refusal))
        deadline = time.monotonic() + timeout
        futures = [_stop_later(ref) for ref in stopping]
        for future in futures:
            if future is None:
                continue
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except (pykka.ActorDeadError, pykka.Timeout):
                continue

    def close(self, identity: str, refusal: Exception) -> None:
        """Stop a child for good but keep its address, which refuses every message."""
        with self._lock:
            child = self._children.get(identity)
            self._deactivate(identity)
            if child is not None:
                child.closed = True
        if child is not None:
            _stop(child.address.close(refusal), None)

    def shut_down(self, refusal: Exception) -> None:
        """Give up on every child, for good: each is closed with `refusal` (what it had
        queued is handled first), and so is any child supervised later."""
        with self._lock:
            self._refusal = refusal
            identities = list(self._children)
        for identity in identities:
            self.close(identity, refusal)

    # -- passivation ----------------------------------------------------------------------

    def active_of_kind(self, kind: str) -> int:
        """How many children of `kind` (the identity's part before ":", "group" say) have
        an instance: a count kept as they start and stop, read without the lock."""
        return self._active_kinds.get(kind, 0)

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
        """Ask the children `to_passivate` chooses to passivate. A busy child declines;
        it is asked again `NUDGE_EVERY_S` later at the soonest. Returns how many were
        asked."""
        now = time.monotonic()
        with self._lock:
            candidates = {
                identity: child for identity, child in self._active.items() if child.spec.passivates
            }
            active = set(self._active)
        idle = [
            Idle(identity, child.spec.parent, child.address.last_told)
            for identity, child in candidates.items()
        ]
        asked = 0
        for identity in to_passivate(idle, active, now, idle_after, max_active, prefix):
            child = candidates[identity]
            # A busy child declines; asking it again every reap would flood its inbox.
            if now - child.nudged >= NUDGE_EVERY_S:
                child.nudged = now
                child.address.nudge(Passivate())
                asked += 1
        return asked

    def _moved_since(self, generation: int) -> bool:
        return self._generation != generation

    def _deactivate(self, identity: str) -> None:
        """With the lock held: the child has no running instance any more."""
        if self._active.pop(identity, None) is not None:
            kind = _kind(identity)
            self._active_kinds[kind] -= 1
            self._generation += 1
            self._changed.notify_all()

    def _passivated(self, child: _Child, inbox: Any, snapshot: Any) -> bool:
        if not self._current(child):
            return False
        child.snapshot = snapshot  # before the address lets a waker in
        if not child.address.passivate(inbox):
            child.snapshot = None
            return False
        with self._lock:
            self._deactivate(child.spec.identity)
            self.passivations += 1
        self._observer.actor_passivated(child.spec.identity)
        _log(child.spec.identity).debug("actor_passivated")
        return True

    def _wake(self, child: _Child) -> None:
        """A message came for a passivated child: start it again from the store."""
        with self._lock:
            if self._children.get(child.spec.identity) is not child or child.closed:
                return
            self.activations += 1
        self._observer.actor_activated(child.spec.identity)
        _log(child.spec.identity).debug("actor_activated")
        child.address.incarnation += 1
        self._start(child, activation=True)

    # -- crashes --------------------------------------------------------------------------

    def _current(self, child: _Child) -> bool:
        """Whether `child` is still supervised (not stopped, nor replaced, meanwhile)."""
        with self._lock:
            return self._children.get(child.spec.identity) is child

    def _start(self, child: _Child, activation: bool = False) -> None:
        snapshot, child.snapshot = child.snapshot, None
        spec, address = child.spec, child.address
        reporter = CrashReporter(
            address,
            on_crash=partial(self._crashed, child),
            on_passivate=partial(self._passivated, child),
            activation=activation,
            snapshot=snapshot if activation else None,
            wrap=None if spec.wrap is None else spec.wrap(address),
        )
        try:
            ref = spec.start(reporter)
        except Exception as error:
            self._crashed(child, error, None, [])
            return
        with self._lock:
            if self._children.get(spec.identity) is child and not child.closed:
                if spec.identity not in self._active:
                    kind = _kind(spec.identity)
                    self._active_kinds[kind] = self._active_kinds.get(kind, 0) + 1
                self._active[spec.identity] = child
                self._generation += 1
                self._changed.notify_all()
        if not address.attach(ref):
            _stop(ref, None)  # closed while it started

    def _crashed(
        self,
        child: _Child,
        error: BaseException,
        inbox: Any,
        unhandled: list[Any],
        progressed: bool = False,
    ) -> None:
        child.address.detach(inbox, unhandled)  # a closed address refuses them
        if not self._current(child):
            return  # stopped on purpose meanwhile
        with self._lock:
            self._deactivate(child.spec.identity)
        now, policy = self._clock(), child.spec.policy
        with self._lock:
            if child.closed:
                return
            decision = decide_restart(child.crashes, now, policy, self._rng, progressed)
            child.crashes = deque([*crashes_within(child.crashes, now, policy, progressed), now])
            child.closed = isinstance(decision, Escalate)
        self._observer.actor_crashed(child.spec.identity, error)
        _log(child.spec.identity).warning(
            "actor_crashed",
            error=repr(error),
            crashes_in_window=decision.crashes,
            restart_in_s=None if isinstance(decision, Escalate) else round(decision.delay, 4),
            exc_info=error,
        )
        if isinstance(decision, Escalate):
            self._escalate(child, f"{decision.reason}, last: {error!r}")
        else:
            self._scheduler.call_later(decision.delay, partial(self._restart, child))

    def _restart(self, child: _Child) -> None:
        with self._lock:
            if self._children.get(child.spec.identity) is not child or child.closed:
                return
            self.restarts += 1
        child.address.incarnation += 1
        self._observer.actor_restarted(child.spec.identity, child.address.incarnation)
        self._start(child)
        _log(child.spec.identity).warning("actor_restarted", incarnation=child.address.incarnation)

    def _escalate(self, child: _Child, reason: str) -> None:
        """Run the child's escalation, then refuse its messages (it is dead already)."""
        with self._lock:
            self.escalations += 1
        self._observer.actor_escalated(child.spec.identity, reason)
        try:
            child.spec.escalate(reason)  # stored first: whoever is refused then sees it
        except Exception as error:
            _log(child.spec.identity).error("escalation_failed", error=repr(error))
        child.address.close(child.spec.refuse(reason))


def _log(identity: str) -> Any:
    """The logger bound to a child's context: `group_id` or `agent_id` from its identity."""
    kind, _, object_id = identity.partition(":")
    context = (
        {"group_id": object_id}
        if kind == "group"
        else ({"agent_id": object_id} if kind == "agent" else {})
    )
    return log.bind(actor=kind, **context)


def _stop_later(ref: pykka.ActorRef[Any] | None) -> pykka.Future[bool] | None:
    """Ask an incarnation to stop after what it queued; the future of its stop."""
    if ref is None:
        return None
    try:
        return ref.stop(block=False)
    except pykka.ActorDeadError:
        return None


def _stop(ref: pykka.ActorRef[Any] | None, timeout: float | None) -> None:
    """Stop an incarnation after what it queued; wait up to `timeout` s (None: don't)."""
    if ref is None:
        return
    try:
        if timeout is None:
            ref.stop(block=False)
        else:
            ref.stop(block=True, timeout=timeout)
    except (pykka.ActorDeadError, pykka.Timeout):
        pass


def _kind(identity: str) -> str:
    """The kind of child an identity names: "group" for "group:<id>"."""
    return identity.partition(":")[0]
