"""Retraining, step "not worse than production": both versions scored on the same most recent holdout
(the window's last rows, which the candidate never saw), the candidate natively and production through
its ONNX bytes, then compared metric by metric.

The metrics: AUC, Brier, expected calibration error, log loss and the model's declared outcome metric
(`outcome_metric`):
- brier / log_loss: the loss of the scores against the labels;
- success_rate: the success rate of the requests the model would act on (score >= decision threshold);
- mean_outcome: the mean outcome per request when acting on score >= decision threshold (0 otherwise).

The gate: for every metric in `gate`, the candidate must not be worse than production by more than
`tolerance` (in the metric's own units; a negative tolerance demands an improvement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from chimera.jsonsafe import nan_to_none
from training.datasets import LABEL, TIMESTAMP
from training.export import onnx_scores
from training.feedback import OUTCOME
from training.metrics import evaluate, logloss
from training.models import positive_scores
from training.pipeline import TrainResult
from training.retrain_config import GATE_METRICS
from training.retrain_errors import RetrainError

LOWER_IS_BETTER = frozenset({"brier", "log_loss", "ece"})


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    production: float
    candidate: float
    higher_is_better: bool
    worse: bool
    note: str = ""

    @property
    def delta(self) -> float:
        return self.candidate - self.production


@dataclass(frozen=True)
class HoldoutComparison:
    """Both versions on the same holdout. `record` is the JSON-safe summary stored on the run row."""

    candidate: dict[str, float]
    production: dict[str, float]
    comparison: tuple[MetricComparison, ...]
    rows: int
    record: dict[str, Any]

    @property
    def worse(self) -> list[MetricComparison]:
        return [c for c in self.comparison if c.worse]


def outcome_metric(metric: str, y: np.ndarray, scores: np.ndarray, outcomes: np.ndarray,
                   decision_threshold: float = 0.5) -> float:
    """The model's declared metric on a holdout (see the module docstring). NaN when undefined
    (e.g. success_rate of a model that would act on no request)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    if metric == "brier":
        return float(np.mean((p - y) ** 2))
    if metric == "log_loss":
        return logloss(y, p)
    acted = p >= decision_threshold
    if metric == "success_rate":
        return float(y[acted].mean()) if acted.any() else math.nan
    if metric == "mean_outcome":
        return float(np.mean(np.where(acted, np.asarray(outcomes, dtype=np.float64), 0.0)))
    raise ValueError(f"metric: unknown outcome metric {metric!r}")


def holdout_metrics(y: np.ndarray, scores: np.ndarray, outcomes: np.ndarray, metric: str,
                    decision_threshold: float = 0.5) -> dict[str, float]:
    """AUC, Brier, log loss, ECE, base rate, mean score and `outcome_metric` on one holdout."""
    out = evaluate(y, scores)
    out["outcome_metric"] = outcome_metric(metric, y, scores, outcomes, decision_threshold)
    out["n"] = float(len(y))
    return out


def compare_metrics(candidate: Mapping[str, float], production: Mapping[str, float], *, metric: str,
                    gate: Sequence[str] = GATE_METRICS, tolerance: float = 0.0) -> list[MetricComparison]:
    """Per gate metric: is the candidate worse than production by more than `tolerance`? A metric the
    candidate leaves undefined while production has it counts as worse; one production lacks is
    skipped (nothing to compare against)."""
    out = []
    for name in gate:
        if name == "outcome_metric":
            hib = metric not in ("brier", "log_loss")
        else:
            hib = name not in LOWER_IS_BETTER
        c, p = float(candidate.get(name, math.nan)), float(production.get(name, math.nan))
        label = f"{name} ({metric})" if name == "outcome_metric" else name
        if not math.isfinite(p):
            out.append(MetricComparison(label, p, c, hib, False, "production undefined; not compared"))
            continue
        if not math.isfinite(c):
            out.append(MetricComparison(label, p, c, hib, True, "candidate undefined"))
            continue
        worse = c < p - tolerance if hib else c > p + tolerance
        note = ""
        if worse:
            bound = f"at least {p - tolerance:.4f}" if hib else f"at most {p + tolerance:.4f}"
            note = f"{label} {c:.4f} vs production {p:.4f}: needs {bound} (tolerance {tolerance:g})"
        out.append(MetricComparison(label, p, c, hib, worse, note))
    return out


def compare_on_holdout(holdout: pd.DataFrame, result: TrainResult, production_onnx: bytes,
                       production_version: int, *, metric: str, gate: Sequence[str], tolerance: float,
                       decision_threshold: float) -> HoldoutComparison:
    """Score the candidate (`result.model` on `result.X_test`) and production (its ONNX bytes, same
    rows) on `holdout`, the feedback rows behind `result.X_test`, and compare them."""
    if len(holdout) != len(result.y_test):  # same rows, same cut: anything else is a bug
        raise RetrainError(f"holdout mismatch: {len(holdout)} rows vs {len(result.y_test)} evaluated")
    y = holdout[LABEL].to_numpy(dtype=np.int64)
    outcomes = holdout[OUTCOME].to_numpy(dtype=np.float64)
    X = result.X_test
    cand = holdout_metrics(y, positive_scores(result.model, X), outcomes, metric, decision_threshold)
    prod = holdout_metrics(y, onnx_scores(production_onnx, X), outcomes, metric, decision_threshold)
    comparison = compare_metrics(cand, prod, metric=metric, gate=gate, tolerance=tolerance)
    record: dict[str, Any] = {
        "candidate": nan_to_none(cand),
        "production": nan_to_none(prod),
        "production_version": production_version,
        "outcome_metric": metric,
        "holdout": {"rows": len(holdout), "since": holdout[TIMESTAMP].iloc[0].isoformat(),
                    "until": holdout[TIMESTAMP].iloc[-1].isoformat()},
        "comparison": [{"metric": c.metric, "production": nan_to_none(c.production),
                        "candidate": nan_to_none(c.candidate), "worse": c.worse, "note": c.note}
                       for c in comparison],
        "train": nan_to_none({k: v for k, v in result.metrics.items() if isinstance(v, float)}),
    }
    return HoldoutComparison(cand, prod, tuple(comparison), len(holdout), record)
