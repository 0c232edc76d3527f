"""shadow_predictions: one row per (request id, version) instead of one per request id.

A canary row can need two mirror scores: the shadow version's (the shadow stage's paired rows,
registry.shadow_eval) and production's (the canary's covariate, rollout.covariate). With request_id
unique the second was refused, so while a model had a shadow version the covariate mirror stood aside
and those canary rows went unadjusted. Every reader already joins on (request_id, model, version).

The table is rebuilt (create, copy, drop, rename) rather than altered: 0004 declared the request_id
constraint without a name, and its name differs between SQLite and PostgreSQL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("id", "request_id", "model", "version", "score", "latency_ms", "created_at")


def _create(name: str, *, per_version: bool) -> None:
    unique = (sa.UniqueConstraint("request_id", "version", name="uq_shadow_predictions_request_version"),
              ) if per_version else ()
    op.create_table(
        name,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=not per_version),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        *unique,
    )


def _copy(*, first_per_request: bool) -> None:
    """INSERT INTO shadow_predictions_new SELECT ... FROM shadow_predictions, built by SQLAlchemy (no SQL
    from strings, tests/integration/test_safety.py); with ``first_per_request`` only each request's
    earliest row."""
    old = sa.table("shadow_predictions", *(sa.column(c) for c in COLUMNS))
    new = sa.table("shadow_predictions_new", *(sa.column(c) for c in COLUMNS))
    rows = sa.select(*(old.c[c] for c in COLUMNS))
    if first_per_request:
        inner = old.alias("earliest")
        rows = rows.where(old.c.id.in_(sa.select(sa.func.min(inner.c.id)).group_by(inner.c.request_id)))
    op.execute(new.insert().from_select(list(COLUMNS), rows))


def _rebuild(*, per_version: bool) -> None:
    _create("shadow_predictions_new", per_version=per_version)
    _copy(first_per_request=not per_version)
    op.drop_table("shadow_predictions")
    op.rename_table("shadow_predictions_new", "shadow_predictions")
    op.create_index("ix_shadow_predictions_model_version", "shadow_predictions", ["model", "version"])
    if op.get_bind().dialect.name == "postgresql":  # the copied ids must not be handed out again
        op.execute("SELECT setval(pg_get_serial_sequence('shadow_predictions', 'id'), "
                   "COALESCE((SELECT MAX(id) FROM shadow_predictions), 0) + 1, false)")


def upgrade() -> None:
    _rebuild(per_version=True)


def downgrade() -> None:
    """Back to one row per request id: the earliest mirror score of each request is kept."""
    _rebuild(per_version=False)
