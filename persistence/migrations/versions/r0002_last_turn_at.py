"""When each group last took a turn; 64-bit run event ids on PostgreSQL.

`groups.last_turn_at` is filled in for existing groups from their primary agent's newest
message. A 32-bit event id would run out within days of load testing on PostgreSQL; on
SQLite an integer primary key is already 64-bit.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("last_turn_at", sa.DateTime(), nullable=True))
    op.execute(
        "UPDATE groups SET last_turn_at = (SELECT max(m.created_at) FROM messages m "
        "WHERE m.agent_id = groups.primary_agent_id)"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE run_events ALTER COLUMN id TYPE BIGINT")
        op.execute("ALTER SEQUENCE IF EXISTS run_events_id_seq AS BIGINT")


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("last_turn_at")
