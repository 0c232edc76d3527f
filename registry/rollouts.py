"""Read side of rollouts: the logged rows of each arm, when a canary started, stored decisions.

A decision snapshot is (since, until]: predictions logged in the window and the outcomes stored by
`until`. Rows carry their insert time, so re-reading the same window later returns the same rows and
`chimera analyze` can recompute a decision exactly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select

from registry.models import Decision, Outcome, Prediction, SplitAudit, as_utc
from registry.repository import Registry


@dataclass(frozen=True)
class ArmRows:
    version: int
    outcomes: np.ndarray
    scores: np.ndarray
    requests: int
    p99_latency_ms: float


def arm_rows(registry: Registry, model: str, version: int, since: datetime, until: datetime) -> ArmRows:
    with registry.session() as s:
        window = (Prediction.model == model, Prediction.version == version,
                  Prediction.created_at >= since, Prediction.created_at <= until)
        requests = int(s.scalar(select(func.count()).select_from(Prediction).where(*window)) or 0)
        latencies = np.array(s.scalars(select(Prediction.latency_ms).where(*window)).all(), dtype=float)
        joined = s.execute(
            select(Outcome.value, Prediction.score)
            .join(Outcome, Outcome.request_id == Prediction.request_id)
            .where(*window, Outcome.created_at <= until)
            .order_by(Prediction.id)).all()
    outcomes = np.array([r[0] for r in joined], dtype=float)
    scores = np.array([r[1] for r in joined], dtype=float)
    p99 = float(np.percentile(latencies, 99)) if latencies.size else float("nan")
    return ArmRows(version, outcomes, scores, requests, p99)


def rollout_start(registry: Registry, model: str, canary: int) -> datetime | None:
    """When the current canary last went from no traffic to some: the start of its experiment."""
    with registry.session() as s:
        rows = s.execute(select(SplitAudit.old, SplitAudit.new, SplitAudit.created_at)
                         .where(SplitAudit.model == model).order_by(SplitAudit.id.desc())).all()
    key = str(canary)
    for old, new, created in rows:
        if new.get(key, 0) > 0 and old.get(key, 0) == 0:
            return as_utc(created)
    return None


def _decision_dict(row: Decision) -> dict[str, Any]:
    return {
        "id": row.id, "model": row.model, "baseline_version": row.baseline_version,
        "canary_version": row.canary_version, "action": row.action, "metric": row.metric, "test": row.test,
        "statistic": row.statistic, "p_value": row.p_value, "n_baseline": row.n_baseline,
        "n_canary": row.n_canary, "mean_baseline": row.mean_baseline, "mean_canary": row.mean_canary,
        "weight_before": row.weight_before, "weight_after": row.weight_after, "reason": row.reason,
        "details": row.details, "created_at": as_utc(row.created_at),
    }


def record_decision(registry: Registry, decision: dict[str, Any]) -> None:
    """Store a decision that changes no split (hold); split-changing ones go through set_split."""
    with registry.transaction() as s:
        s.add(Decision(**decision))


def decisions(registry: Registry, model: str, *, canary: int | None = None, since: datetime | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    q = select(Decision).where(Decision.model == model)
    if canary is not None:
        q = q.where(Decision.canary_version == canary)
    if since is not None:
        q = q.where(Decision.created_at >= since)
    q = q.order_by(Decision.id.desc())
    if limit is not None:
        q = q.limit(limit)
    with registry.session() as s:
        return [_decision_dict(r) for r in s.scalars(q)]


def get_decision(registry: Registry, decision_id: int) -> dict[str, Any] | None:
    with registry.session() as s:
        row = s.get(Decision, decision_id)
        return _decision_dict(row) if row is not None else None
