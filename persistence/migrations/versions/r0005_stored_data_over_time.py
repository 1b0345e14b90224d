"""Stored data over time: block histories, agents joining and leaving, what was pruned.

- `block_versions`: every value a block ever had, one row per version, with who made it
  (the application, a run's tool call, or the runtime) and how (created, set, edited,
  deleted). Existing blocks get one row holding their current value (`imported`).
- `agents`: `added_turn` (the group's turns when the agent joined; 0 for the founders),
  `coverage_from_seq` (the first primary message its windows cover: 1, or the cursor + 1
  for an agent added live without backfill), `removed_at` / `removed_turn` for a
  sleeptime agent taken out of a live group (its rows stay readable), and what retention
  removed of it: `runs_pruned_through_seq` (its runs whose windows end at or before this
  primary sequence are gone) and `history_pruned_through` (its own messages up to this
  sequence are gone).
- `groups`: `messages_pruned_through` (primary messages up to this sequence are gone) and
  `turns_pruned_through` (so are the messages of turns up to this one).
- `prunes`: one row per group and prune call, what it removed, for the record.
- Indexes for paging oldest first: groups and runs by (created_at, id).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "block_versions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("block_id", sa.String(64), nullable=False),
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("tool", sa.String(64), nullable=True),
        sa.Column("tool_call_id", sa.String(200), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ux_block_versions_block", "block_versions", ["block_id", "version"], unique=True
    )
    op.create_index("ix_block_versions_group", "block_versions", ["group_id", "id"])
    op.execute(
        "INSERT INTO block_versions (block_id, group_id, agent_id, label, version, value,"
        " change, source, at) SELECT id, group_id, agent_id, label, version, value,"
        " 'imported', 'runtime', updated_at FROM blocks"
    )
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("added_turn", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("coverage_from_seq", sa.Integer(), nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("removed_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("removed_turn", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("runs_pruned_through_seq", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("history_pruned_through", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("groups") as batch:
        batch.add_column(
            sa.Column("messages_pruned_through", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("turns_pruned_through", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "prunes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("removed", sa.JSON(), nullable=False),
    )
    op.create_index("ix_prunes_group", "prunes", ["group_id", "id"])
    op.create_index("ix_groups_created", "groups", ["created_at", "id"])
    op.create_index("ix_runs_created", "runs", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_runs_created", "runs")
    op.drop_index("ix_groups_created", "groups")
    op.drop_table("prunes")
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("turns_pruned_through")
        batch.drop_column("messages_pruned_through")
    with op.batch_alter_table("agents") as batch:
        for column in (
            "history_pruned_through",
            "runs_pruned_through_seq",
            "removed_turn",
            "removed_at",
            "coverage_from_seq",
            "added_turn",
        ):
            batch.drop_column(column)
    op.drop_table("block_versions")
