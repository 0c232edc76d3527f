"""Indexes for retention of the two other tables that grow with traffic: shadow_predictions
(model, created_at) and outcomes (created_at).

Why: `chimera log prune` bounded predictions and request_errors only; shadow_predictions (a shadow version
can mirror all traffic, plus the covariate rows of canaries) and outcomes grew without bound. Prune now
deletes their old rows in batches too (chimera.cli.log_retention), and each batch finds its rows by these
indexes instead of scanning the table: shadow rows model by model and created_at < cutoff, as for
predictions (0006); outcomes by created_at < cutoff (the NOT EXISTS probe into predictions uses its
request_id key).

On PostgreSQL both are built CONCURRENTLY: a plain CREATE INDEX holds a SHARE lock on the table for the
whole build, which blocks every insert (the gateway's shadow scores and outcome reports) for as long as
reading a big table takes; CONCURRENTLY takes a lock that lets writes go on, at the price of two table
scans and of waiting for the transactions already running on the table. It cannot run inside a
transaction block, so it runs in Alembic's autocommit block (registry.migrate lets Alembic own the
transaction for that): the revisions before it are committed first, and this one is recorded only after
both indexes are built. A build that fails (a timeout, a cancel) leaves an INVALID index behind and the
database at 0009; running the upgrade again drops that index and builds it again, and skips an index
already built. SQLite: plain CREATE INDEX (a SQLite writer locks the whole file anyway).

Downgrade drops both (CONCURRENTLY on PostgreSQL).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = (("ix_shadow_predictions_model_created", "shadow_predictions", ["model", "created_at"]),
           ("ix_outcomes_created", "outcomes", ["created_at"]))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns)
        return
    with op.get_context().autocommit_block():
        for name, table, columns in INDEXES:
            if _invalid(name):  # left by a concurrent build that failed: it would never be used
                op.drop_index(name, table_name=table, postgresql_concurrently=True)
            op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)


def _invalid(name: str) -> bool:
    q = sa.text("SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace")
    return bool(op.get_bind().scalar(q, {"name": name}))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, table, _columns in INDEXES:
            op.drop_index(name, table_name=table)
        return
    with op.get_context().autocommit_block():
        for name, table, _columns in INDEXES:
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
