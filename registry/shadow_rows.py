"""Read side of the shadow diff report (`chimera shadow report`): every scored row of one shadow
version beside the score that answered the same request, with its outcome and logged features.

Unlike registry.shadow_eval (the rows a shadow *test* is judged on: one served version, outcomes only,
a fixed window), the report wants every pair, with or without an outcome, whichever version served it:
agreement and score differences need no outcome. Pinned (load-test) and failed-over rows are left out,
as every rollout read leaves them out, so the comparison is "shadow against what the routed version
answered". A row's logged features are in its *served* version's schema order (or NULL when feature
logging sampled the row out); they are aligned here by feature name into one matrix over the served
versions' names (first-seen order, lowest version first), NaN where a row has no value for a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import select

from registry.models import (
    Model,
    ModelVersion,
    Outcome,
    Prediction,
    ShadowPrediction,
    logged_between,
    mirrored_with,
    outcome_of,
)
from registry.repository import Registry


@dataclass(frozen=True)
class ShadowRows:
    """Column arrays in log order; `outcome` NaN where none is stored; `features` [n, len(names)]."""

    served_version: np.ndarray
    served: np.ndarray
    shadow: np.ndarray
    outcome: np.ndarray
    features: np.ndarray
    feature_names: tuple[str, ...]


def shadow_rows(registry: Registry, model: str, version: int, *, since: datetime | None = None,
                until: datetime | None = None) -> ShadowRows:
    """The pairs of shadow `version` of `model` whose request was logged in [since, until]."""
    q = (select(Prediction.version, Prediction.score, ShadowPrediction.score, Outcome.value,
                Prediction.features)
         .join(ShadowPrediction, mirrored_with(registry.is_postgres, model, version, since, until))
         .outerjoin(Outcome, outcome_of(registry.is_postgres, since, until))
         .where(Prediction.model == model, Prediction.failed_version.is_(None), Prediction.pinned.is_(False),
                *logged_between(registry.is_postgres, since, until)))
    with registry.session() as s:
        rows = s.execute(q.order_by(Prediction.id)).all()
        served_versions = sorted({r[0] for r in rows})
        schemas = dict(s.execute(select(ModelVersion.version, ModelVersion.feature_names)
                                 .join(Model, Model.id == ModelVersion.model_id)
                                 .where(Model.name == model, ModelVersion.version.in_(served_versions)))
                       .tuples().all())
    names: list[str] = []
    for v in served_versions:
        names.extend(n for n in schemas.get(v, []) if n not in names)
    column = {n: j for j, n in enumerate(names)}
    features = np.full((len(rows), len(names)), np.nan)
    for i, (v, _, _, _, feats) in enumerate(rows):
        schema = schemas.get(v, [])
        if feats is not None and len(feats) == len(schema):  # a row not in its schema's shape is not guessed
            cols = [column[n] for n in schema]
            features[i, cols] = np.array([np.nan if f is None else f for f in feats], dtype=np.float64)
    return ShadowRows(served_version=np.array([r[0] for r in rows], dtype=np.int64),
                      served=np.array([r[1] for r in rows], dtype=np.float64),
                      shadow=np.array([r[2] for r in rows], dtype=np.float64),
                      outcome=np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float64),
                      features=features, feature_names=tuple(names))
