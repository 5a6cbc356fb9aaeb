"""ledger: calls written before they are sent, batch totals kept with the ledger, query traces

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_calls") as batch:
        batch.add_column(sa.Column("call_key", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
        batch.add_column(sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_index("ix_provider_calls_call_key", ["call_key"], unique=True)
        batch.create_index("ix_provider_calls_worker_id", ["worker_id"])
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("circuit_waits", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("trace", sa.JSON(), nullable=True))
    op.create_table(
        "batch_usage",
        sa.Column("batch_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    # Existing batches: their totals from the ledger as it stands.
    op.execute(
        "INSERT INTO batch_usage (batch_id, calls, input_tokens, output_tokens, cost_usd) "
        "SELECT batch_id, COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
        "COALESCE(SUM(cost_usd), 0) FROM provider_calls GROUP BY batch_id"
    )


def downgrade() -> None:
    op.drop_table("batch_usage")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("trace")
    with op.batch_alter_table("queries") as batch:
        batch.drop_column("circuit_waits")
    with op.batch_alter_table("provider_calls") as batch:
        batch.drop_index("ix_provider_calls_worker_id")
        batch.drop_index("ix_provider_calls_call_key")
        batch.drop_column("worker_id")
        batch.drop_column("call_key")
