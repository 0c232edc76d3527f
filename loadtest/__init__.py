"""Open-loop gRPC load generator for Chimera gateways: HDR percentiles, SLO gate, reports.

It talks to a gateway only over gRPC, like a customer does. Latency is measured from each request's
*intended* send time, so a stalled server cannot hide its queueing behind a slowed-down client
(no coordinated omission).

Entry points: `loadtest.runner.run_load_test` (programmatic), `loadtest.command.main` (what
`chimera loadtest` calls), `loadtest.candidate_gate.LoadTestGate` (the load test retraining runs before
a canary, injected into training by the CLI), `loadtest.bench.main` (`chimera bench`; its parts in
the bench_* modules). This module imports nothing, so worker processes start light.
"""
