"""Turn requests: the answer to each turn taken with a request id, for its retries.

A retry of `step`, `stream` or `record_turn` with the request id of a turn already
recorded returns that turn's answer from here instead of taking a new turn. Keyed by
(group, request id), so a request is recorded at most once per group.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "turn_requests",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("group_id", "request_id"),
    )


def downgrade() -> None:
    op.drop_table("turn_requests")
