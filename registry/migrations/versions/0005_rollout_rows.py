"""Rows the rollout statistics need: the split period each prediction was routed under, pinned
(load-test) traffic, the version whose failure made a row fail over, and requests that failed entirely.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("split_revision", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("failed_version", sa.Integer(), nullable=True))
    op.create_table(
        "request_errors",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, default=""),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("split_revision", sa.BigInteger(), nullable=True),
        sa.Column("routing_key", sa.String(256), nullable=False, default=""),
        sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False, default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_request_errors_model_created", "request_errors", ["model", "created_at"])


def downgrade() -> None:
    op.drop_table("request_errors")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("failed_version")
        batch.drop_column("pinned")
        batch.drop_column("split_revision")
