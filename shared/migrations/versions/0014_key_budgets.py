"""api_keys.project and api_keys.monthly_budget_usd, batches.key_id: per-key budgets and projects
(SPEC §17). A batch names the key that created it, so the ledger's calls (which name their batch)
are attributed to a key and its project by a join, and a key's month-to-date spend is a sum over
its batches' calls.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 19:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("project", AutoString(length=64), nullable=True))
        batch.add_column(sa.Column("monthly_budget_usd", sa.Float(), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("key_id", AutoString(length=40), nullable=True))
    op.create_index("ix_batches_key_id", "batches", ["key_id"])


def downgrade() -> None:
    op.drop_index("ix_batches_key_id", table_name="batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("key_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("monthly_budget_usd")
        batch.drop_column("project")
