"""The fixed benchmark model: XGBoost, exactly 200 trees of depth 6 over exactly 32 float features.

Load tests and latency benchmarks need a model of known, realistic cost (the FACTS figures, 11 us
per single row on one thread, are for this shape), so early stopping is off: the model really has
200 trees whatever the data says. Features are the 10 domain features plus 22 noise features.
"""

from __future__ import annotations

import numpy as np

from training.datasets import DOMAIN_FEATURES, synthetic_signals
from training.export import parity_check, to_onnx
from training.pipeline import train

N_FEATURES = 32
N_TREES = 200
MAX_DEPTH = 6


def benchmark_model(
    seed: int = 0, *, n_rows: int = 20_000, n_sample: int = 1024
) -> tuple[bytes, list[str], np.ndarray]:
    """(onnx_bytes, feature_names, X_sample): the exported model, its 32 feature names in input
    order, and `n_sample` float32 rows from its test window to drive load tests. The export is
    parity-checked before it is returned."""
    df = synthetic_signals(n_rows, seed, n_noise=N_FEATURES - len(DOMAIN_FEATURES))
    result = train(
        df,
        algo="xgboost",
        params={"n_estimators": N_TREES, "max_depth": MAX_DEPTH, "learning_rate": 0.05,
                "early_stopping_rounds": None},
        seed=seed,
        baseline=False,
    )
    names = list(result.feature_names)
    if len(names) != N_FEATURES or result.params.get("n_trees") != N_TREES:
        trees = result.params.get("n_trees")
        raise RuntimeError(f"benchmark model has {len(names)} features and {trees} trees")
    onnx_bytes = to_onnx(result.model, len(names), names)
    parity_check(result.model, onnx_bytes, result.X_test)
    return onnx_bytes, names, np.ascontiguousarray(result.X_test[:n_sample])
