"""Groups over their life: what a caller gives to add a sleeptime agent to a live group."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from messages._groups import MEMORY_PERSONA, AgentSpec
from messages._text import INT32_MAX

DEFAULT_BACKFILL_WINDOW = 50
"""Primary messages per backfill run when neither the call nor the group's
`transcript_max_messages` says how many."""


class SleeptimeAgentAdd(BaseModel):
    """Everything `add_sleeptime_agent` takes besides the group, validated at the boundary."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spec: AgentSpec
    backfill: StrictBool = False
    backfill_window: int | None = Field(default=None, ge=1, le=INT32_MAX)

    @field_validator("spec")
    @classmethod
    def _check_persona(cls, spec: AgentSpec) -> AgentSpec:
        persona = spec.config.get(MEMORY_PERSONA, "")
        if not isinstance(persona, str):
            raise ValueError(
                f"config {MEMORY_PERSONA!r} must be text (the agent's standing "
                f"instructions), not {type(persona).__name__!r}"
            )
        return spec

    def window(self, transcript_max_messages: int | None) -> int:
        """Primary messages per backfill run: as asked, else the group's transcript limit,
        else `DEFAULT_BACKFILL_WINDOW`."""
        return self.backfill_window or transcript_max_messages or DEFAULT_BACKFILL_WINDOW
