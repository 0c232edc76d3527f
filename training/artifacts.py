"""Native model artifacts stored next to a version's ONNX bytes (registry table `model_artifacts`).

ONNX is for serving and cannot be trained further; incremental training continues XGBoost from the
production version's booster, so every version the retrain loop publishes stores it too:

- format `xgboost-ubj`: the booster as UBJSON, cut to the trees predictions use (after early stopping
  the booster still holds the extra rounds); meta: n_trees, calibration, and for Platt calibration the
  slope and intercept applied to the margin.

Logistic-regression versions have no artifact (they are cheap to retrain in full).
"""

from __future__ import annotations

from typing import Any

import xgboost as xgb

from registry import Registry
from registry.training_runs import load_artifact, save_artifact
from training.models import PlattXGBoost, ProbabilityModel, n_trees

XGB_FORMAT = "xgboost-ubj"


def native_artifact(model: ProbabilityModel) -> tuple[bytes, str, dict[str, Any]] | None:
    """(bytes, format, meta) for a model from `training.models`, None when it has no native form."""
    meta: dict[str, Any] = {"calibration": "none", "xgboost": xgb.__version__}
    inner = model
    if isinstance(model, PlattXGBoost):
        inner = model.model
        meta.update(calibration="platt", slope=model.slope, intercept=model.intercept)
    if not isinstance(inner, xgb.XGBClassifier):
        return None
    trees = n_trees(inner) or inner.get_booster().num_boosted_rounds()
    booster = inner.get_booster()
    if trees < booster.num_boosted_rounds():
        booster = booster[:trees]
    meta["n_trees"] = int(trees)
    return bytes(booster.save_raw("ubj")), XGB_FORMAT, meta


def save_native(registry: Registry, model_name: str, version: int, model: ProbabilityModel) -> bool:
    """Store the native form of `model` for `model_name` v`version`; False when it has none."""
    art = native_artifact(model)
    if art is None:
        return False
    data, fmt, meta = art
    save_artifact(registry, model_name, version, data, format=fmt, meta=meta)
    return True


def load_booster(registry: Registry, model_name: str,
                 version: int) -> tuple[xgb.Booster, dict[str, Any]] | None:
    """The stored XGBoost booster of a version and its meta; None when the version has none."""
    art = load_artifact(registry, model_name, version)
    if art is None or art.format != XGB_FORMAT:
        return None
    booster = xgb.Booster()
    booster.load_model(bytearray(art.data))
    return booster, dict(art.meta)
