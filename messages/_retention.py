"""Retention: what `prune` is asked to remove, and what it removed.

Example:
    >>> PruneSettings(before=datetime(2025, 1, 1, tzinfo=UTC), keep_runs=100)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from messages._text import INT32_MAX

PRUNE_KINDS = (
    "runs",
    "run_events",
    "agent_messages",
    "messages",
    "block_versions",
    "turn_requests",
)
"""What a prune removes, by kind (rows): terminal runs, their events, the sleeptime
agents' own messages of those runs, primary messages, block versions, turn requests."""
MAX_PRUNE_BATCH = 100_000


class PruneSettings(BaseModel):
    """The options of `Runtime.prune` (see there), checked.

    A naive `before` is refused (it would be ambiguous): pass an aware datetime.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", title="prune")
    before: AwareDatetime | None = None
    keep_runs: int | None = Field(default=None, ge=0, le=INT32_MAX)
    messages: StrictBool = False
    keep_messages: int | None = Field(default=None, ge=0, le=INT32_MAX)
    keep_block_versions: int | None = Field(default=None, ge=1, le=INT32_MAX)
    batch_size: int = Field(default=500, ge=1, le=MAX_PRUNE_BATCH)

    @field_validator("before")
    @classmethod
    def _in_utc(cls, before: datetime | None) -> datetime | None:
        """As UTC, the time every row is stored in: one that UTC cannot hold is refused."""
        if before is None:
            return None
        try:
            return before.astimezone(UTC)
        except OverflowError:
            raise ValueError(
                f"{before.isoformat()} is out of range once in UTC: give a time between "
                "year 1 and year 9999 in UTC"
            ) from None

    @model_validator(mode="after")
    def _something_to_prune(self) -> Self:
        if self.keep_messages is not None and not self.messages:
            raise ValueError("keep_messages applies to primary messages: pass messages=True too")
        if (
            self.before is None
            and self.keep_runs is None
            and not self.messages
            and self.keep_block_versions is None
        ):
            raise ValueError(
                "nothing to prune: give before=, keep_runs=, messages=True or keep_block_versions="
            )
        return self

    @property
    def prunes_runs(self) -> bool:
        return self.before is not None or self.keep_runs is not None

    def recorded(self) -> dict[str, object]:
        """The settings as the `prunes` table records them (JSON)."""
        values = self.model_dump()
        values["before"] = None if self.before is None else self.before.isoformat()
        return values


def no_rows() -> dict[str, int]:
    return dict.fromkeys(PRUNE_KINDS, 0)


class PruneReport(BaseModel):
    """What one `prune` call removed (or, with `dry_run`, would remove).

    - `removed`: rows by kind (see PRUNE_KINDS), over every group pruned;
    - `by_group`: the same per group, for the groups something was removed from;
    - `skipped`: groups this process does not serve (another process owns them, or
      their shard moved during the prune): nothing of them was removed;
    - `groups`: how many groups were looked at; `batches`: transactions committed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    dry_run: bool
    groups: int
    batches: int
    removed: dict[str, int]
    by_group: dict[str, dict[str, int]]
    skipped: list[str]

    @classmethod
    def merged(cls, reports: Iterable[PruneReport]) -> PruneReport:
        """One report for prunes run by several processes over the same groups (each
        prunes what it serves): a group is skipped only if every one skipped it."""
        reports = list(reports)
        removed = no_rows()
        by_group: dict[str, dict[str, int]] = {}
        for report in reports:
            for kind, count in report.removed.items():
                removed[kind] = removed.get(kind, 0) + count
            for group_id, counts in report.by_group.items():
                mine = by_group.setdefault(group_id, no_rows())
                for kind, count in counts.items():
                    mine[kind] = mine.get(kind, 0) + count
        skipped_by_all = set.intersection(*(set(r.skipped) for r in reports)) if reports else set()
        return cls(
            dry_run=any(r.dry_run for r in reports),
            groups=max((r.groups for r in reports), default=0),
            batches=sum(r.batches for r in reports),
            removed=removed,
            by_group=by_group,
            skipped=sorted(skipped_by_all),
        )
