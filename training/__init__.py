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
- `training.artifacts` the native booster stored beside a version (what incremental retraining continues)
- `training.feedback`  logged predictions joined with their outcomes; the production version
- `training.drift`     PSI / KS of served requests against the training window
- `training.retrain`   one retrain, orchestrated; its steps: `retrain_data` (production and feedback),
                       `retrain_candidate` (full or incremental), `retrain_compare` (not worse than
                       production on the holdout), `retrain_publish`, `retrain_gate` (the injected
                       pre-canary load test), `retrain_canary`; plus `retrain_config`, `retrain_errors`,
                       `retrain_run` (the run row's progress and code revision)
- `training.cron`      five-field cron specs in UTC
- `training.scheduler` retrain and drift jobs on cron schedules, one leader at a time

Nothing at serving time imports this package (see ARCHITECTURE.md); it depends on `registry`,
`rollout.splits` (canary weights) and the ground floor (`chimera.settings`, `chimera.jsonsafe`). It never
imports `loadtest`: the load test a candidate passes before its canary is injected
(`training.retrain_gate.CandidateLoadTest`, implemented by `loadtest.candidate_gate.LoadTestGate`).
"""
