"""sleeptime-runtime's actors and its public face, the `Runtime`.

Example:
    >>> from actors import Runtime
    >>> from messages import MessageCreate
    >>> with Runtime.start("sqlite:///sleeptime.db") as rt:
    ...     group = rt.create_group(primary={"kind": "scripted"},
    ...                             sleeptime=[{"kind": "memory"}], frequency=2)
    ...     result = rt.step(group.id, [MessageCreate(role="user", content="hello")])

On an event loop, `AsyncRuntime` has the same calls, awaited:
    >>> async with await AsyncRuntime.start("sqlite:///sleeptime.db") as rt:
    ...     result = await rt.step(group.id, [MessageCreate(role="user", content="hello")])
"""

from actors._chaos import Chaos
from actors._invariants import INVARIANTS, InvariantReport
from actors._logging import configure_logging
from actors._restart import RestartPolicy
from actors._transcript import DEFAULT_PREAMBLE, render_transcript
from actors.async_runtime import AsyncRuntime, AsyncTurnStream
from actors.kinds._registry import AgentKinds
from actors.rules import INITIAL_COUNTER, decide_fire
from actors.runtime import (
    DEFAULT_MAX_ACTIVE_GROUPS,
    DEFAULT_MEMORY_PERSONA,
    DEFAULT_PASSIVATE_AFTER,
    DEFAULT_URL,
    Runtime,
    TurnStream,
)
from actors.sdk import (
    AgentBehaviour,
    AgentContext,
    AgentFactory,
    Memory,
    StepFailed,
    StepResult,
    ToolResult,
)
from messages import (
    AgentConfigError,
    AgentNotFound,
    AgentNotInGroup,
    AgentRoleError,
    BlockExists,
    BlockNotFound,
    BlockVersionNotFound,
    DatabaseInUse,
    GroupBusy,
    GroupFailed,
    GroupNotFound,
    MessageNotFound,
    NotFoundError,
    NotOwner,
    OwnershipLost,
    PrimaryAgentError,
    PruneReport,
    ReadOnlyRuntime,
    RunEventNotFound,
    RunNotFound,
    RunsTimeout,
    RuntimeBusy,
    RuntimeFailed,
    RuntimeStopped,
    SchemaMismatch,
    ShardLost,
    SleeptimeError,
    StoreRejected,
    StoreUnavailable,
    TransitionRefused,
    TurnTimeout,
    UnknownAgentKind,
)

__all__ = [
    "DEFAULT_MAX_ACTIVE_GROUPS",
    "DEFAULT_MEMORY_PERSONA",
    "DEFAULT_PASSIVATE_AFTER",
    "DEFAULT_PREAMBLE",
    "DEFAULT_URL",
    "INITIAL_COUNTER",
    "INVARIANTS",
    "AgentBehaviour",
    "AgentConfigError",
    "AgentContext",
    "AgentFactory",
    "AgentKinds",
    "AgentNotFound",
    "AgentNotInGroup",
    "AgentRoleError",
    "AsyncRuntime",
    "AsyncTurnStream",
    "BlockExists",
    "BlockNotFound",
    "BlockVersionNotFound",
    "Chaos",
    "DatabaseInUse",
    "GroupBusy",
    "GroupFailed",
    "GroupNotFound",
    "InvariantReport",
    "Memory",
    "MessageNotFound",
    "NotFoundError",
    "NotOwner",
    "OwnershipLost",
    "PrimaryAgentError",
    "PruneReport",
    "ReadOnlyRuntime",
    "RestartPolicy",
    "RunEventNotFound",
    "RunNotFound",
    "RunsTimeout",
    "Runtime",
    "RuntimeBusy",
    "RuntimeFailed",
    "RuntimeStopped",
    "SchemaMismatch",
    "ShardLost",
    "SleeptimeError",
    "StepFailed",
    "StepResult",
    "StoreRejected",
    "StoreUnavailable",
    "ToolResult",
    "TransitionRefused",
    "TurnStream",
    "TurnTimeout",
    "UnknownAgentKind",
    "configure_logging",
    "decide_fire",
    "render_transcript",
]
