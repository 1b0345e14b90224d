"""The registry of one runtime's agent kinds, and the roles each can play."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from actors.sdk import AGENT_ROLES, AgentBehaviour, AgentFactory, AgentRole
from messages import AgentConfigError, AgentRoleError, UnknownAgentKind
from messages._errors import describe
from messages._text import Kind


class _Registration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", title="AgentKinds.register")
    kind: Kind
    factory: Callable[..., Any]
    roles: tuple[AgentRole, ...] = Field(min_length=1)


class AgentKinds:
    """The registry of agent kinds of one runtime: name -> factory(config) -> agent.

    A kind plays the roles it declares: `register(..., roles=...)`, else the factory's
    `agent_roles` attribute (the built-in kinds have one), else both roles.

    Example:
        >>> rt.agents.register("echo", lambda config: EchoAgent(**config))
        >>> rt.agents.register("notes", NotesAgent, roles=["sleeptime"])
    """

    def __init__(self) -> None:
        self._factories: dict[str, AgentFactory] = {}
        self._roles: dict[str, tuple[AgentRole, ...]] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    def register(
        self, kind: str, factory: AgentFactory, roles: Sequence[AgentRole] | None = None
    ) -> None:
        """Register (or replace) a kind playing `roles`; runs waiting for it start.

        A bad name, factory or role raises pydantic's ValidationError.
        """
        if roles is None:
            roles = getattr(factory, "agent_roles", AGENT_ROLES)
        checked = _Registration(kind=kind, factory=factory, roles=roles)
        with self._lock:
            self._factories[checked.kind] = factory
            self._roles[checked.kind] = tuple(dict.fromkeys(checked.roles))
            listeners = list(self._listeners)
        for listener in listeners:
            listener(checked.kind)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._factories)

    def __contains__(self, kind: object) -> bool:
        with self._lock:
            return kind in self._factories

    def roles(self, kind: str) -> tuple[AgentRole, ...]:
        """The roles `kind` can play (UnknownAgentKind if nobody registered it)."""
        with self._lock:
            roles = self._roles.get(kind)
            known = list(self._factories)
        if roles is None:
            raise UnknownAgentKind(kind, known)
        return roles

    def check_role(self, kind: str, role: AgentRole) -> None:
        """Raise AgentRoleError, naming the roles `kind` plays, unless it can play `role`."""
        roles = self.roles(kind)
        if role not in roles:
            raise AgentRoleError(kind, role, roles)

    def on_register(self, listener: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def build(self, kind: str, config: Mapping[str, Any]) -> AgentBehaviour:
        """Make an agent of `kind`, or raise a clear error naming what is wrong."""
        with self._lock:
            factory = self._factories.get(kind)
            known = list(self._factories)
        if factory is None:
            raise UnknownAgentKind(kind, known)
        try:
            agent = factory(dict(config))
        except (pydantic.ValidationError, AgentConfigError):
            raise
        except BaseException as error:  # user code: even SystemExit is a config error here
            raise AgentConfigError(kind, describe(error)) from error
        if not callable(getattr(agent, "step", None)):
            raise AgentConfigError(
                kind, "the factory returned an object without step(context, messages)"
            )
        return agent
