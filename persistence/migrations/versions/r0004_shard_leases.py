"""Shard leases: several runtime processes on one PostgreSQL database.

`shard_settings` keeps the shard count (fixed when leases are first set up),
`shard_leases` one row per shard (owner, fencing epoch, expiry), `shard_members` the
processes that share the shards; `run_events.epoch` the lease epoch each event was
written under. A SQLite database gets the tables too (one schema for both), but one
process owns a SQLite file and never reads them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=True))
    op.create_table(
        "shard_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "shard_leases",
        sa.Column("shard", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("member", sa.String(64), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("address", sa.Text(), nullable=True),
    )
    op.create_table(
        "shard_members",
        sa.Column("member", sa.String(64), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.drop_column("epoch")
    op.drop_table("shard_members")
    op.drop_table("shard_leases")
    op.drop_table("shard_settings")
