"""Read side of rollouts: the logged rows of each arm, when a canary started, stored decisions.

A decision snapshot is (since, until]: predictions logged in the window and the outcomes stored by
`until`. Rows carry their insert time, so re-reading the same window later returns the same rows and
`chimera analyze` can recompute a decision exactly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, insert, or_, select

from registry.models import Decision, Outcome, Prediction, RequestError, ShadowPrediction, SplitAudit, as_utc
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


@dataclass(frozen=True)
class LookRows:
    """Routed, non-pinned requests of two versions in a window, as column arrays in log order.

    ``routed`` is the version the request was routed to (``failed_version`` when the row failed over,
    ``version`` of a request_errors row); ``failed`` marks rows that count as an error of ``routed``;
    ``revision`` is the row's split revision (-1 for rows logged before migration 0005); ``value`` and
    ``outcome_at`` are NaN without an outcome stored by ``until``. Times are epoch seconds.
    ``covariate`` is the covariate version's score for the row (rollout.covariate, "production_score"):
    its own ``score`` when that version answered it, else the score the gateway's covariate mirror
    stored in ``shadow_predictions`` under that version's number; NaN when unknown (not mirrored,
    dropped, failed, or a request error).
    """

    routed: np.ndarray
    revision: np.ndarray
    unit: list[str]
    created: np.ndarray
    latency_ms: np.ndarray
    failed: np.ndarray
    score: np.ndarray
    value: np.ndarray
    outcome_at: np.ndarray
    covariate: np.ndarray


def _epoch(dt: datetime | None) -> float:
    return as_utc(dt).timestamp() if dt is not None else float("nan")


def look_rows(registry: Registry, model: str, versions: tuple[int, ...], since: datetime,
              until: datetime, covariate_version: int | None = None) -> LookRows:
    """The rows a rollout look reads (see LookRows); pinned (load-test) traffic is left out here.
    ``covariate_version``: whose score is the rows' covariate; default the first of ``versions`` (the
    baseline of a (baseline, canary) pair). Only mirror scores stored by ``until`` count, so re-reading
    a window returns the same covariates."""
    cov_v = versions[0] if covariate_version is None else covariate_version
    with registry.session() as s:
        preds = s.execute(
            select(Prediction.id, Prediction.version, Prediction.failed_version, Prediction.split_revision,
                   Prediction.routing_key, Prediction.request_id, Prediction.created_at,
                   Prediction.latency_ms, Prediction.score, Outcome.value, Outcome.created_at,
                   ShadowPrediction.score)
            .join(Outcome, (Outcome.request_id == Prediction.request_id) & (Outcome.created_at <= until),
                  isouter=True)
            .join(ShadowPrediction, (ShadowPrediction.request_id == Prediction.request_id)
                  & (ShadowPrediction.model == model) & (ShadowPrediction.version == cov_v)
                  & (ShadowPrediction.created_at <= until), isouter=True)
            .where(Prediction.model == model, Prediction.created_at >= since, Prediction.created_at <= until,
                   Prediction.pinned.is_(False),
                   or_(Prediction.failed_version.in_(versions),
                       Prediction.failed_version.is_(None) & Prediction.version.in_(versions)))
            .order_by(Prediction.id)).all()
        errs = s.execute(
            select(RequestError.version, RequestError.split_revision, RequestError.routing_key,
                   RequestError.request_id, RequestError.id, RequestError.created_at, RequestError.latency_ms)
            .where(RequestError.model == model, RequestError.created_at >= since,
                   RequestError.created_at <= until, RequestError.pinned.is_(False),
                   RequestError.version.in_(versions))
            .order_by(RequestError.id)).all()
    rows: list[tuple[Any, ...]] = []
    nan = float("nan")
    for (_id, version, failed_version, rev, key, rid, created, lat, score, value, out_at, mirrored) in preds:
        routed = failed_version if failed_version is not None else version
        cov = score if version == cov_v else (nan if mirrored is None else mirrored)
        rows.append((_epoch(created), 0, routed, -1 if rev is None else rev, key or f"r:{rid}", lat,
                     failed_version is not None, score, nan if value is None else value,
                     _epoch(out_at), cov))
    for version, rev, key, rid, eid, created, lat in errs:
        rows.append((_epoch(created), 1, version, -1 if rev is None else rev, key or f"e:{rid or eid}",
                     nan if lat is None else lat, True, nan, nan, nan, nan))
    rows.sort(key=lambda r: (r[0], r[1]))  # log order; stable for equal times
    cols = list(zip(*rows, strict=True)) if rows else [()] * 11
    return LookRows(
        routed=np.array(cols[2], dtype=np.int64), revision=np.array(cols[3], dtype=np.int64),
        unit=list(cols[4]), created=np.array(cols[0], dtype=np.float64),
        latency_ms=np.array(cols[5], dtype=np.float64), failed=np.array(cols[6], dtype=bool),
        score=np.array(cols[7], dtype=np.float64), value=np.array(cols[8], dtype=np.float64),
        outcome_at=np.array(cols[9], dtype=np.float64), covariate=np.array(cols[10], dtype=np.float64))


def split_periods(registry: Registry, model: str, until: datetime) -> list[tuple[int, dict[int, int], float]]:
    """(revision, weights, epoch seconds) of every split change up to ``until``, oldest first. A SetShadow's
    audit row also names the shadow (key "shadow"), which is not a weight and is left out."""
    with registry.session() as s:
        rows = s.execute(select(SplitAudit.revision, SplitAudit.new, SplitAudit.created_at)
                         .where(SplitAudit.model == model, SplitAudit.created_at <= until)
                         .order_by(SplitAudit.id)).all()
    return [(int(rev), {int(k): int(v) for k, v in new.items() if k.isdigit()}, _epoch(at))
            for rev, new, at in rows]


def insert_rollout_rows(registry: Registry, predictions: list[dict[str, Any]],
                        errors: list[dict[str, Any]] | None = None) -> None:
    """Insert prediction and request-error rows as dicts of their columns (tests and tools; the gateway
    writes the same columns through its prediction log)."""
    with registry.transaction() as s:
        if predictions:
            s.execute(insert(Prediction), predictions)
        if errors:
            s.execute(insert(RequestError), errors)


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


SHADOW_PREFIX = "shadow_"  # actions of the shadow stage's looks (rollout.shadow_gate)


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
              limit: int | None = None, shadow: bool | None = None) -> list[dict[str, Any]]:
    """Newest first. ``shadow``: True only the shadow stage's looks (action ``shadow_*``), False only the
    canary's and operators', None both."""
    q = select(Decision).where(Decision.model == model)
    if canary is not None:
        q = q.where(Decision.canary_version == canary)
    if shadow is not None:
        stage = Decision.action.startswith(SHADOW_PREFIX, autoescape=True)
        q = q.where(stage if shadow else ~stage)
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
