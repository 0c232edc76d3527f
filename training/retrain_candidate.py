"""Retraining, step "candidate": train it on the window's feedback.

- `full`: `training.pipeline.train` on the window (walk-forward train / validation / holdout);
- `incremental`: XGBoost continued training (`xgb_model=`) from the production version's stored
  native booster on the window's training part, early-stopped on its validation part.

Either way the result is a `training.pipeline.TrainResult` whose holdout is the window's last rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from registry import Registry
from training.artifacts import load_booster
from training.datasets import LABEL, data_hash
from training.metrics import evaluate
from training.models import XGBoostParams, make_params, n_trees, params_dict, platt_calibrate, positive_scores
from training.pipeline import TrainResult, degrade_labels, train
from training.retrain_config import RetrainConfig
from training.retrain_errors import RetrainError
from training.retrain_run import ProgressFn
from training.split import time_split


def train_candidate(registry: Registry, model: str, production: int, data: pd.DataFrame,
                    features: Sequence[str], config: RetrainConfig,
                    progress: ProgressFn | None = None) -> TrainResult:
    """The candidate for `config.mode`; incremental needs production's stored native booster."""
    names = list(features)
    if config.mode == "incremental":
        if progress is not None:
            progress(0.1, "loading the production booster")
        loaded = load_booster(registry, model, production)
        if loaded is None:
            raise RetrainError(f"incremental: production v{production} has no stored native booster "
                               f"(published outside the retrain loop?); run a full retrain")
        booster, meta = loaded
        return train_incremental(data, names, booster, meta, config, progress)
    if progress is not None:
        progress(0.15, "training (full)")
    return train(data, algo=config.algo, params=config.params, seed=config.seed,  # type: ignore[arg-type]
                 features=names, calibration=config.calibration, degrade=config.degrade,
                 fractions=config.fractions)


class _XGBProgress(xgb.callback.TrainingCallback):
    def __init__(self, progress: ProgressFn, lo: float, hi: float, rounds: int, stage: str) -> None:
        super().__init__()
        self.progress, self.lo, self.hi, self.rounds, self.stage = progress, lo, hi, max(1, rounds), stage
        self.done = 0

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.done += 1
        self.progress(self.lo + (self.hi - self.lo) * min(1.0, self.done / self.rounds), self.stage)
        return False


def train_incremental(data: pd.DataFrame, features: Sequence[str], booster: xgb.Booster,
                      base_meta: Mapping[str, Any], config: RetrainConfig,
                      progress: ProgressFn | None = None) -> TrainResult:
    """Continue boosting `booster` on the window's training part (early stopping on validation) and
    evaluate on its holdout; returns a TrainResult like `training.pipeline.train` does."""
    overrides = {"n_estimators": config.incremental_rounds, **dict(config.params or {})}
    hp = make_params("xgboost", overrides)
    assert isinstance(hp, XGBoostParams)
    names = list(features)
    windows = time_split(data, *config.fractions)
    X_tr, X_val, X_te = (np.ascontiguousarray(w[names].to_numpy(dtype=np.float32))
                         for w in (windows.train, windows.validation, windows.test))
    y_tr, y_val, y_te = (w[LABEL].to_numpy(dtype=np.int64) for w in (windows.train, windows.validation,
                                                                       windows.test))
    if len(np.unique(y_tr)) < 2:
        raise RetrainError("data: the training window has a single class")
    if booster.num_features() != len(names):
        raise RetrainError(f"incremental: the production booster has {booster.num_features()} features, "
                           f"the schema {len(names)}")
    rng = np.random.default_rng(config.seed)
    y_fit = degrade_labels(y_tr, config.degrade, rng) if config.degrade else y_tr
    callbacks = None
    if progress is not None:
        callbacks = [_XGBProgress(progress, 0.15, 0.65, hp.n_estimators, "training (incremental)")]
    model = xgb.XGBClassifier(
        n_estimators=hp.n_estimators, max_depth=hp.max_depth, learning_rate=hp.learning_rate,
        min_child_weight=hp.min_child_weight, subsample=hp.subsample, colsample_bytree=hp.colsample_bytree,
        reg_lambda=hp.reg_lambda, tree_method="hist", objective="binary:logistic", eval_metric="logloss",
        early_stopping_rounds=hp.early_stopping_rounds if len(X_val) else None, n_jobs=hp.n_jobs,
        random_state=config.seed, callbacks=callbacks)
    eval_set = [(X_val, y_val)] if len(X_val) else None
    model.fit(X_tr, y_fit, eval_set=eval_set, verbose=False, xgb_model=booster)
    fitted: Any = model
    if config.calibration == "platt":
        fitted = platt_calibrate(model, X_val, y_val)
    metrics = evaluate(y_te, positive_scores(fitted, X_te))
    metrics.update(n_train=float(len(X_tr)), n_validation=float(len(X_val)), n_test=float(len(X_te)))
    record: dict[str, Any] = {
        "algo": "xgboost", **params_dict(hp), "seed": config.seed, "calibration": config.calibration,
        "degrade": config.degrade, "fractions": list(config.fractions), "n_features": len(names),
        "base_trees": int(base_meta.get("n_trees", booster.num_boosted_rounds())),
    }
    trees = n_trees(fitted)
    if trees is not None:
        record["n_trees"] = trees
    return TrainResult(algo="xgboost", model=fitted, feature_names=tuple(names), metrics=metrics,
                       params=record, data_hash=data_hash(data), X_test=X_te, y_test=y_te)
