"""The tables as SQLAlchemy Core sees them: one handle each, for the store's queries.

Example:
    >>> select(runs).where(runs.c.group_id == group_id)
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from persistence._models import (
    AgentRow,
    BlockRow,
    BlockVersionRow,
    GroupRow,
    MessageRow,
    PruneRow,
    RunEventRow,
    RunRow,
    TurnRequestRow,
)

groups = cast(Table, GroupRow.__table__)
agents = cast(Table, AgentRow.__table__)
blocks = cast(Table, BlockRow.__table__)
block_versions = cast(Table, BlockVersionRow.__table__)
messages = cast(Table, MessageRow.__table__)
runs = cast(Table, RunRow.__table__)
run_events = cast(Table, RunEventRow.__table__)
turn_requests = cast(Table, TurnRequestRow.__table__)
prunes = cast(Table, PruneRow.__table__)
