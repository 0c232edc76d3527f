"""The prediction log's indexes, cut to what its readers need (issue 17: every index costs each logged
row an index insertion; at 100k rows/s that is the log's main server cost).

Readers, and the index each uses:
- the outcome join and ON CONFLICT (request_id): the unique index on request_id (kept);
- the rollout's looks and arms (registry.rollouts), the retraining read (registry.training_runs), and
  retention (`chimera log prune`, `chimera log export`): model = ? AND created_at in a range, so one
  (model, created_at) index replaces the two it covers: created_at alone and (model, version);
  version is a filter on rows the range already selected;
- log order: the primary key id (kept).
So each row maintains three indexes instead of four.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_predictions_model_created", "predictions", ["model", "created_at"])
    op.drop_index("ix_predictions_model_version", "predictions")
    op.drop_index("ix_predictions_created_at", "predictions")


def downgrade() -> None:
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_model_version", "predictions", ["model", "version"])
    op.drop_index("ix_predictions_model_created", "predictions")
