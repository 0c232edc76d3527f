"""Read side of rollouts: the logged rows of each arm, when a canary started, stored decisions.

A decision snapshot is (since, until]: predictions logged in the window and the outcomes stored by
`until`. Rows carry their insert time, so re-reading the same window later returns the same rows and
`chimera analyze` can recompute a decision exactly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, cast, extract, func, insert, or_, select

from registry.models import (
    Decision,
    Outcome,
    Prediction,
    RequestError,
    ShadowPrediction,
    SplitAudit,
    as_utc,
    logged_between,
    mirrored_with,
    outcome_of,
)
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
                  *logged_between(registry.is_postgres, since, until))
        requests = int(s.scalar(select(func.count()).select_from(Prediction).where(*window)) or 0)
        latencies = np.array(s.scalars(select(Prediction.latency_ms).where(*window)).all(), dtype=float)
        joined = s.execute(
            select(Outcome.value, Prediction.score)
            .join(Outcome, outcome_of(registry.is_postgres, since, until))
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


def _epoch_column(column: Any, postgres: bool) -> Any:
    """A time column as the database's own count of microseconds since the epoch (PostgreSQL: exact,
    and no datetime object per row for the driver to build), or the column itself (SQLite: text that
    SQLAlchemy parses; `_epochs` converts)."""
    if not postgres:
        return column
    return cast(func.round(extract("epoch", column) * 1_000_000), BigInteger)


def _epochs(values: tuple[Any, ...], postgres: bool) -> np.ndarray:
    """Epoch seconds of a fetched time column, each equal to `_epoch` of its datetime (microseconds
    over 10**6, correctly rounded either way); None -> NaN."""
    if postgres:
        return np.array(values, dtype=np.float64) / 1e6  # integers below 2**53: exact, None -> NaN
    first = next((v for v in values if v is not None), None)
    if first is not None and first.tzinfo is not None:  # not SQLite's naive UTC: one by one
        return np.array([_epoch(v) for v in values], dtype=np.float64)
    us = np.array(values, dtype="datetime64[us]")  # naive UTC, as SQLite's rows come back
    out = us.astype(np.int64) / 1e6
    out[np.isnat(us)] = np.nan
    return out


def _ints(values: tuple[Any, ...], missing: int) -> np.ndarray:
    return np.array([missing if v is None else v for v in values], dtype=np.int64)


def look_rows(registry: Registry, model: str, versions: tuple[int, ...], since: datetime,
              until: datetime, covariate_version: int | None = None) -> LookRows:
    """The rows a rollout look reads (see LookRows); pinned (load-test) traffic is left out here.
    ``covariate_version``: whose score is the rows' covariate; default the first of ``versions`` (the
    baseline of a (baseline, canary) pair). Only mirror scores stored by ``until`` count, so re-reading
    a window returns the same covariates.

    Columns, not row objects: a look reads every request since the canary started (millions of rows
    into a long rollout, docs/performance.md), so the rows are transposed once and every column is
    converted by numpy; times come from PostgreSQL as integer microseconds. The result is the one the
    row-by-row reading gave (tests/integration/test_rollout_rows.py compares the two)."""
    cov_v = versions[0] if covariate_version is None else covariate_version
    pg = registry.is_postgres
    with registry.session() as s:
        conn = s.connection()  # Core rows: no ORM row processing for millions of tuples
        preds = conn.execute(
            select(Prediction.version, Prediction.failed_version, Prediction.split_revision,
                   Prediction.routing_key, Prediction.request_id, _epoch_column(Prediction.created_at, pg),
                   Prediction.latency_ms, Prediction.score, Outcome.value,
                   _epoch_column(Outcome.created_at, pg), ShadowPrediction.score)
            .join(Outcome, outcome_of(pg, since, until) & (Outcome.created_at <= until), isouter=True)
            .join(ShadowPrediction, mirrored_with(pg, model, cov_v, since, until)
                  & (ShadowPrediction.created_at <= until), isouter=True)
            .where(Prediction.model == model, *logged_between(pg, since, until), Prediction.pinned.is_(False),
                   or_(Prediction.failed_version.in_(versions),
                       Prediction.failed_version.is_(None) & Prediction.version.in_(versions)))
            .order_by(Prediction.id)).all()
        errs = conn.execute(
            select(RequestError.version, RequestError.split_revision, RequestError.routing_key,
                   RequestError.request_id, RequestError.id, _epoch_column(RequestError.created_at, pg),
                   RequestError.latency_ms)
            .where(RequestError.model == model, *logged_between(pg, since, until, table=RequestError),
                   RequestError.pinned.is_(False), RequestError.version.in_(versions))
            .order_by(RequestError.id)).all()
    nan = float("nan")
    p_cols = list(zip(*preds, strict=True)) if preds else [()] * 11
    e_cols = list(zip(*errs, strict=True)) if errs else [()] * 7
    version, failed_version, rev, key, rid, created, lat, score, value, out_at, mirrored = p_cols
    failed_v = _ints(failed_version, -1)
    served = np.array(version, dtype=np.int64)
    p_score = np.array(score, dtype=np.float64)
    routed = np.concatenate([np.where(failed_v >= 0, failed_v, served),
                             np.array(e_cols[0], dtype=np.int64)])
    units = ([k or f"r:{r}" for k, r in zip(key, rid, strict=True)]
             + [k or f"e:{r or i}" for k, r, i in zip(e_cols[2], e_cols[3], e_cols[4], strict=True)])
    created_at = np.concatenate([_epochs(created, pg), _epochs(e_cols[5], pg)])
    n_e = len(errs)
    # The covariate: the row's own score when the covariate version answered it, else its mirror score.
    cov = np.where(served == cov_v, p_score, np.array(mirrored, dtype=np.float64))
    cols = {
        "routed": routed,
        "revision": np.concatenate([_ints(rev, -1), _ints(e_cols[1], -1)]),
        "created": created_at,
        "latency_ms": np.concatenate([np.array(lat, dtype=np.float64),
                                      np.array(e_cols[6], dtype=np.float64)]),
        "failed": np.concatenate([failed_v >= 0, np.ones(n_e, dtype=bool)]),
        "score": np.concatenate([p_score, np.full(n_e, nan)]),
        "value": np.concatenate([np.array(value, dtype=np.float64), np.full(n_e, nan)]),
        "outcome_at": np.concatenate([_epochs(out_at, pg), np.full(n_e, nan)]),
        "covariate": np.concatenate([cov, np.full(n_e, nan)]),
    }
    # Log order: by time, predictions before request errors at the same time, each table in id order.
    kind = np.concatenate([np.zeros(len(preds), dtype=np.int8), np.ones(n_e, dtype=np.int8)])
    order = np.lexsort((kind, created_at))  # stable: equal keys keep the id order above
    return LookRows(unit=[units[i] for i in order.tolist()], **{k: v[order] for k, v in cols.items()})


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
