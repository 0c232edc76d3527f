"""Rollouts: decisions, load-test records, per-model rollout config, scored features on predictions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("rollout_config", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("features", sa.JSON(), nullable=True))
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("baseline_version", sa.Integer(), nullable=False),
        sa.Column("canary_version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("test", sa.String(64), nullable=False),
        sa.Column("statistic", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("n_baseline", sa.Integer(), nullable=False),
        sa.Column("n_canary", sa.Integer(), nullable=False),
        sa.Column("mean_baseline", sa.Float(), nullable=True),
        sa.Column("mean_canary", sa.Float(), nullable=True),
        sa.Column("weight_before", sa.Integer(), nullable=False),
        sa.Column("weight_after", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_decisions_model", "decisions", ["model"])
    op.create_table(
        "load_tests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("failures", sa.JSON(), nullable=False),
        sa.Column("slo", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_load_tests_model", "load_tests", ["model"])
    op.create_index("ix_predictions_model_version", "predictions", ["model", "version"])


def downgrade() -> None:
    op.drop_index("ix_predictions_model_version", "predictions")
    op.drop_table("load_tests")
    op.drop_table("decisions")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("features")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("rollout_config")
