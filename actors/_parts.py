"""The parts of one runtime that its actors share, and the directory of live actors.

The directory finds the address of a group's or sleeptime agent's actor and has the
supervisor start one from the store when there is none (first use). Each child spec
says how to start a fresh incarnation and what escalation means: the group is marked
failed, its open runs fail, and its actors stop; the rest of the runtime goes on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors._pool import StepPool
from actors._scheduler import Scheduler
from actors._supervision import (
    Address,
    Chaos,
    ChildSpec,
    CrashReporter,
    RestartPolicy,
    Supervisor,
)
from actors.group import GroupActor
from actors.kinds._base import AgentKinds
from actors.sleeptime_agent import SleeptimeAgentActor
from actors.tracker import CancelFlags, RunTrackerActor, RunWaiters
from messages import (
    ActorPassivated,
    AgentNotFound,
    FailGroupRuns,
    GroupFailed,
    IsIdle,
    RuntimeStopped,
)
from persistence import Store

log = structlog.get_logger("sleeptime.directory")

# The tracker is the heart of the runtime: it is restarted however often it crashes.
IDLE_CHECK_S = 0.05  # an actor that cannot say it is idle this fast is busy
TRACKER_POLICY = RestartPolicy(max_restarts=1_000_000, within_seconds=1.0)


@dataclass
class RuntimeParts:
    """Everything an actor of this runtime may use besides its own state."""

    store: Store
    kinds: AgentKinds
    pool: StepPool
    scheduler: Scheduler
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    chaos: Chaos | None = None
    passivate_after: float | None = 60.0
    max_active_groups: int = 400
    waiters: RunWaiters = field(default_factory=RunWaiters)
    flags: CancelFlags = field(default_factory=CancelFlags)
    supervisor: Supervisor = field(init=False)
    tracker: Address = field(init=False)
    directory: ActorDirectory = field(init=False)


def _once(first: Any, load: Callable[[], Any]) -> Callable[[], tuple[Any, bool]]:
    """The preloaded state for the first start, fresh state (and `True`) for restarts."""
    pending = [first]

    def state() -> tuple[Any, bool]:
        if pending:
            return pending.pop(), False
        return load(), True

    return state


class ActorDirectory:
    """Addresses of GroupActors and SleeptimeAgentActors by id, started on demand.

    Passivation: a group idle for `passivate_after` seconds, or the least recently used
    one when more than `max_active_groups` are active, gives its actors' threads back;
    the next message reactivates it from the store. Resolving an address and telling it
    happen under one lock, so nothing reaches an actor that is being passivated.
    """

    def __init__(self, parts: RuntimeParts) -> None:
        self._parts = parts
        self._lock = threading.RLock()
        self._active: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self.passivated = 0

    def start_tracker(self) -> None:
        parts = self._parts

        def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
            return RunTrackerActor.start(
                reporter, parts.store, parts.scheduler, parts.waiters, parts.flags, reporter.address
            )

        parts.tracker = parts.supervisor.supervise(
            ChildSpec(
                "tracker",
                start,
                escalate=lambda reason: log.critical("tracker_escalated", reason=reason),
                policy=TRACKER_POLICY,
                refuse=lambda reason: RuntimeStopped(),
            )
        )

    def send_group(self, group_id: str, message: Any) -> None:
        """Tell the group's actor, activating it first if needed."""
        with self._lock:
            self.group(group_id).tell(message)

    def tell_agent(self, agent_id: str, message: Any) -> None:
        """Tell a sleeptime agent's actor, activating it first if needed."""
        with self._lock:
            self.agent(agent_id).tell(message)

    def group(self, group_id: str) -> Address:
        """The group's address (GroupNotFound if the store has no such group)."""
        identity = f"group:{group_id}"
        with self._lock:
            address = self._parts.supervisor.child(identity)
            if address is not None:
                self._touch(group_id)
                return address
            store, parts = self._parts.store, self._parts
            first = store.group_state(group_id)
            self._activate(group_id, [a.id for a in first.sleeptime])
            state = _once(first, lambda: store.group_state(group_id))

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                loaded, again = state()
                return GroupActor.start(reporter, loaded, parts, hand_over=again)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(group_id, reason),
                )
            )

    def agent(self, agent_id: str) -> Address:
        """The sleeptime agent's address; its actor takes its queue from the tracker."""
        identity = f"agent:{agent_id}"
        with self._lock:
            address = self._parts.supervisor.child(identity)
            store, parts = self._parts.store, self._parts
            if address is not None:
                return address
            agent = store.get_agent(agent_id)
            if agent.role != "sleeptime":
                raise AgentNotFound(agent_id)
            current = store.get_group(agent.group_id)
            if agent.group_id not in self._active:
                self._activate(agent.group_id, current.sleeptime_agent_ids)
            settings = _once(current, lambda: store.get_group(agent.group_id))

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                loaded, _ = settings()
                return SleeptimeAgentActor.start(reporter, agent, loaded, parts)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(agent.group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(agent.group_id, reason),
                )
            )

    def tell_if_alive(self, agent_id: str, message: Any) -> None:
        address = self._parts.supervisor.child(f"agent:{agent_id}")
        if address is not None:
            address.tell(message)

    def broadcast(self, message: Any) -> None:
        """Tell every group and agent actor (e.g. that a kind was registered)."""
        for identity in self._parts.supervisor.identities():
            address = self._parts.supervisor.child(identity)
            if address is not None and identity != "tracker":
                address.tell(message)

    # -- passivation ----------------------------------------------------------------------

    def _touch(self, group_id: str) -> None:
        entry = self._active.get(group_id)
        if entry is not None:
            self._active[group_id] = (time.monotonic(), entry[1])
            self._active.move_to_end(group_id)

    def _activate(self, group_id: str, agent_ids: list[str]) -> None:
        self._active[group_id] = (time.monotonic(), agent_ids)
        self._active.move_to_end(group_id)
        excess = len(self._active) - self._parts.max_active_groups
        for candidate in list(self._active)[:-1]:
            if excess <= 0:
                break
            if self._passivate(candidate):
                excess -= 1

    def passivate_idle(self) -> int:
        """Passivate the groups idle for longer than `passivate_after`; return how many."""
        idle_for = self._parts.passivate_after
        if idle_for is None:
            return 0
        done = 0
        now = time.monotonic()
        with self._lock:
            for group_id, (touched, _) in list(self._active.items()):
                if now - touched >= idle_for and self._passivate(group_id):
                    done += 1
        return done

    def _passivate(self, group_id: str) -> bool:
        """Stop an idle group's actors (under the lock); False if one of them is busy."""
        supervisor = self._parts.supervisor
        _, agent_ids = self._active[group_id]
        members = [f"group:{group_id}", *(f"agent:{a}" for a in agent_ids)]
        addresses = [(i, supervisor.child(i)) for i in members]
        for _, address in addresses:
            if address is None or address.refused:
                continue
            try:
                if not address.ask(IsIdle(), timeout=IDLE_CHECK_S):
                    return False
            except Exception:  # busy, restarting or gone: not now
                return False
        for identity, address in addresses:
            if address is not None and not address.refused:
                supervisor.stop(identity, ActorPassivated(), timeout=10.0)
        del self._active[group_id]
        self.passivated += 1
        log.debug("group_passivated", group_id=group_id)
        return True

    def _escalate(self, group_id: str, reason: str) -> None:
        """Too many crashes: the group fails with the reason, the rest goes on."""
        parts = self._parts
        try:
            parts.store.fail_group(group_id, reason).result()
        except Exception as error:
            log.error("group_not_marked_failed", group_id=group_id, error=repr(error))
        parts.tracker.tell(FailGroupRuns(group_id=group_id, reason=reason))
        refusal = GroupFailed(group_id, reason)
        try:
            members = [f"agent:{a}" for a in parts.store.get_group(group_id).sleeptime_agent_ids]
        except Exception:
            members = []
        for identity in [f"group:{group_id}", *members]:
            parts.supervisor.close(identity, refusal)
        with self._lock:
            self._active.pop(group_id, None)
        log.error("group_failed", group_id=group_id, reason=reason)

    def stop(self, prefix: str, timeout: float) -> None:
        """Stop every child whose identity starts with `prefix`, after what it queued."""
        with self._lock:
            if prefix == "group:":
                self._active.clear()
        for identity in self._parts.supervisor.identities():
            if identity.startswith(prefix):
                self._parts.supervisor.stop(identity, RuntimeStopped(), timeout=timeout)

    def counts(self) -> dict[str, int]:
        identities = self._parts.supervisor.identities()
        return {
            "groups": sum(i.startswith("group:") for i in identities),
            "agents": sum(i.startswith("agent:") for i in identities),
            "passivated": self.passivated,
        }
