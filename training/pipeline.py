"""`train()`: from a time-ordered data frame to a fitted model and its test-window metrics.

The data is cut by time into train / validation / test windows (`training.split`). The model is fit
on train, early-stopped (XGBoost) and optionally Platt-calibrated on validation, and judged once on
test, which it has never seen in any way. Two knobs make a deliberately worse model for demos and
rollback drills: `degrade` (shuffle that fraction of the training labels) and `features` (train on a
subset, e.g. without the informative ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from training.datasets import LABEL, data_hash, feature_columns
from training.metrics import auc, evaluate
from training.models import (
    ALGOS,
    CALIBRATIONS,
    Algo,
    LogRegParams,
    ProbabilityModel,
    XGBoostParams,
    fit_logreg,
    fit_xgboost,
    make_params,
    n_trees,
    params_dict,
    platt_calibrate,
    positive_scores,
)
from training.split import time_split

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class TrainResult:
    """A fitted model with everything needed to export, check and publish it.

    `params` is the full record stored with the version (algo, hyper-parameters, seed, calibration,
    degrade, split fractions, number of trees used); `metrics` are measured on the test window.
    `X_test`/`y_test` are kept (float32 rows in `feature_names` order) for the parity check."""

    algo: str
    model: ProbabilityModel
    feature_names: tuple[str, ...]
    metrics: dict[str, float]
    params: dict[str, Any]
    data_hash: str
    X_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)


def _matrix(df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    return np.ascontiguousarray(df[list(features)].to_numpy(dtype=np.float32))


def _labels(df: pd.DataFrame) -> np.ndarray:
    return df[LABEL].to_numpy(dtype=np.int64)


def degrade_labels(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffle the labels of a random `fraction` of the rows among themselves: the base rate stays
    the same, the link between features and labels weakens (fraction 1 = no signal left)."""
    y = y.copy()
    k = int(round(fraction * len(y)))
    if k >= 2:
        idx = rng.choice(len(y), size=k, replace=False)
        y[idx] = y[rng.permutation(idx)]
    return y


def _fit(algo: str, params: XGBoostParams | LogRegParams, X_tr: np.ndarray, y_tr: np.ndarray,
         X_val: np.ndarray, y_val: np.ndarray, seed: int) -> ProbabilityModel:
    if isinstance(params, XGBoostParams):
        return fit_xgboost(X_tr, y_tr, X_val, y_val, params=params, seed=seed)
    return fit_logreg(X_tr, y_tr, params=params)


def train(
    df: pd.DataFrame,
    *,
    algo: Algo = "xgboost",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    features: Sequence[str] | None = None,
    calibration: str = "none",
    degrade: float = 0.0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    baseline: bool = True,
) -> TrainResult:
    """Fit `algo` ("xgboost" or "logreg") on the training window and evaluate it on the test window.

    - `params`: hyper-parameter overrides (see `XGBoostParams` / `LogRegParams`; unknown keys fail).
    - `features`: column subset and order; default every feature column (`feature_columns`).
    - `calibration`: "none" or "platt" (fitted on validation, folded into the exported model).
    - `degrade`: fraction 0..1 of training labels shuffled, for a deliberately worse model. The
      validation and test labels stay true, so early stopping and the metrics stay honest.
    - `baseline`: also fit the logistic baseline on the same windows and report its test AUC as
      `baseline_auc` (context for "does the candidate beat the baseline"; cheap).
    """
    if algo not in ALGOS:
        raise ValueError(f"algo: must be one of {', '.join(ALGOS)}, got {algo!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration: must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if not 0.0 <= degrade <= 1.0:
        raise ValueError(f"degrade: must be within 0..1, got {degrade}")
    if LABEL not in df.columns:
        raise ValueError(f"data: missing column {LABEL!r}")
    available = feature_columns(df)
    names = list(features) if features is not None else available
    missing = [f for f in names if f not in available]
    if not names or missing or len(set(names)) != len(names):
        raise ValueError(f"features: must be distinct numeric feature columns; unknown: {missing}")
    hp = make_params(algo, dict(params or {}))

    windows = time_split(df, *fractions)
    X_tr, X_val, X_te = (_matrix(w, names) for w in (windows.train, windows.validation, windows.test))
    y_tr, y_val, y_te = (_labels(w) for w in (windows.train, windows.validation, windows.test))
    if len(np.unique(y_tr)) < 2:
        raise ValueError("data: the training window has a single class")
    rng = np.random.default_rng(seed)
    y_fit = degrade_labels(y_tr, degrade, rng) if degrade > 0 else y_tr

    model = _fit(algo, hp, X_tr, y_fit, X_val, y_val, seed)
    if calibration == "platt":
        if len(X_val) == 0:
            raise ValueError("calibration: platt needs a validation window (fractions[1] > 0)")
        model = platt_calibrate(model, X_val, y_val)

    metrics: dict[str, float] = evaluate(y_te, positive_scores(model, X_te))
    metrics.update(n_train=float(len(X_tr)), n_validation=float(len(X_val)), n_test=float(len(X_te)))
    if baseline:
        base_model = fit_logreg(X_tr, y_tr, params=LogRegParams())  # true labels: the honest reference
        metrics["baseline_auc"] = auc(y_te, positive_scores(base_model, X_te))

    record: dict[str, Any] = {
        "algo": algo,
        **params_dict(hp),
        "seed": seed,
        "calibration": calibration,
        "degrade": degrade,
        "fractions": list(fractions),
        "n_features": len(names),
    }
    trees = n_trees(model)
    if trees is not None:
        record["n_trees"] = trees
    return TrainResult(
        algo=algo,
        model=model,
        feature_names=tuple(names),
        metrics=metrics,
        params=record,
        data_hash=data_hash(df),
        X_test=X_te,
        y_test=y_te,
    )
