"""Gateway: the grpc.aio process that serves PredictionService and RolloutService.

Sub-packages follow a request: `api/` (protobuf <-> domain, auth, errors, wire checks) hands rows to
`serving/` (the Predictor and what it owns: router, features, catalog, split watch, batcher, replica
pool, failover, shadow), which queues their log records to `records/` (prediction and outcome logs,
spill and replay). The process itself (server, drain, metrics) sits in this package's own modules."""
