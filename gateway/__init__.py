"""Gateway: gRPC servers, routing, batching, logging and the rollout controller."""
