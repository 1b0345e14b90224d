"""The parts of one runtime that its actors share, and the directory of live actors.

The directory finds the address of a group's or sleeptime agent's actor and has the
supervisor start one from the store when there is none (first use). Each child spec
says how to start a fresh incarnation and what escalation means: the group is marked
failed, its open runs fail, and its actors stop; the rest of the runtime goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors._pool import StepPool
from actors._protocol import FailGroupRuns
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
from actors.kinds._registry import AgentKinds
from actors.sleeptime_agent import AgentSnapshot, SleeptimeAgentActor, StepsInFlight
from actors.tracker import CancelFlags, RunTrackerActor, RunWaiters
from messages import AgentNotFound, GroupFailed, RuntimeStopped
from persistence import GroupState, Store

log = structlog.get_logger("sleeptime.directory")

# The tracker is the heart of the runtime: it is restarted however often it crashes.
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
    waiters: RunWaiters = field(default_factory=RunWaiters)
    flags: CancelFlags = field(default_factory=CancelFlags)
    steps: StepsInFlight = field(default_factory=StepsInFlight)
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
    """Addresses of GroupActors and SleeptimeAgentActors by id, started on demand."""

    def __init__(self, parts: RuntimeParts) -> None:
        self._parts = parts
        self._lock = threading.RLock()

    def start_tracker(self, recovered: Future[None] | None = None) -> None:
        """Start the run tracker; its first incarnation recovers the runs an earlier
        process left running and resolves `recovered` once that is committed."""
        parts = self._parts
        first = [recovered]

        def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
            return RunTrackerActor.start(
                reporter,
                parts.store,
                parts.scheduler,
                parts.waiters,
                parts.flags,
                reporter.address,
                recovered=first.pop() if first else None,
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

    def group(self, group_id: str) -> Address:
        """The group's address (GroupNotFound if the store has no such group)."""
        identity = f"group:{group_id}"
        with self._lock:
            address = self._parts.supervisor.child(identity)
            if address is not None:
                return address
            store, parts = self._parts.store, self._parts
            state = _once(store.group_state(group_id), lambda: store.group_state(group_id))

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                if isinstance(reporter.snapshot, GroupState):
                    return GroupActor.start(reporter, reporter.snapshot, parts)
                loaded, again = state()
                # After a crash, runs it committed may not be handed over yet; a group is
                # passivated only when everything it committed was handed over.
                hand_over = again and not reporter.activation
                return GroupActor.start(reporter, loaded, parts, hand_over=hand_over)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(group_id, reason),
                    passivates=True,
                )
            )

    def agent(self, agent_id: str) -> Address:
        """The sleeptime agent's address; its actor takes its queue from the tracker."""
        identity = f"agent:{agent_id}"
        with self._lock:
            address = self._parts.supervisor.child(identity)
            if address is not None:
                return address
            store, parts = self._parts.store, self._parts
            agent = store.get_agent(agent_id)
            if agent.role != "sleeptime":
                raise AgentNotFound(agent_id)
            group = _once(store.get_group(agent.group_id), lambda: store.get_group(agent.group_id))

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                if isinstance(reporter.snapshot, AgentSnapshot):
                    return SleeptimeAgentActor.start(
                        reporter, agent, reporter.snapshot.group, parts
                    )
                loaded, _ = group()
                return SleeptimeAgentActor.start(reporter, agent, loaded, parts)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(agent.group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(agent.group_id, reason),
                    passivates=True,
                    parent=f"group:{agent.group_id}",
                )
            )

    def tell_if_alive(self, agent_id: str, message: Any) -> None:
        """Tell the agent's running instance; a passivated one reads the news on start."""
        identity = f"agent:{agent_id}"
        supervisor = self._parts.supervisor
        address = supervisor.child(identity)
        if address is not None:
            address.tell_if_active(message, lambda: supervisor.forget_snapshot(identity))

    def broadcast(self, message: Any) -> None:
        """Tell every running group and agent actor (e.g. that a kind was registered)."""
        for identity in self._parts.supervisor.identities():
            address = self._parts.supervisor.child(identity)
            if address is not None and identity != "tracker":
                address.tell_if_active(message)

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
        log.error("group_failed", group_id=group_id, reason=reason)

    def stop(self, prefix: str, timeout: float) -> None:
        """Stop every child whose identity starts with `prefix`, after what it queued."""
        for identity in self._parts.supervisor.identities():
            if identity.startswith(prefix):
                self._parts.supervisor.stop(identity, RuntimeStopped(), timeout=timeout)

    def counts(self) -> dict[str, int]:
        identities = self._parts.supervisor.identities()
        return {
            "groups": sum(i.startswith("group:") for i in identities),
            "agents": sum(i.startswith("agent:") for i in identities),
        }
