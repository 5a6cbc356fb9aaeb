"""analytics: rollups folded from finished queries (per model and day, model pairs, per batch),
the fold's cursor, query feedback

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 15:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _str(length: int) -> AutoString:
    return AutoString(length=length)


def _counts(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Integer(), nullable=False) for name in names]


def upgrade() -> None:
    op.create_table(
        "analytics_cursor",
        sa.Column("name", _str(32), nullable=False),
        sa.Column("finished_at", sa.Integer(), nullable=False),
        sa.Column("query_id", _str(40), nullable=False),
        sa.Column("folded", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # The one cursor exists from the start, so two schedulers never race to create it.
    op.execute(
        "INSERT INTO analytics_cursor (name, finished_at, query_id, folded, updated_at) "
        "VALUES ('council', 0, '', 0, 0)"
    )
    op.create_table(
        "analytics_model_day",
        sa.Column("tenant_id", _str(40), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("model", _str(128), nullable=False),
        *_counts(
            "calls",
            "call_failures",
            "call_timeouts",
            "answers",
            "answer_failures",
            "rank_sum",
            "rank_votes",
            "first_places",
        ),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "model"),
    )
    op.create_table(
        "analytics_model_latency",
        sa.Column("tenant_id", _str(40), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("model", _str(128), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "model", "bucket"),
    )
    op.create_table(
        "analytics_pairs",
        sa.Column("tenant_id", _str(40), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("winner", _str(128), nullable=False),
        sa.Column("loser", _str(128), nullable=False),
        sa.Column("wins", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "winner", "loser"),
    )
    op.create_table(
        "analytics_batch",
        sa.Column("batch_id", _str(40), nullable=False),
        sa.Column("tenant_id", _str(40), nullable=False),
        *_counts("queries", "reviews", "reviews_valid", "reviews_invalid", "reviews_failed"),
        sa.Column("agreement_sum", sa.Float(), nullable=False),
        sa.Column("agreement_chance_sum", sa.Float(), nullable=False),
        *_counts(
            "agreement_queries",
            "synthesis_chairman",
            "synthesis_fallback_chairman",
            "synthesis_top_ranked",
            "synthesis_single",
        ),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_table(
        "analytics_batch_position",
        sa.Column("batch_id", _str(40), nullable=False),
        sa.Column("shown", sa.Integer(), nullable=False),
        *_counts("reviews", "first_ranked_first"),
        sa.PrimaryKeyConstraint("batch_id", "shown"),
    )
    op.create_table(
        "analytics_batch_stage",
        sa.Column("batch_id", _str(40), nullable=False),
        sa.Column("stage", _str(16), nullable=False),
        *_counts("calls", "failures"),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "stage"),
    )
    op.create_table(
        "analytics_batch_latency",
        sa.Column("batch_id", _str(40), nullable=False),
        sa.Column("stage", _str(16), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "stage", "bucket"),
    )
    op.create_table(
        "query_feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", _str(40), nullable=False),
        sa.Column("key_id", _str(40), nullable=False),
        sa.Column("tenant_id", _str(40), nullable=False),
        sa.Column("model", _str(128), nullable=True),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("comment", _str(2000), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("query_id", "key_id", name="uq_query_feedback_key"),
    )
    op.create_index("ix_query_feedback_tenant_model", "query_feedback", ["tenant_id", "model", "created_at"])
    op.create_index("ix_queries_finished", "queries", ["finished_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_queries_finished", table_name="queries")
    op.drop_index("ix_query_feedback_tenant_model", table_name="query_feedback")
    for table in (
        "query_feedback",
        "analytics_batch_latency",
        "analytics_batch_stage",
        "analytics_batch_position",
        "analytics_batch",
        "analytics_pairs",
        "analytics_model_latency",
        "analytics_model_day",
        "analytics_cursor",
    ):
        op.drop_table(table)
