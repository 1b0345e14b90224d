"""Groups, agents and memory blocks: what a caller creates and reads back."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from messages._content import Message
from messages._text import INT32_MAX, Kind, Name, NonEmptyText, Text, check_json_object

DEFAULT_BLOCK_LIMIT = 5000
MEMORY_PERSONA = "memory_persona"
DEFAULT_RUN_TIMEOUT = 600.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_RUN_TIMEOUT = 7 * 24 * 3600.0
"""A week: longer than any sleeptime run should take, and far from timer limits."""
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def _json_config(value: Any) -> dict[str, Any]:
    return check_json_object(value, "config")


JsonObject = Annotated[dict[str, Any], BeforeValidator(_json_config)]
"""A dict that round-trips through JSON the same on every backend (see `check_json`)."""


class AgentSpec(BaseModel):
    """How to build an agent: a registered kind, its config, an optional name.

    Example:
        >>> AgentSpec(kind="simulated", config={"latency_ms": 20, "seed": 7})
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Kind
    config: JsonObject = {}
    name: Name | None = None


class Agent(BaseModel):
    """A stored agent: the spec plus its id, group and role."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    group_id: str
    role: Literal["primary", "sleeptime"]
    name: str
    kind: str
    config: dict[str, Any]
    created_at: datetime
    # -- groups over their life (read-only: set by the runtime) --
    added_turn: int = 0
    """The group's turns when this agent joined it (0 for the agents it was created with)."""
    coverage_from_seq: int = 1
    """The first primary message sequence this sleeptime agent's windows cover: 1, the
    cursor + 1 when added live, or the first message still stored when added with backfill."""
    removed_at: datetime | None = None
    """When this sleeptime agent was taken out of its live group (None: still a member)."""
    removed_turn: int | None = None
    """The group's turns when it was removed: it took part in firings up to this turn."""


def check_label(label: str) -> str:
    """Return `label` if it is a usable block label, else raise ValueError saying why."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ValueError(
            f"block label {label!r} must start with a letter and hold only letters, digits,"
            " '_' or '-' (64 characters at most)"
        )
    return label


class BlockCreate(BaseModel):
    """A memory block as given to `create_group(blocks=...)`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: Text = ""
    limit: int = Field(default=DEFAULT_BLOCK_LIMIT, gt=0, le=INT32_MAX)
    read_only: bool = False
    description: Text | None = None

    @model_validator(mode="after")
    def _fits(self) -> BlockCreate:
        if len(self.value) > self.limit:
            raise ValueError(
                f"block value has {len(self.value)} characters, over its limit of "
                f"{self.limit}: shorten it or raise 'limit'"
            )
        return self


class Block(BaseModel):
    """A labelled, size-limited text shared by a group's agents (or owned by one agent)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    group_id: str
    agent_id: str | None = None
    label: str
    value: str
    limit: int
    read_only: bool = False
    description: str | None = None
    version: int = 1


class Blocks(list[Block]):
    """The blocks an agent sees, in order; also indexable by label.

    Example:
        >>> blocks = rt.get_blocks(agent_id)
        >>> blocks["human"].value
    """

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for block in self:
                if block.label == key:
                    return block
            raise KeyError(f"no block labelled {key!r}; labels: {self.labels()}")
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return key in self.labels()
        return super().__contains__(key)

    def get(self, label: str) -> Block | None:
        """The block with this label, or None."""
        return next((b for b in self if b.label == label), None)

    def labels(self) -> list[str]:
        return [b.label for b in self]


class GroupSettings(BaseModel):
    """The tunable settings of a group (all but its agents)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Integers are bounded by their column (32 bits on PostgreSQL), so that both backends
    # accept the same values.
    frequency: int | None = Field(default=None, ge=0, le=INT32_MAX)
    preamble: NonEmptyText | None = None
    transcript_max_messages: int | None = Field(default=None, ge=1, le=INT32_MAX)
    run_timeout: float = Field(
        default=DEFAULT_RUN_TIMEOUT, gt=0, le=MAX_RUN_TIMEOUT, allow_inf_nan=False
    )
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=INT32_MAX)

    def settings(self) -> GroupSettings:
        """Just the settings (of a `GroupCreate`, say), as validated already."""
        return GroupSettings.model_construct(
            **{name: getattr(self, name) for name in GroupSettings.model_fields}
        )


class GroupCreate(GroupSettings):
    """Everything `create_group` takes, validated at the boundary."""

    primary: AgentSpec
    sleeptime: list[AgentSpec] = Field(min_length=1)
    blocks: dict[str, Text | BlockCreate] | None = None

    @field_validator("sleeptime")
    @classmethod
    def _check_personas(cls, sleeptime: list[AgentSpec]) -> list[AgentSpec]:
        for index, spec in enumerate(sleeptime):
            persona = spec.config.get(MEMORY_PERSONA, "")
            if not isinstance(persona, str):
                raise ValueError(
                    f"sleeptime agent {index}: config {MEMORY_PERSONA!r} must be text (the "
                    f"agent's standing instructions), not {type(persona).__name__!r}"
                )
        return sleeptime

    @field_validator("blocks")
    @classmethod
    def _check_blocks(
        cls, blocks: dict[str, str | BlockCreate] | None
    ) -> dict[str, str | BlockCreate] | None:
        for label, block in (blocks or {}).items():
            check_label(label)
            if label == MEMORY_PERSONA:
                raise ValueError(
                    f"{MEMORY_PERSONA!r} is each sleeptime agent's own block: set it with"
                    f" 'memory_persona' in that agent's config instead"
                )
            if isinstance(block, str) and len(block) > DEFAULT_BLOCK_LIMIT:
                raise ValueError(
                    f"block {label!r} has {len(block)} characters, over the default limit of "
                    f"{DEFAULT_BLOCK_LIMIT}: shorten it, or give it as "
                    f"{{'value': ..., 'limit': N}} with a larger limit"
                )
        return blocks

    def block_specs(self) -> dict[str, BlockCreate]:
        """The shared blocks to create (default: empty `human` and `persona`)."""
        if self.blocks is None:
            return {"human": BlockCreate(), "persona": BlockCreate()}
        return {
            label: BlockCreate(value=b) if isinstance(b, str) else b
            for label, b in self.blocks.items()
        }


class Group(BaseModel):
    """A primary agent, its sleeptime agents, and the state that decides when they fire."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    primary_agent_id: str
    sleeptime_agent_ids: list[str]
    frequency: int | None
    counter: int
    cursor: str | None
    turns: int
    preamble: str | None
    transcript_max_messages: int | None
    run_timeout: float
    max_attempts: int
    status: Literal["active", "failed"] = "active"
    failure_reason: str | None = None
    created_at: datetime
    updated_at: datetime | None = None
    last_turn_at: datetime | None = None

    @property
    def agent_ids(self) -> list[str]:
        """The sleeptime agent ids, in the group's order (Letta's name for them)."""
        return self.sleeptime_agent_ids

    def settings(self) -> GroupSettings:
        return GroupSettings(
            frequency=self.frequency,
            preamble=self.preamble,
            transcript_max_messages=self.transcript_max_messages,
            run_timeout=self.run_timeout,
            max_attempts=self.max_attempts,
        )


class GroupOwner(BaseModel):
    """Who serves a group: the process holding its shard's lease (SPEC 15).

    `owner` names that process (pid, host, since when) and `address` is where it said
    it can be reached; both are None while the shard is between owners. `here` is True
    when the process that answered serves the group itself.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    group_id: str
    shard: int
    owner: str | None
    address: str | None
    epoch: int
    expires_at: datetime | None
    here: bool


class TurnResult(BaseModel):
    """What one turn produced and whether sleeptime fired.

    `messages` are the primary agent's output (for `record_turn`: every message recorded).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    group_id: str
    turn: int
    messages: list[Message]
    fired: bool
    run_ids: list[str]
