"""The parts of one runtime that its actors share, and the directory of live actors.

The directory finds the address of a group's or sleeptime agent's actor and has the
supervisor start one from the store when there is none (first use). Each child spec
says how to start a fresh incarnation and what escalation means: for a group or agent,
the group is marked failed, its open runs fail, and its actors stop; the rest of the
runtime goes on. For the run tracker, which every run change goes through, the whole
runtime stops taking work and says why (`RuntimeFailed`); what is stored stays intact.

The directory is also where chaos is wired in, from outside the actors: a crashing
wrapper around each actor's receive, and a failing wrapper around each sleeptime agent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors._address import Address
from actors._chaos import Chaos, CrashInjection, failing_steps
from actors._observer import NO_OBSERVER, Observer
from actors._pool import StepPool
from actors._protocol import FailGroupRuns
from actors._pykka import Dispatcher
from actors._restart import RestartPolicy
from actors._scheduler import Scheduler
from actors._settings import GroupSettings
from actors._supervised import CrashReporter
from actors._supervisor import ChildSpec, Supervisor
from actors.group import GroupActor, GroupWiring
from actors.kinds._registry import AgentKinds
from actors.sleeptime_agent import AgentSnapshot, AgentWiring, SleeptimeAgentActor, StepsInFlight
from actors.tracker import CancelFlags, RunTrackerActor, RunWaiters
from messages import AgentNotFound, GroupFailed, RuntimeFailed, RuntimeStopped
from messages._log import get_logger
from persistence import GroupState, Store

log = get_logger("sleeptime.directory")

TRACKER_POLICY = RestartPolicy(
    max_restarts=20,
    within_seconds=10.0,
    backoff_base=0.01,
    backoff_max=0.25,
    jitter=0.2,
    reset_on_progress=True,
)
"""The run tracker's. Every run waits for it, so it is restarted soon and as often as it
crashes while it still gets work done; a crash loop (more than 20 crashes within 10 s
with no message handled between them) escalates, within about 5 s: its backoff stops at
0.25 s, so 21 crashes fit in the window."""


@dataclass
class RuntimeParts:
    """The pieces of one runtime, made once by the `Runtime` (the composition root).

    No actor sees this: the directory gives each actor only what it uses (`GroupWiring`,
    `AgentWiring`). `tracker` is set when the tracker starts; `failure` when it escalates.
    """

    store: Store
    kinds: AgentKinds
    pool: StepPool
    scheduler: Scheduler
    dispatcher: Dispatcher
    """The threads the sleeptime agents' actors share (they have none of their own)."""
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    chaos: Chaos | None = None
    observer: Observer = field(default=NO_OBSERVER)
    waiters: RunWaiters = field(default_factory=RunWaiters)
    flags: CancelFlags = field(default_factory=CancelFlags)
    steps: StepsInFlight = field(default_factory=StepsInFlight)
    crashes: CrashInjection = field(init=False)
    failure: str | None = field(default=None, init=False)
    """Why the runtime takes no more work (its run tracker escalated); None while it does."""
    supervisor: Supervisor = field(init=False)
    tracker: Address = field(init=False)

    def __post_init__(self) -> None:
        self.crashes = CrashInjection(self.chaos)
        self.supervisor = Supervisor(self.scheduler, observer=self.observer)


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
        self._closed: set[str] = set()  # "group:", "agent:": no new actor of that kind
        self._settings = GroupSettings()  # shared by each group's actor and its agents' steps

    def close(self, prefix: str) -> None:
        """Start no more actors whose identity starts with `prefix` (the runtime is
        stopping): asking for one raises RuntimeStopped. Once this returns, no actor of
        that kind is being started, so stopping those that run stops them all."""
        with self._lock:
            self._closed.add(prefix)

    def _check_open(self, identity: str) -> None:
        if identity.startswith(tuple(self._closed)):
            raise RuntimeStopped()

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
                observer=parts.observer,
            )

        parts.tracker = parts.supervisor.supervise(
            ChildSpec(
                "tracker",
                start,
                escalate=self._tracker_failed,
                policy=TRACKER_POLICY,
                refuse=RuntimeFailed,
                wrap=parts.crashes.wrapper,
            )
        )

    def _tracker_failed(self, reason: str) -> None:
        """The tracker crashed too often: the runtime takes no more work, and says why.

        Every actor is stopped after what it had queued, and every later call that would
        take work raises RuntimeFailed; nothing stored is changed, so the runs still open
        are recovered by the next start."""
        parts = self._parts
        parts.failure = reason
        log.critical("tracker_escalated", reason=reason)
        refusal = RuntimeFailed(reason)
        parts.supervisor.shut_down(refusal)
        parts.waiters.fail(refusal)

    def group(self, group_id: str) -> Address:
        """The group's address (GroupNotFound if the store has no such group, NotOwner
        if another process serves it)."""
        identity = f"group:{group_id}"
        if not self._parts.store.serves(group_id):
            raise self._parts.store.not_owner(group_id)
        address = self._parts.supervisor.child(identity)
        if address is not None:  # the common case, without waiting for the directory
            return address
        with self._lock:
            address = self._parts.supervisor.child(identity)
            if address is not None:
                return address
            self._check_open(identity)
            store, parts = self._parts.store, self._parts
            state = _once(store.group_state(group_id), lambda: store.group_state(group_id))
            wiring = GroupWiring(
                store=store,
                build_agent=parts.kinds.build,
                tracker=parts.tracker,
                agent=self.agent,
                notify_agent=self.tell_if_alive,
                scheduler=parts.scheduler,
                observer=parts.observer,
                settings=self._settings,
            )

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                if isinstance(reporter.snapshot, GroupState):
                    return GroupActor.start(reporter, reporter.snapshot, wiring)
                loaded, again = state()
                # After a crash, runs it committed may not be handed over yet; a group is
                # passivated only when everything it committed was handed over.
                hand_over = again and not reporter.activation
                return GroupActor.start(reporter, loaded, wiring, hand_over=hand_over)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(group_id, reason),
                    passivates=True,
                    wrap=parts.crashes.wrapper,
                )
            )

    def agent(self, agent_id: str) -> Address:
        """The sleeptime agent's address; its actor takes its queue from the tracker."""
        identity = f"agent:{agent_id}"
        address = self._parts.supervisor.child(identity)
        if address is not None:  # the common case, without waiting for the directory
            return address
        with self._lock:
            address = self._parts.supervisor.child(identity)
            if address is not None:
                return address
            self._check_open(identity)
            store, parts = self._parts.store, self._parts
            agent = store.get_agent(agent_id)
            if agent.role != "sleeptime" or agent.removed_at is not None:
                raise AgentNotFound(agent_id)  # (a removed agent's actor never starts again)
            group = _once(store.get_group(agent.group_id), lambda: store.get_group(agent.group_id))

            def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
                incarnation = reporter.address.incarnation
                wiring = AgentWiring(
                    store=store,
                    build=failing_steps(parts.kinds.build, parts.chaos, agent.id, incarnation),
                    known=parts.kinds.__contains__,
                    tracker=parts.tracker,
                    pool=parts.pool,
                    scheduler=parts.scheduler,
                    steps=parts.steps,
                    dispatcher=parts.dispatcher,
                    observer=parts.observer,
                    settings=self._settings,
                )
                if isinstance(reporter.snapshot, AgentSnapshot):
                    return SleeptimeAgentActor.start(
                        reporter, agent, reporter.snapshot.group, wiring
                    )
                loaded, _ = group()
                return SleeptimeAgentActor.start(reporter, agent, loaded, wiring)

            return parts.supervisor.supervise(
                ChildSpec(
                    identity,
                    start,
                    escalate=lambda reason: self._escalate(agent.group_id, reason),
                    policy=parts.policy,
                    refuse=lambda reason: GroupFailed(agent.group_id, reason),
                    passivates=True,
                    parent=f"group:{agent.group_id}",
                    wrap=parts.crashes.wrapper,
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
        log.error("group_escalated", group_id=group_id, reason=reason)
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

    def stop_groups(
        self,
        chosen: Callable[[str], bool],
        refusal: Callable[[str], Exception],
        timeout: float | None,
        kinds: tuple[str, ...] = ("group:", "agent:"),
    ) -> None:
        """Stop the actors of the groups `chosen(group_id)` picks, and then their agents'
        (each after what it queued); later messages are refused with `refusal(group_id)`.
        `kinds` says which (groups, agents or both); with `timeout` None, do not wait
        for them to stop."""
        supervisor = self._parts.supervisor
        groups: list[tuple[str, str]] = []
        agents: list[tuple[str, str]] = []
        for identity in supervisor.identities():
            if identity.startswith("group:"):
                group_id = identity.removeprefix("group:")
            elif identity.startswith("agent:"):
                group_id = (supervisor.parent_of(identity) or "group:").removeprefix("group:")
            else:
                continue
            if group_id and identity.startswith(kinds) and chosen(group_id):
                (groups if identity.startswith("group:") else agents).append((identity, group_id))
        for identity, group_id in [*groups, *agents]:
            supervisor.stop(
                identity, refusal(group_id), timeout=timeout or 0.0, wait=timeout is not None
            )

    def stop(self, prefix: str, timeout: float) -> None:
        """Stop every child whose identity starts with `prefix`, after what it queued,
        all at once; wait up to `timeout` s in all."""
        supervisor = self._parts.supervisor
        chosen = [i for i in supervisor.identities() if i.startswith(prefix)]
        supervisor.stop_all(chosen, RuntimeStopped(), timeout)

    def counts(self) -> dict[str, int]:
        identities = self._parts.supervisor.identities()
        return {
            "groups": sum(i.startswith("group:") for i in identities),
            "agents": sum(i.startswith("agent:") for i in identities),
        }
