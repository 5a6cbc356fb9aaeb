"""experiments and experiment_assignments: A/B experiments over councils (SPEC §13), and the
variant each query of an experiment's batches got

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-01 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0013"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", AutoString(length=40), nullable=False),
        sa.Column("tenant_id", AutoString(length=40), nullable=False),
        sa.Column("name", AutoString(length=64), nullable=False),
        sa.Column("metric", AutoString(length=16), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_experiments_tenant_name"),
    )
    op.create_table(
        "experiment_assignments",
        sa.Column("query_id", AutoString(length=40), nullable=False),
        sa.Column("experiment_id", AutoString(length=40), nullable=False),
        sa.Column("batch_id", AutoString(length=40), nullable=False),
        sa.Column("variant", AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("query_id"),
    )
    op.create_index(
        "ix_experiment_assignments_experiment", "experiment_assignments", ["experiment_id", "variant"]
    )
    op.create_index("ix_experiment_assignments_batch", "experiment_assignments", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_experiment_assignments_batch", table_name="experiment_assignments")
    op.drop_index("ix_experiment_assignments_experiment", table_name="experiment_assignments")
    op.drop_table("experiment_assignments")
    op.drop_table("experiments")
