"""files: uploaded files in chunks, output/error files as views, the batch's endpoint

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 14:40:23.062951
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("purpose", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("filename", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=True),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("batch_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index("ix_files_expires_at", ["expires_at"], unique=False)
        batch_op.create_index("ix_files_tenant_id", ["tenant_id", "id"], unique=False)

    op.create_table(
        "file_chunks",
        sa.Column("file_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["files.id"]),
        sa.PrimaryKeyConstraint("file_id", "seq"),
    )
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.create_index("ix_queries_batch_seq", ["batch_id", "seq"], unique=False)
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "endpoint",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                server_default="/v1/council",
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column("output_file_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
        )
        batch_op.add_column(
            sa.Column("error_file_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index("ix_queries_batch_seq")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("error_file_id")
        batch_op.drop_column("output_file_id")
        batch_op.drop_column("endpoint")
    op.drop_table("file_chunks")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_tenant_id")
        batch_op.drop_index("ix_files_expires_at")
        batch_op.drop_index(batch_op.f("ix_files_batch_id"))
    op.drop_table("files")
