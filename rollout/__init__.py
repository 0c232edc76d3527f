"""Rollout: the statistics, the pure decision policy, the controller and its loop, split arithmetic,
the audit recomputation, the simulator and the operator operations. No gRPC in here: the gateway's API
layer translates RolloutService calls into these functions."""
