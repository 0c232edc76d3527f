"""Export, parity gate, registry: the only way trained models become versions.

The parity check runs on the test window before anything is written, so a version in the registry
always scores like the model that earned its metrics; on ParityError nothing is published.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from registry import Registry, VersionInfo
from training.artifacts import save_native
from training.export import parity_check, to_onnx
from training.models import Algo
from training.pipeline import TrainResult, train

PARITY_TOL = 1e-5


def publish_result(
    registry: Registry,
    model_name: str,
    result: TrainResult,
    onnx_bytes: bytes | None = None,
    *,
    parent_version: int | None = None,
    status: str = "staged",
    metric: str = "success_rate",
    tol: float = PARITY_TOL,
    save_booster: bool = True,
) -> VersionInfo:
    """Publish a trained result. `onnx_bytes` defaults to a fresh export of `result.model`; passing
    bytes explicitly is for callers that exported elsewhere, and they are checked all the same.
    Raises ParityError (publishing nothing) when the bytes do not reproduce the native scores on the
    test window within `tol`. The parity figure is stored as metric `onnx_max_abs_diff`."""
    if onnx_bytes is None:
        onnx_bytes = to_onnx(result.model, len(result.feature_names), list(result.feature_names))
    worst = parity_check(result.model, onnx_bytes, result.X_test, tol=tol)
    metrics = {**result.metrics, "onnx_max_abs_diff": worst}
    info = registry.publish_version(
        model_name,
        onnx_bytes,
        list(result.feature_names),
        metrics=metrics,  # NaN/inf are stored as null by the registry (registry.models.FiniteJSON)
        params=result.params,
        data_hash=result.data_hash,
        parent_version=parent_version,
        status=status,
        metric=metric,
    )
    # The native booster too, so `chimera retrain --mode incremental` can continue from it.
    if save_booster:
        save_native(registry, model_name, info.version, result.model)
    return info


def train_and_publish(
    registry: Registry,
    model_name: str,
    df: pd.DataFrame,
    *,
    algo: Algo = "xgboost",
    params: Mapping[str, Any] | None = None,
    parent_version: int | None = None,
    status: str = "staged",
    metric: str = "success_rate",
    **train_options: Any,
) -> tuple[VersionInfo, TrainResult]:
    """`train()` then `publish_result()`. `train_options` go to `train()` (seed, features,
    calibration, degrade, fractions, baseline)."""
    result = train(df, algo=algo, params=params, **train_options)
    info = publish_result(registry, model_name, result, parent_version=parent_version, status=status,
                          metric=metric)
    return info, result
