"""Retraining, step "publish": a candidate that is not worse than production goes to the registry as a
"staged" version (ONNX export and parity gate through `training.publish.publish_result`), with its
lineage (parent version, training run, window, feedback rows), production's holdout metrics beside
its own, and its native booster in `model_artifacts` (what the next incremental retrain continues)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime

from registry import Registry, VersionInfo
from training.artifacts import save_native
from training.pipeline import TrainResult
from training.publish import publish_result

# Production's holdout metrics stored on the candidate's version, as production_<name>.
PRODUCTION_METRICS = ("auc", "brier", "ece", "outcome_metric")


def publish_candidate(registry: Registry, model: str, result: TrainResult, *, production: int,
                      candidate_metrics: Mapping[str, float], production_metrics: Mapping[str, float],
                      metric: str, mode: str, run_id: int, since: datetime, until: datetime,
                      feedback_rows: int) -> VersionInfo:
    params = {**result.params, "mode": mode, "training_run": run_id,
              "training_window": [since.isoformat(), until.isoformat()], "feedback_rows": feedback_rows}
    extra = {f"production_{k}": v for k, v in production_metrics.items() if k in PRODUCTION_METRICS}
    result = dataclasses.replace(result, params=params, metrics={
        **result.metrics, **extra, "outcome_metric": candidate_metrics["outcome_metric"]})
    published = publish_result(registry, model, result, parent_version=production, status="staged",
                               metric=metric)
    save_native(registry, model, published.version, result.model)
    return published
