"""Read side of a shadow evaluation: when a version became the model's shadow, and the paired rows it
is judged on (its score beside the served score of the same request, with the request's outcome).

A paired row is a `shadow_predictions` row of the shadow version joined on request id with the
`predictions` row that answered the request and with its outcome. Only rows the production version
served itself count: pinned (load-test) rows and failed-over rows are left out, as the canary's analysis
leaves them out, so the comparison is "shadow against what production answered" and nothing else. Like
a rollout look, a snapshot is (since, until]: re-reading the same window returns the same rows, so a
stored shadow decision recomputes exactly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import select

from registry.models import (
    Outcome,
    Prediction,
    ShadowPrediction,
    SplitAudit,
    as_utc,
    logged_between,
    mirrored_with,
    outcome_of,
)
from registry.repository import Registry


def shadow_started(registry: Registry, model: str, version: int) -> datetime | None:
    """When `version` last became the model's shadow (the audit row of that SetShadow), or None."""
    with registry.session() as s:
        rows = s.execute(select(SplitAudit.old, SplitAudit.new, SplitAudit.created_at)
                         .where(SplitAudit.model == model).order_by(SplitAudit.id.desc())).all()
    for old, new, created in rows:
        if new.get("shadow") == version and old.get("shadow") != version:
            return as_utc(created)
    return None


@dataclass(frozen=True)
class PairedRows:
    """Column arrays in log order: the served score, the shadow's, the outcome and the routing key (the
    request id's own unit when the request had none), the request's and the outcome's times, plus the
    last prediction id (a look fingerprint)."""

    served: np.ndarray
    shadow: np.ndarray
    outcome: np.ndarray
    unit: list[str]
    last_id: int
    created: np.ndarray  # epoch seconds: when the request was logged ...
    outcome_at: np.ndarray  # ... and when its outcome was stored


def paired_rows(registry: Registry, model: str, *, shadow: int, served: int, since: datetime,
                until: datetime) -> PairedRows:
    """The rows of `shadow` paired with what version `served` answered, with mirror scores and outcomes
    stored by `until`."""
    with registry.session() as s:
        rows = s.execute(
            select(Prediction.id, Prediction.score, ShadowPrediction.score, Outcome.value,
                   Prediction.routing_key, Prediction.request_id, Prediction.created_at, Outcome.created_at)
            # A mirror score stored after `until` is not part of this look, as an outcome is not: re-reading
            # the window (`chimera analyze`) must return the rows the look saw.
            .join(ShadowPrediction, mirrored_with(registry.is_postgres, model, shadow, since, until)
                  & (ShadowPrediction.created_at <= until))
            .join(Outcome, outcome_of(registry.is_postgres, since, until) & (Outcome.created_at <= until))
            .where(Prediction.model == model, Prediction.version == served,
                   Prediction.failed_version.is_(None), Prediction.pinned.is_(False),
                   *logged_between(registry.is_postgres, since, until))
            .order_by(Prediction.id)).all()
    if not rows:
        empty = np.empty(0, dtype=np.float64)
        return PairedRows(empty, empty, empty, [], 0, empty, empty)
    ids, served_s, shadow_s, value, key, rid, created, outcome_at = zip(*rows, strict=True)
    return PairedRows(served=np.array(served_s, dtype=np.float64),
                      shadow=np.array(shadow_s, dtype=np.float64), outcome=np.array(value, dtype=np.float64),
                      unit=[k or f"r:{r}" for k, r in zip(key, rid, strict=True)], last_id=int(ids[-1]),
                      created=np.array([as_utc(t).timestamp() for t in created], dtype=np.float64),
                      outcome_at=np.array([as_utc(t).timestamp() for t in outcome_at], dtype=np.float64))
