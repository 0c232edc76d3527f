"""Evaluation metrics for P(label=1) scores. Ranking (AUC) says whether a model separates good from
bad trades; Brier, log loss and calibration error say whether its probabilities can be taken at face
value, which matters because the gateway's rollout controller compares versions on Brier/log loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

DEFAULT_BINS = 10


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width probability bin: how many rows, what was predicted, what happened."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float


def _check(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel()
    if len(y) != len(p) or len(y) == 0:
        raise ValueError(f"metrics: need equally long, non-empty inputs, got {len(y)} and {len(p)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("metrics: labels must be 0 or 1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("metrics: scores must be probabilities within 0..1")
    return y, p


def auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; NaN when the labels have a single class (AUC is undefined there, not 0.5)."""
    y, p = _check(y_true, y_score)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, p))


def brier(y_true: np.ndarray, y_score: np.ndarray) -> float:
    y, p = _check(y_true, y_score)
    return float(brier_score_loss(y, p))


def logloss(y_true: np.ndarray, y_score: np.ndarray, eps: float = 1e-15) -> float:
    """Log loss with probabilities clipped to [eps, 1-eps] so one confident miss is finite."""
    y, p = _check(y_true, y_score)
    return float(log_loss(y, np.clip(p, eps, 1 - eps), labels=[0, 1]))


def reliability(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """Reliability table over equal-width bins on [0, 1] (the last bin includes 1.0); empty bins are
    left out. Plot mean_predicted against observed_rate: a calibrated model lies on the diagonal."""
    y, p = _check(y_true, y_score)
    if n_bins < 1:
        raise ValueError(f"n_bins: must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        if count:
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), count,
                                      float(p[mask].mean()), float(y[mask].mean())))
    return out


def ece(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error: sum over bins of (share of rows) * |observed rate - mean predicted|."""
    y, _ = _check(y_true, y_score)
    n = len(y)
    return float(sum(b.count / n * abs(b.observed_rate - b.mean_predicted)
                     for b in reliability(y_true, y_score, n_bins)))


def evaluate(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """All scalar metrics at once, under the names stored in the registry."""
    y, p = _check(y_true, y_score)
    return {
        "auc": auc(y, p),
        "brier": brier(y, p),
        "log_loss": logloss(y, p),
        "ece": ece(y, p),
        "base_rate": float(y.mean()),
        "mean_score": float(p.mean()),
    }
