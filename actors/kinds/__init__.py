"""Agent kinds: what an agent is to the runtime, and the kinds that ship with it.

Example:
    >>> from actors.kinds import builtin_kinds
    >>> agent = builtin_kinds()["simulated"]({"latency_ms": 20, "seed": 7})
"""

from actors.kinds._registry import AgentKinds
from actors.kinds.memory import MemoryAgent, MemoryConfig, extract_facts
from actors.kinds.openai_chat import ModelServerError, OpenAIAgent, OpenAIConfig
from actors.kinds.scripted import ScriptedAgent, ScriptedConfig
from actors.kinds.simulated import (
    MAX_LATENCY_MS,
    SimulatedAgent,
    SimulatedConfig,
    SimulatedFailure,
    sample_latency_ms,
)
from actors.sdk import (
    AGENT_ROLES,
    AgentBehaviour,
    AgentContext,
    AgentFactory,
    AgentRole,
    BlockEditor,
    Memory,
    StepFailed,
    StepResult,
    ToolResult,
    parse_config,
    stream_of,
)


def builtin_kinds() -> dict[str, AgentFactory]:
    """The kinds every runtime registers: name -> factory(config) -> agent.

    Each declares the roles it plays in its `agent_roles`: `scripted` is a primary agent,
    `memory` a sleeptime agent, `simulated` and `openai` play both.
    """
    return {
        "scripted": ScriptedAgent,
        "memory": MemoryAgent,
        "simulated": SimulatedAgent,
        "openai": OpenAIAgent,
    }


__all__ = [
    "AGENT_ROLES",
    "MAX_LATENCY_MS",
    "AgentBehaviour",
    "AgentContext",
    "AgentFactory",
    "AgentKinds",
    "AgentRole",
    "BlockEditor",
    "Memory",
    "MemoryAgent",
    "MemoryConfig",
    "ModelServerError",
    "OpenAIAgent",
    "OpenAIConfig",
    "ScriptedAgent",
    "ScriptedConfig",
    "SimulatedAgent",
    "SimulatedConfig",
    "SimulatedFailure",
    "StepFailed",
    "StepResult",
    "ToolResult",
    "builtin_kinds",
    "extract_facts",
    "parse_config",
    "sample_latency_ms",
    "stream_of",
]
