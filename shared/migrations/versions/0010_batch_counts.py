"""batch_counts: each batch's finished queries by status, kept by the lifecycle transitions, so
reading a batch no longer groups all of its query rows

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 18:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

STATUSES = ("succeeded", "failed", "cancelled", "expired")


def upgrade() -> None:
    op.create_table(
        "batch_counts",
        sa.Column("batch_id", AutoString(length=40), nullable=False),
        *(sa.Column(s, sa.Integer(), server_default="0", nullable=False) for s in STATUSES),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    # The batches that exist already: counted once from their query rows. Run with the workers
    # stopped (as every migration is), so no transition moves a query meanwhile.
    op.execute(
        "INSERT INTO batch_counts (batch_id, "
        + ", ".join(STATUSES)
        + ") SELECT batch_id, "
        + ", ".join(f"SUM(CASE WHEN status = '{s}' THEN 1 ELSE 0 END)" for s in STATUSES)
        + " FROM queries WHERE status IN ("
        + ", ".join(f"'{s}'" for s in STATUSES)
        + ") GROUP BY batch_id"
    )


def downgrade() -> None:
    op.drop_table("batch_counts")
