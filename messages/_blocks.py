"""Memory blocks from the application: what `create_block` and `set_block` take, and the
versions a block's history keeps (`block_history`).

Example:
    >>> BlockSpec(label="plans", value="", limit=2000)
    >>> rt.block_history(agent_id, "human")[-1].source
    'run'
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictStr, field_validator, model_validator

from messages._errors import AgentNotFound, GroupNotFound, NotFoundError
from messages._groups import BlockCreate, check_label
from messages._text import Text

BlockChange = Literal["created", "set", "edited", "deleted", "imported"]
"""How a version came about: `created` (create_group, create_block), `set` (set_block),
`edited` (a memory tool), `deleted` (delete_block: the version has no value), `imported`
(the value a block had when the database was migrated to keep histories)."""
BlockSource = Literal["application", "run", "agent", "runtime"]
"""Who made a version: the `application` (create_group, create_block, set_block,
delete_block), a sleeptime `run` (its memory tool call, named by `run_id`, `tool` and
`tool_call_id`), a primary `agent` during a turn (its memory tools; no run), or the
`runtime` (a default `memory_persona`, an imported value)."""


class BlockVersion(BaseModel):
    """One value a block had, and who gave it that value.

    `version` counts the block's values from 1 without gaps; `value` is None for the
    version that records its deletion. `id` orders versions as they were written (pass
    the last one seen as `after=` to page through a history).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: int
    block_id: str
    group_id: str
    agent_id: str | None
    label: str
    version: int
    value: str | None
    change: BlockChange
    source: BlockSource
    run_id: str | None = None
    tool: str | None = None
    tool_call_id: str | None = None
    at: datetime


class BlockSpec(BlockCreate):
    """A block as `create_block` takes it: a label, then what `create_group` takes."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="create_block")
    label: StrictStr  # (bytes are not a label: `get_block` refuses them too)

    @field_validator("label")
    @classmethod
    def _check_label(cls, label: str) -> str:
        return check_label(label)


class BlockValue(BaseModel):
    """A new value for a block (`set_block`): storable text within the block's limit."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="set_block")
    label: str
    value: Text
    limit: int

    @model_validator(mode="after")
    def _fits(self) -> BlockValue:
        if len(self.value) > self.limit:
            raise ValueError(
                f"the value has {len(self.value)} characters, over the limit of block "
                f"{self.label!r} ({self.limit}): shorten it (a block's limit is fixed when "
                "it is created)"
            )
        return self


def view_not_found(view_id: str) -> NotFoundError:
    """The error for an id that names neither an agent nor a group: GroupNotFound if it
    reads as a group's id (`group-...`), else AgentNotFound."""
    if view_id.startswith("group-"):
        return GroupNotFound(view_id)
    return AgentNotFound(view_id)
