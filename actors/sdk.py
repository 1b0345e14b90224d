"""The agent SDK: what you implement to plug an agent into the runtime.

An agent kind is a factory, `factory(config: dict) -> agent`; an agent has
`step(context, messages)` returning the messages it produced (or a `StepResult` with a stop
reason), and may have `stream(context, messages)` yielding them one by one. The
`AgentContext` it steps in gives its ids, its history, the cancel flag, and `Memory`: the
blocks and the memory tools, which answer with a `ToolResult` instead of raising. A step
that fails after producing messages raises `StepFailed` to keep them.

Example:
    >>> class Echo:
    ...     agent_roles = ("primary",)
    ...     def __init__(self, config: dict) -> None: ...
    ...     def step(self, context: AgentContext, messages: list[Message]) -> list[MessageCreate]:
    ...         return [MessageCreate(role="assistant", content=messages[-1].text())]
    >>> rt.agents.register("echo", Echo)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, field_validator

from actors import _memory_tools as tools
from actors._observer import NO_OBSERVER, Observer
from messages import (
    Block,
    BlockNotFound,
    Blocks,
    Message,
    MessageCreate,
    NotOwner,
    ShardLost,
    StopReason,
    StoreUnavailable,
    TransitionRefused,
)
from messages._futures import Flag

AgentRole = Literal["primary", "sleeptime"]
AGENT_ROLES: tuple[AgentRole, ...] = ("primary", "sleeptime")


class ToolResult(BaseModel):
    """What a memory tool returns to the agent: success, or an error to read and act on."""

    model_config = ConfigDict(frozen=True)
    ok: bool
    message: str

    def __str__(self) -> str:
        return self.message


COMPLETED_STOP_REASONS = (StopReason.END_TURN, StopReason.MAX_STEPS)
"""How an agent may say its step completed (`StepResult`)."""
FAILED_STOP_REASONS = (StopReason.ERROR, StopReason.TIMEOUT)
"""How an agent may say its step failed (`StepFailed`): `cancelled` and `interrupted` are
the runtime's to decide, and a run that reached its step limit completed."""


class StepResult(BaseModel):
    """An agent's output with a stop reason other than `end_turn` (e.g. `max_steps`).

    The run completes: `stop_reason` is `end_turn` or `max_steps` (a step that failed
    raises `StepFailed`)."""

    model_config = ConfigDict(frozen=True)
    messages: list[MessageCreate]
    stop_reason: StopReason = StopReason.END_TURN

    @field_validator("stop_reason")
    @classmethod
    def _completed(cls, reason: StopReason) -> StopReason:
        return checked_stop_reason(reason, COMPLETED_STOP_REASONS, "a completed step (StepResult)")


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
        stop_reason: StopReason | str = StopReason.ERROR,
        messages: Sequence[MessageCreate | Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(text)
        # Checked here, in the agent's code: a wrong value fails its run as any error does.
        self.stop_reason = checked_stop_reason(
            stop_reason, FAILED_STOP_REASONS, "a failed step (StepFailed)"
        )
        self.messages = [
            m if isinstance(m, MessageCreate) else MessageCreate.model_validate(m) for m in messages
        ]


def checked_stop_reason(
    reason: StopReason | str, allowed: tuple[StopReason, ...], what: str
) -> StopReason:
    """`reason` as a StopReason among `allowed`; ValueError saying which otherwise."""
    try:
        found = StopReason(reason)
    except ValueError:
        found = None
    if found is None or found not in allowed:
        names = " or ".join(repr(r.value) for r in allowed)
        shown = reason.value if isinstance(reason, StopReason) else reason
        raise ValueError(f"the stop reason of {what} is {names}, not {shown!r}")
    return found


class BlockEditor(Protocol):
    """Applies one edit to one stored block atomically; the runtime provides it.

    The keywords say who made the edit, for the block's history: the run (None for a
    primary agent's turn), the memory tool, and the model's tool call id if it has one.
    It raises BlockNotFound for a block deleted meanwhile.
    """

    def edit_block(
        self,
        block_id: str,
        change: Callable[[Block], str],
        *,
        run_id: str | None = None,
        tool: str | None = None,
        tool_call_id: str | None = None,
    ) -> Block: ...


class Memory:
    """The memory blocks an agent sees, and the memory tools that edit them.

    Every tool checks its input and returns a `ToolResult`; a failed check is an error
    message for the agent, never an exception that ends the run.

    The blocks are a snapshot, loaded when first looked at (a run's, once), then kept up
    to date with this memory's own edits. Every edit is applied to the block as
    committed, so an edit made meanwhile by the application or another agent is never
    lost; a block created meanwhile is seen by the runs that start afterwards, and an
    edit of a block deleted meanwhile is a tool error. Each tool takes the model's
    `tool_call_id`, recorded with the version it makes in the block's history.

    Example:
        >>> context.memory.memory_replace("human", "color: orange", "color: coral")
    """

    __slots__ = (
        "_blocks",
        "_cancelled",
        "_closed",
        "_editor",
        "_load",
        "_lock",
        "_run_id",
        "finished",
    )

    def __init__(
        self,
        blocks: Blocks | Callable[[], Blocks],
        editor: BlockEditor,
        cancelled: Callable[[], bool] = lambda: False,
        run_id: str | None = None,
    ) -> None:
        # Blocks may be given as a loader: an agent that never looks at memory costs no read.
        self._load = blocks if callable(blocks) else None
        self._blocks: Blocks | None = None if callable(blocks) else blocks
        self._editor = editor
        self._cancelled = cancelled
        self._run_id = run_id  # the sleeptime run editing (None: a primary agent's turn)
        self._lock = threading.Lock()
        self._closed = False
        self.finished = False

    def close(self) -> None:
        """The step it was given to has returned: every later edit is refused (a thread
        the agent left behind cannot edit memory in the name of a run that ended)."""
        self._closed = True

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

    def memory_replace(
        self, label: str, old: str, new: str, *, tool_call_id: str | None = None
    ) -> ToolResult:
        """Replace the one occurrence of `old` in block `label` with `new`."""
        return self._apply(
            label,
            lambda b: tools.replace(b, old, new),
            "replaced text in",
            "memory_replace",
            tool_call_id,
        )

    def memory_insert(
        self, label: str, text: str, line: int = -1, *, tool_call_id: str | None = None
    ) -> ToolResult:
        """Insert `text` at line `line` of block `label` (-1: at the end)."""
        return self._apply(
            label,
            lambda b: tools.insert(b, text, line),
            "inserted text into",
            "memory_insert",
            tool_call_id,
        )

    def memory_rethink(
        self, label: str, text: str, *, tool_call_id: str | None = None
    ) -> ToolResult:
        """Rewrite block `label` as a whole."""
        return self._apply(
            label, lambda b: tools.rethink(b, text), "rewrote", "memory_rethink", tool_call_id
        )

    def memory_finish_edits(self, *, tool_call_id: str | None = None) -> ToolResult:
        """Say that the memory edits of this step are done."""
        self.finished = True
        return ToolResult(ok=True, message="memory edits finished")

    def _apply(
        self,
        label: str,
        change: Callable[[Block], str],
        verb: str,
        tool: str,
        tool_call_id: str | None,
    ) -> ToolResult:
        if self._cancelled():
            return ToolResult(ok=False, message="the run was cancelled: no more memory edits")
        if self._closed:
            return ToolResult(ok=False, message="the step has returned: no more memory edits")
        current = self.blocks.get(label)
        if current is None:
            return ToolResult(
                ok=False,
                message=f"no block labelled {label!r}; blocks: {', '.join(self.blocks.labels())}",
            )
        try:
            updated = self._editor.edit_block(
                current.id, change, run_id=self._run_id, tool=tool, tool_call_id=tool_call_id
            )
        except tools.MemoryToolError as error:
            return ToolResult(ok=False, message=str(error))
        except BlockNotFound:
            seen = self.blocks
            with self._lock:  # gone for good: the rest of this run sees it gone
                self._blocks = Blocks(b for b in seen if b.id != current.id)
            return ToolResult(
                ok=False,
                message=f"block {label!r} was deleted and cannot be edited; blocks: "
                f"{', '.join(self.blocks.labels()) or 'none'}",
            )
        except StoreUnavailable as error:
            return ToolResult(ok=False, message=f"memory is unavailable right now: {error}")
        except TransitionRefused as ended:  # the run ended (cancelled, say) as it was edited
            return ToolResult(ok=False, message=f"the run is {ended.current}: no more memory edits")
        except (ShardLost, NotOwner) as error:  # another process took the group over
            return ToolResult(ok=False, message=f"memory cannot be edited from here: {error}")
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
    messages, which is what a long-lived conversation should use. `observer` is the
    runtime's (metrics, traces): an agent that calls a model server reports each request
    with `observer.model_request(...)`, as the `openai` kind does.
    """

    agent_id: str
    group_id: str
    run_id: str | None
    memory: Memory
    history: Callable[[], list[Message]] = field(default=list)
    cancel_event: threading.Event = field(default_factory=Flag)
    recent_history: Callable[[int], list[Message]] = field(default=lambda limit: [])
    observer: Observer = field(default=NO_OBSERVER)

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
