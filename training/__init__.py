"""Training: build models from trading-signal data, export them to ONNX, prove parity, publish.

Modules, one job each (import from them directly; this package imports nothing eagerly so that
`import training` stays cheap for the CLI):

- `training.datasets`  synthetic time-ordered data, CSV/Parquet loading, feature discovery, data hash
- `training.split`     walk-forward (time-ordered, never shuffled) windows and folds
- `training.models`    XGBoost and logistic-regression baseline, optional Platt calibration
- `training.metrics`   AUC, Brier, log loss, expected calibration error, reliability table
- `training.export`    ONNX export with one normalised interface, onnxruntime scoring, parity check
- `training.pipeline`  `train()`: data frame -> fitted model + test-window metrics
- `training.publish`   `train_and_publish()` / `publish_result()`: export, parity gate, registry
- `training.benchmark` the fixed 32-feature, 200-tree model used by load tests and benchmarks

Nothing at serving time imports this package (see ARCHITECTURE.md); it depends on `registry` only.
"""
