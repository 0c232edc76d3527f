"""What one gateway process runs with (`GatewayConfig`): built by hand (tests, the demo) or from
chimera.settings (`chimera serve`); constructing one never reads the environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chimera.settings import (
    DEFAULT_LOG_FEATURES_SAMPLE,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_CONNECTION_AGE_S,
    DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S,
    DEFAULT_REPLICA_NUM_CPUS,
    DEFAULT_REPLICA_SHUTDOWN_WAIT_S,
    DEFAULT_SPILL_MAX_BYTES,
    DEFAULT_TRACES_EXPORTER,
    AuthSettings,
    ReplicaScaling,
    Settings,
    TlsSettings,
)
from gateway.serving.replica_pool import BatchConfig


@dataclass
class GatewayConfig:
    """What one gateway process runs with. The defaults of the settings-backed fields (tokens, replica
    CPUs, TLS, tracing, feature sampling, promotion gate) are chimera.settings' defaults, and
    `from_settings` fills them from a Settings read from the environment; constructing a config never
    reads the environment itself (tests and the demo build one by hand)."""

    registry_url: str
    port: int = 50051
    host: str = "127.0.0.1"
    metrics_port: int | None = None
    admin_token: str | None = field(default=AuthSettings.admin_token, repr=False)
    replica_cpus: float = DEFAULT_REPLICA_NUM_CPUS
    replica_scaling: ReplicaScaling = field(default_factory=ReplicaScaling)  # fixed, or Serve autoscaling
    # A stopping replica (undeployed, scaled down) sleeps this long before it first counts its calls in
    # flight, so that Serve's routers have stopped sending to it (Ray Serve's graceful_shutdown_wait_loop_s).
    replica_shutdown_wait_s: float = DEFAULT_REPLICA_SHUTDOWN_WAIT_S
    batch: BatchConfig = field(default_factory=BatchConfig)
    spill_dir: Path = Path(".chimera")
    # `chimera serve --processes N` (chimera.cli.workers): this process's index among the workers that
    # share the port, and whether it binds with SO_REUSEPORT. A worker's spill files carry its index
    # (index 0 keeps the single-process names), so each replays its own after a restart.
    worker: int = 0
    reuse_port: bool = False
    poll_interval_s: float = 0.25
    # Shutdown: health turns NOT_SERVING at once; new calls are still taken for `drain_delay_s` (so load
    # balancers see NOT_SERVING and move away, capped at a quarter of the grace period), then in-flight
    # calls get the rest of `grace_period_s`, then the prediction log is flushed.
    grace_period_s: float = 10.0
    drain_delay_s: float = 1.0
    # Every PredictionService call must carry 'authorization: Bearer <token>' with this token or the
    # admin token (None: Predict is open, as on a private network or behind a mesh).
    predict_token: str | None = field(default=AuthSettings.predict_token, repr=False)
    # RecordOutcome(s) need this token or the admin token (None: as Predict); calls handled at once
    # (beyond: RESOURCE_EXHAUSTED at once, gateway.api.wire; None/0: no cap).
    outcomes_token: str | None = field(default=AuthSettings.outcomes_token, repr=False)
    max_concurrent_calls: int | None = DEFAULT_MAX_CONCURRENT_CALLS
    # A client connection older than this gets a GOAWAY and reconnects (0: never), so that connections
    # spread again over workers and gateways (chimera.settings.GatewaySettings says why).
    max_connection_age_s: float = DEFAULT_MAX_CONNECTION_AGE_S
    # An outcome accepted while the database was down whose request id is still unknown this long
    # after it was accepted goes to the dead-letter file (see gateway.records.outcome_log).
    outcome_unknown_grace_s: float = 300.0
    log_features_sample: float = DEFAULT_LOG_FEATURES_SAMPLE  # fraction logged with their feature row
    spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES  # bound on each local spill (predictions, outcomes)
    # Rollout controller: seconds between looks (0 disables it in this gateway).
    controller_interval_s: float = 2.0
    # Where the controller's looks run: True, a child process (rollout.lookprocess); False, a thread of
    # this process; None (default), a child process on PostgreSQL and a thread on SQLite (see
    # `looks_in_child`).
    controller_process: bool | None = None
    # Promotion needs a passing load test of the version at most this old (None: no such gate).
    promotion_loadtest_max_age_s: float | None = DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S
    # TLS: server certificate and key (PEM files); a client CA on top requires client certificates
    # signed by it (mutual TLS). All None: plaintext (for loopback and service meshes).
    tls_cert: Path | None = TlsSettings.cert
    tls_key: Path | None = TlsSettings.key
    tls_client_ca: Path | None = TlsSettings.client_ca
    # OpenTelemetry spans (chimera.tracing): none | console | otlp | memory. The replicas this gateway
    # deploys get the same exporter as an init argument.
    traces_exporter: str = DEFAULT_TRACES_EXPORTER

    def looks_in_child(self) -> bool:
        """Whether the controller's looks run in a child process. By default on PostgreSQL, the backend
        of production volumes, where one look reads millions of rows (docs/performance.md, "The
        PostgreSQL soak with the controller"); on SQLite, the embedded default, a thread (no process to
        start, and an in-memory SQLite database cannot be shared with another process)."""
        if self.controller_process is not None:
            return self.controller_process
        return self.registry_url.startswith(("postgresql", "postgres:"))

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GatewayConfig:
        """The config `chimera serve` runs: every settings-backed field from `settings`; `overrides`
        (the command's options, and fields settings do not hold, such as the port) win."""
        values: dict[str, Any] = {
            "registry_url": settings.registry.url,
            "admin_token": settings.auth.admin_token,
            "predict_token": settings.auth.predict_token,
            "outcomes_token": settings.auth.outcomes_token,
            "max_concurrent_calls": settings.gateway.max_concurrent_calls,
            "replica_cpus": settings.ray.replica_num_cpus,
            "replica_scaling": settings.ray.scaling,
            "replica_shutdown_wait_s": settings.ray.replica_shutdown_wait_s,
            "log_features_sample": settings.gateway.log_features_sample,
            "spill_max_bytes": settings.gateway.spill_max_bytes,
            "max_connection_age_s": settings.gateway.max_connection_age_s,
            "promotion_loadtest_max_age_s": settings.rollout.promotion_loadtest_max_age_s,
            "tls_cert": settings.tls.cert,
            "tls_key": settings.tls.key,
            "tls_client_ca": settings.tls.client_ca,
            "traces_exporter": settings.tracing.exporter,
            "batch": BatchConfig(local_channel=settings.gateway.local_replica_channel,
                                 stall_timeout_s=settings.gateway.replica_stall_timeout_s),
        }
        return cls(**{**values, **overrides})
