"""What an agent is to the runtime: a factory, a `step`, and the context it steps in."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from actors import _memory_tools as tools
from messages import (
    AgentConfigError,
    AgentRoleError,
    Block,
    Blocks,
    Kind,
    Message,
    MessageCreate,
    StopReason,
    StoreUnavailable,
    UnknownAgentKind,
)

AgentRole = Literal["primary", "sleeptime"]
AGENT_ROLES: tuple[AgentRole, ...] = ("primary", "sleeptime")


class ToolResult(BaseModel):
    """What a memory tool returns to the agent: success, or an error to read and act on."""

    model_config = ConfigDict(frozen=True)
    ok: bool
    message: str

    def __str__(self) -> str:
        return self.message


class StepResult(BaseModel):
    """An agent's output with a stop reason other than `end_turn` (e.g. `max_steps`)."""

    model_config = ConfigDict(frozen=True)
    messages: list[MessageCreate]
    stop_reason: StopReason = StopReason.END_TURN


class StepFailed(Exception):
    """A step that failed after producing messages; raise it to keep them with the run.

    The run fails with `stop_reason` (`error` or `timeout`) and this exception's text as its
    error, and `messages` (e.g. the tool calls made before the failure) are stored in the
    agent's history, tagged with the run id.

    Example:
        >>> raise StepFailed("the model server answered 500 three times", messages=done)
    """

    def __init__(
        self,
        text: str,
        *,
        stop_reason: StopReason = StopReason.ERROR,
        messages: Sequence[MessageCreate] = (),
    ) -> None:
        super().__init__(text)
        self.stop_reason = stop_reason
        self.messages = list(messages)


class BlockEditor(Protocol):
    """Applies one edit to one stored block atomically; the runtime provides it."""

    def edit_block(self, block_id: str, change: Callable[[Block], str]) -> Block: ...


class Memory:
    """The memory blocks an agent sees, and the memory tools that edit them.

    Every tool checks its input and returns a `ToolResult`; a failed check is an error
    message for the agent, never an exception that ends the run.

    Example:
        >>> context.memory.memory_replace("human", "color: orange", "color: coral")
    """

    __slots__ = ("_blocks", "_cancelled", "_editor", "_load", "_lock", "finished")

    def __init__(
        self,
        blocks: Blocks | Callable[[], Blocks],
        editor: BlockEditor,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        # Blocks may be given as a loader: an agent that never looks at memory costs no read.
        self._load = blocks if callable(blocks) else None
        self._blocks: Blocks | None = None if callable(blocks) else blocks
        self._editor = editor
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self.finished = False

    @property
    def blocks(self) -> Blocks:
        """The blocks as of the latest edit made through this memory."""
        with self._lock:
            if self._blocks is None:
                assert self._load is not None
                self._blocks = self._load()
            return self._blocks

    def value(self, label: str) -> str:
        """The text of the block with this label (KeyError if there is none)."""
        block: Block = self.blocks[label]
        return block.value

    def memory_replace(self, label: str, old: str, new: str) -> ToolResult:
        """Replace the one occurrence of `old` in block `label` with `new`."""
        return self._apply(label, lambda b: tools.replace(b, old, new), "replaced text in")

    def memory_insert(self, label: str, text: str, line: int = -1) -> ToolResult:
        """Insert `text` at line `line` of block `label` (-1: at the end)."""
        return self._apply(label, lambda b: tools.insert(b, text, line), "inserted text into")

    def memory_rethink(self, label: str, text: str) -> ToolResult:
        """Rewrite block `label` as a whole."""
        return self._apply(label, lambda b: tools.rethink(b, text), "rewrote")

    def memory_finish_edits(self) -> ToolResult:
        """Say that the memory edits of this step are done."""
        self.finished = True
        return ToolResult(ok=True, message="memory edits finished")

    def _apply(self, label: str, change: Callable[[Block], str], verb: str) -> ToolResult:
        if self._cancelled():
            return ToolResult(ok=False, message="the run was cancelled: no more memory edits")
        current = self.blocks.get(label)
        if current is None:
            return ToolResult(
                ok=False,
                message=f"no block labelled {label!r}; blocks: {', '.join(self.blocks.labels())}",
            )
        try:
            updated = self._editor.edit_block(current.id, change)
        except tools.MemoryToolError as error:
            return ToolResult(ok=False, message=str(error))
        except StoreUnavailable as error:
            return ToolResult(ok=False, message=f"memory is unavailable right now: {error}")
        seen = self.blocks
        with self._lock:
            self._blocks = Blocks(updated if b.id == updated.id else b for b in seen)
        return ToolResult(ok=True, message=f"{verb} block {label!r}")


@dataclass(frozen=True, slots=True)
class AgentContext:
    """What an agent knows while it steps.

    `run_id` is set for a sleeptime run and None for a primary turn; `cancelled()` turns
    True when the run was cancelled or timed out, and the agent should stop soon.
    `history()` reads the agent's whole stored history; `recent(n)` only its last n
    messages, which is what a long-lived conversation should use.
    """

    agent_id: str
    group_id: str
    run_id: str | None
    memory: Memory
    history: Callable[[], list[Message]] = field(default=list)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    recent_history: Callable[[int], list[Message]] = field(default=lambda limit: [])

    def recent(self, limit: int) -> list[Message]:
        """The last `limit` stored messages of this agent, oldest first (not this turn's)."""
        return self.recent_history(limit)

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; return True early if the run is cancelled meanwhile."""
        return self.cancel_event.wait(seconds)


@runtime_checkable
class AgentBehaviour(Protocol):
    """An agent: `step` takes the new messages and returns the messages it produced.

    It may return a `StepResult` to give a stop reason, and may also define
    `stream(context, messages)` yielding messages one by one (used by `Runtime.stream`).
    """

    def step(
        self, context: AgentContext, messages: list[Message]
    ) -> Sequence[MessageCreate | Mapping[str, Any]] | StepResult: ...


AgentFactory = Callable[[dict[str, Any]], AgentBehaviour]


def stream_of(
    agent: AgentBehaviour, context: AgentContext, messages: list[Message]
) -> Iterator[MessageCreate | Mapping[str, Any]]:
    """The agent's output one message at a time (its `stream` if it has one)."""
    streaming = getattr(agent, "stream", None)
    if callable(streaming):
        yield from streaming(context, messages)
        return
    output = agent.step(context, messages)
    yield from output.messages if isinstance(output, StepResult) else output


C = TypeVar("C", bound=BaseModel)


def parse_config(model: type[C], config: Mapping[str, Any]) -> C:
    """Validate a kind's config; an unknown key raises pydantic's ValidationError naming it."""
    return model.model_validate(dict(config))


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
            raise AgentConfigError(kind, f"{type(error).__name__}: {error}") from error
        if not callable(getattr(agent, "step", None)):
            raise AgentConfigError(
                kind, "the factory returned an object without step(context, messages)"
            )
        return agent
