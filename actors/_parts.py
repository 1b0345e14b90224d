"""The parts of one runtime that its actors share, and the directory of live actors.

The directory finds the live actor of a group or sleeptime agent and starts one from
the store when there is none (first use, or after the previous one died), so the
actors' state always comes from the store and an actor never needs to know how it was
(re)started.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors._pool import StepPool
from actors._scheduler import Scheduler
from actors.group import GroupActor
from actors.kinds._base import AgentKinds
from actors.sleeptime_agent import SleeptimeAgentActor
from messages import AgentNotFound, RunStatus
from persistence import Store

log = structlog.get_logger("sleeptime.directory")


@dataclass
class RuntimeParts:
    """Everything an actor of this runtime may use besides its own state."""

    store: Store
    kinds: AgentKinds
    pool: StepPool
    scheduler: Scheduler
    tracker: pykka.ActorRef[Any] = field(init=False)
    directory: ActorDirectory = field(init=False)


class ActorDirectory:
    """Live GroupActors and SleeptimeAgentActors by id, started on demand."""

    def __init__(self, parts: RuntimeParts) -> None:
        self._parts = parts
        self._lock = threading.RLock()
        self._groups: dict[str, pykka.ActorRef[Any]] = {}
        self._agents: dict[str, pykka.ActorRef[Any]] = {}

    def group(self, group_id: str) -> pykka.ActorRef[Any]:
        """The group's actor (GroupNotFound if the store has no such group)."""
        with self._lock:
            ref = self._groups.get(group_id)
            if ref is not None and ref.is_alive():
                return ref
            state = self._parts.store.group_state(group_id)
            if ref is not None:
                log.warning("actor_restarted", actor="GroupActor", group_id=group_id)
            ref = GroupActor.start(state, self._parts)
            self._groups[group_id] = ref
            return ref

    def agent(self, agent_id: str) -> pykka.ActorRef[Any]:
        """The sleeptime agent's actor, holding its queued runs from the store."""
        with self._lock:
            ref = self._agents.get(agent_id)
            if ref is not None and ref.is_alive():
                return ref
            store = self._parts.store
            agent = store.get_agent(agent_id)
            if agent.role != "sleeptime":
                raise AgentNotFound(agent_id)
            queued = store.list_runs(agent_id=agent_id, statuses=[RunStatus.CREATED])
            if ref is not None:
                log.warning("actor_restarted", actor="SleeptimeAgentActor", agent_id=agent_id)
            ref = SleeptimeAgentActor.start(
                agent,
                store.get_group(agent.group_id),
                store.last_sequence(agent_id),
                queued,
                self._parts,
            )
            self._agents[agent_id] = ref
            return ref

    def tell_if_alive(self, agent_id: str, message: Any) -> None:
        with self._lock:
            ref = self._agents.get(agent_id)
        if ref is not None:
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                pass

    def broadcast(self, message: Any) -> None:
        """Tell every live actor (e.g. that a kind was registered)."""
        with self._lock:
            refs = [*self._groups.values(), *self._agents.values()]
        for ref in refs:
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                pass

    def agents_busy(self) -> bool:
        with self._lock:
            refs = list(self._agents.values())
        return any(ref.is_alive() and ref.proxy().busy.get() for ref in refs)

    def stop_groups(self, timeout: float) -> None:
        """Stop every GroupActor after the turns already queued to it."""
        with self._lock:
            refs = list(self._groups.values())
            self._groups.clear()
        _stop_all(refs, timeout)

    def stop_agents(self, timeout: float) -> None:
        with self._lock:
            refs = list(self._agents.values())
            self._agents.clear()
        _stop_all(refs, timeout)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "groups": sum(r.is_alive() for r in self._groups.values()),
                "agents": sum(r.is_alive() for r in self._agents.values()),
            }


def _stop_all(refs: list[pykka.ActorRef[Any]], timeout: float) -> None:
    futures = []
    for ref in refs:
        try:
            futures.append(ref.stop(block=False))
        except pykka.ActorDeadError:
            pass
    for future in futures:
        try:
            future.get(timeout=timeout)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass
