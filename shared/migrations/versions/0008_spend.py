"""spend: cache hits in the ledger (``cached`` rows with what they saved) and in batch totals;
why a batch's queued queries wait (``batches.waiting``, e.g. for budget)

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_calls") as batch:
        batch.add_column(sa.Column("saved_usd", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("batch_usage") as batch:
        batch.add_column(sa.Column("cache_hits", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("saved_usd", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("waiting", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("waiting")
    with op.batch_alter_table("batch_usage") as batch:
        batch.drop_column("saved_usd")
        batch.drop_column("cache_hits")
    with op.batch_alter_table("provider_calls") as batch:
        batch.drop_column("saved_usd")
