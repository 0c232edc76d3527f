"""Gateway process: grpc.aio server with health and reflection, the split watcher, the prediction
log writer, the rollout controller's loop (rollout.loop) and the metrics endpoint, started and stopped
in the right order. Process-wide concerns live here too: freezing the start-up heap for the garbage
collector, and installing the tracing wrappers on the servicer when tracing is on."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge

from chimera.tracing import Tracing
from chimera.v1 import prediction_pb2, prediction_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from gateway.api import oip
from gateway.api.auth import AdminAuth, TokenAuth
from gateway.api.prediction import PredictionServicer
from gateway.api.rollout import RolloutServicer
from gateway.api.tracing_wrappers import instrument
from gateway.api.wire import register
from gateway.config import GatewayConfig
from gateway.drain import Admission, close_and_stop
from gateway.metrics import Metrics
from gateway.records.outcome_intake import OutcomeIntake
from gateway.records.outcome_log import OutcomeLog
from gateway.records.prediction_log import PredictionLog
from gateway.serving.catalog import Catalog
from gateway.serving.failover import VersionHealth
from gateway.serving.predictor import Predictor
from gateway.serving.replica_pool import ReplicaPool
from gateway.serving.shadow import ShadowMirror
from gateway.serving.split_watch import SplitWatcher
from registry import Registry
from registry.engine import SERVING_STATEMENT_TIMEOUT_MS, make_engine
from rollout.controller import RolloutController, loadtest_gate
from rollout.lookprocess import LookProcess
from rollout.loop import ControllerLoop

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_PENDING_CALLS = 50_000  # calls grpc core holds for the event loop: a few KB each, refused at once
SERVICE_NAMES = (
    prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    oip.SERVICE.full_name,  # the Open Inference Protocol v2
)


class Gateway:
    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        # First: a bad exporter setting (e.g. otlp without its package) fails before anything starts.
        self.tracing = Tracing(config.traces_exporter, service_name="chimera-gateway")
        # A statement that runs longer than 30 s fails instead of holding a worker thread (PostgreSQL).
        engine = make_engine(config.registry_url, statement_timeout_ms=SERVING_STATEMENT_TIMEOUT_MS)
        self.registry = Registry(config.registry_url, engine=engine)
        self.catalog = Catalog(self.registry)
        self.version_health = VersionHealth(metrics=self.metrics)
        self.pool = ReplicaPool(config.registry_url, replica_cpus=config.replica_cpus, batch=config.batch,
                                observer_factory=self.metrics.observer, health=self.version_health,
                                tracer=self.tracing.tracer, traces_exporter=self.tracing.exporter,
                                scaling=config.replica_scaling, registry=self.registry,
                                shutdown_wait_s=config.replica_shutdown_wait_s)
        spill = f"{config.port}" + (f"-{config.worker}" if config.worker else "")
        self.log = PredictionLog(self.registry, Path(config.spill_dir) / f"predictions-{spill}.spill",
                                 spill_max_bytes=config.spill_max_bytes)
        self.outcomes = OutcomeLog(self.registry, Path(config.spill_dir) / f"outcomes-{spill}.spill",
                                   predictions_pending=lambda: self.log.has_spill,
                                   flush_predictions=self.log.flush,
                                   unknown_grace_s=config.outcome_unknown_grace_s,
                                   spill_max_bytes=config.spill_max_bytes)
        self.watcher = SplitWatcher(self.catalog, self.pool, self.metrics,
                                    poll_interval_s=config.poll_interval_s)
        self.shadow = ShadowMirror(self.pool, self.registry, counter=self.metrics.shadow_rows)
        self.predictor = Predictor(self.catalog, self.pool, self.log,
                                   log_features_sample=config.log_features_sample, shadow=self.shadow,
                                   tracer=self.tracing.tracer)
        self.outcome_intake = OutcomeIntake(self.registry, self.log, self.outcomes)
        log_stats = self.log.stats
        self.metrics.log_backpressure.set_function(lambda: log_stats.backpressure)
        outcomes = self.outcomes.stats
        self.metrics.outcomes_spilled.set_function(lambda: outcomes.spilled)
        self.metrics.outcomes_replayed.set_function(lambda: outcomes.replayed)
        for reason in outcomes.dead_letter:
            self.metrics.outcomes_dead_letter.labels(reason).set_function(
                lambda reason=reason: outcomes.dead_letter.get(reason, 0))
        self.metrics.watch_records(self.log, self.outcomes)  # dead letters, torn lines, spill bounds
        self.auth = AdminAuth(config.admin_token)
        self.predict_auth = (TokenAuth(config.predict_token, config.admin_token)
                             if config.predict_token else None)
        # Outcomes steer rollouts: their own token (or admin), else as Predict (chimera.security's rule).
        self.outcomes_auth = (TokenAuth(config.outcomes_token, config.admin_token,
                                        what="CHIMERA_OUTCOMES_TOKEN")
                              if config.outcomes_token else self.predict_auth)
        observe = self.metrics.observe_decision
        hooks: dict[str, Any] = {
            "on_decision": lambda model, canary, d: observe(
                model, canary, d.action, d.p_value if math.isfinite(d.p_value) else None, srm=d.srm),
            "on_shadow": lambda model, shadow, d: observe(
                model, shadow, f"shadow_{d.action}", min(d.p_worse, d.p_not_worse)),
        }
        max_age = config.promotion_loadtest_max_age_s
        self.controller = RolloutController(self.registry, promotion_gate=loadtest_gate(max_age), **hooks)
        # The looks run here or in a child process (rollout.lookprocess; GatewayConfig.looks_in_child).
        self.look_process = (LookProcess(config.registry_url, gate_max_age_s=max_age, **hooks)
                             if config.looks_in_child() else None)
        run_once = self.look_process.run_once if self.look_process else self.controller.run_once
        self.controller_loop = ControllerLoop(run_once, self._canaried, config.controller_interval_s)
        self.metrics.watch_controller(self.controller_loop, self.look_process)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.inflight: dict[str, int] = {}  # gRPC method -> calls being handled (gateway.api.wire)
        # Closed by stop(): new calls refused with UNAVAILABLE; at max_active, RESOURCE_EXHAUSTED.
        self.admission = Admission(max_active=config.max_concurrent_calls or None)  # None: no cap
        # Models with no startable version (model -> why, kept by the watcher, which retries them):
        # answered UNAVAILABLE with why.
        self.failed_models = self.watcher.failed
        self._door_metrics()
        self.port: int = config.port
        self._metrics_server: object | None = None

    async def start(self) -> int:
        """Open /metrics, deploy replicas for every weighted version, then open the port. Returns the
        bound port.

        /metrics opens first: a metrics port already taken stops the gateway before it has deployed a
        replica, opened its gRPC port or said SERVING (it used to fail after, once it could already have
        been sent calls), and an SRE can scrape a gateway that is still deploying. The gRPC port is
        checked free first too (check_port_free), but bound only once the replicas are ready: a port that
        listens while nothing answers would hold callers' connections instead of refusing them."""
        if not self.config.reuse_port:  # workers of `--processes N` share the port on purpose
            check_port_free(self.config.host, self.config.port)
        if self.config.metrics_port is not None:
            self._start_metrics()
        self.log.start()
        self.outcomes.start()
        self.shadow.start()
        await self.watcher.start_all()  # a model that cannot start is isolated and retried
        self.watcher.start()
        self.pool.start_watch(self.metrics.observe_replicas)  # scaling changes in place; chimera_replicas
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if self.config.reuse_port else 0),  # workers share one port
            # grpc's default (3,000) answers a burst beyond it CANCELLED, not the cap's RESOURCE_EXHAUSTED
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            *connection_age_options(self.config.max_connection_age_s),
        ])
        # Registered through gateway.api.wire: undecodable requests are INVALID_ARGUMENT (not grpc's
        # UNKNOWN), and the Predict token, when set, is checked before the servicer runs.
        freeze_startup_heap()
        servicer = PredictionServicer(self.predictor, self.outcome_intake, self.auth, self.metrics,
                                      failed_models=self.failed_models)
        if self.tracing.tracer is not None:
            instrument(servicer, self.tracing.tracer)
        register(prediction_pb2_grpc.add_PredictionServiceServicer_to_server, servicer, server,
                 prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"], self.predict_auth,
                 inflight=self.inflight, admission=self.admission,
                 method_auth={"RecordOutcome": self.outcomes_auth, "RecordOutcomes": self.outcomes_auth})
        register(rollout_pb2_grpc.add_RolloutServiceServicer_to_server,
                 RolloutServicer(self.registry, self.auth, self.controller.promotion_gate,
                                 on_change=self.watcher.sync_model, pool=self.pool), server,
                 rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"], inflight=self.inflight,
                 admission=self.admission)
        register(oip.add_to_server, oip.InferenceServicer(self.predictor, self.auth, self.metrics,
                                                          self.health, self.failed_models),
                 server, oip.SERVICE, self.predict_auth, self.inflight, self.admission)
        inflight = self.inflight
        for method in inflight:  # read at scrape time: the request path only bumps an int
            self.metrics.inflight.labels(method).set_function(lambda m=method: inflight[m])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = self._server_credentials()
        self.port = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await server.start()
        self.server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.controller_interval_s > 0:
            await self.start_controller()
        log.info("gateway listening on %s:%d", self.config.host, self.port)
        return self.port

    def _door_metrics(self) -> None:  # gauges read at scrape time
        a, failed, r = self.admission, self.failed_models, self.metrics.registry
        for name, text, fn in (("chimera_calls_shed", "calls refused at the concurrency cap", lambda: a.shed),
                               ("chimera_calls_active", "calls being handled, all methods", lambda: a.active),
                               ("chimera_calls_limit", "the cap (0: none)", lambda: a.max_active or 0),
                               ("chimera_models_failed_to_start", "models not served: no version could start",
                                lambda: len(failed))):
            Gauge(name, text, registry=r).set_function(fn)

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        c = self.config
        if c.tls_cert is None and c.tls_key is None:
            if c.tls_client_ca is not None:
                raise ValueError("tls_client_ca: mutual TLS needs a server certificate and key too")
            return None
        if c.tls_cert is None or c.tls_key is None:
            raise ValueError("tls_cert/tls_key: give both the certificate and its key")
        return grpc.ssl_server_credentials(
            [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())],
            root_certificates=Path(c.tls_client_ca).read_bytes() if c.tls_client_ca else None,
            require_client_auth=c.tls_client_ca is not None)

    def _failed_batches(self, model: str, version: int) -> int:
        """Requests (rows) the version failed to score in this gateway, including those then scored by
        its fallback (in-process only: tests/integration/test_replica_faults.py reads it; the rollout
        controller counts errors from the database since rollout v2)."""
        return self.version_health.failure_count(model, version)

    async def start_controller(self, interval_s: float | None = None) -> None:
        """Start (or restart) the rollout controller loop in this gateway."""
        if interval_s is not None:
            self.config.controller_interval_s = interval_s
        self.controller_loop.start(self.config.controller_interval_s)

    def _canaried(self) -> Iterator[str]:
        """Models with a canary (two or more weighted versions) or a shadow to judge, read as the
        controller loop walks them."""
        for model in self.catalog.names():
            entry = self.catalog.get(model)
            if len(entry.router.weights) >= 2 or entry.shadow is not None:
                yield model

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        m = self.metrics
        log_ = self.log
        m.log_queue_depth.set_function(lambda: log_.depth)
        m.log_inserted.set_function(lambda: log_.stats.inserted)
        m.log_spilled.set_function(lambda: log_.stats.spilled)
        m.log_replayed.set_function(lambda: log_.stats.replayed)
        try:
            self._metrics_server = start_http_server(self.config.metrics_port or 0, addr=self.config.host,
                                                     registry=m.registry)
        except OSError as exc:  # EADDRINUSE, mostly: say which setting to change
            raise PortTaken(f"metrics_port: cannot listen on {self.config.host}:{self.config.metrics_port}"
                            f" for /metrics: {exc.strerror or exc}") from exc

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (load balancers drain us) while calls are still taken for the drain delay,
        then new calls are refused with UNAVAILABLE and in-flight calls finish within the rest of the
        grace period (gateway.drain), then the prediction log is flushed (inserted, or spilled to disk
        when the database is down; both bounded in time)."""
        grace = self.config.grace_period_s if grace is None else grace
        deadline = time.monotonic() + grace
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.controller_loop.cancel()
        drain = max(0.0, min(self.config.drain_delay_s, grace / 4))
        if self.server is not None and drain > 0:
            await asyncio.sleep(drain)
        if self.server is not None:
            await close_and_stop(self.server, self.admission, self.inflight, deadline)
        if self.look_process is not None:  # after the calls: its close may wait a second or two
            await asyncio.to_thread(self.look_process.close)
        await self.watcher.stop()
        await self.pool.close()
        await self.shadow.close()
        await asyncio.to_thread(self.log.stop)
        await asyncio.to_thread(self.outcomes.stop)
        await asyncio.to_thread(self.tracing.shutdown)  # exports the spans still batched
        if self._metrics_server is not None:
            server = self._metrics_server[0] if isinstance(self._metrics_server, tuple) else None
            if server is not None:
                server.shutdown()
        self.registry.dispose()


def connection_age_options(age_s: float) -> list[tuple[str, int]]:
    """grpc server options for GatewayConfig.max_connection_age_s (0: none). The grace is grpc's "never"
    on purpose: the age only moves a client's next calls to a new connection, and must never cut a call
    or a PredictStream stream in flight."""
    if age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", 2**31 - 1)]


class PortTaken(RuntimeError):
    """A port the gateway must listen on is taken: the operator's to fix (the message names the setting
    and the address), so `chimera serve` reports it as one line, without a traceback."""


def check_port_free(host: str, port: int) -> None:
    """Raise PortTaken naming `port` when another process listens on host:port (port 0: nothing to
    check). Why: the gRPC port is bound only after every replica is ready, which can take minutes; an
    operator who started a second gateway on a taken port (the old one still running) would wait that
    long for the error, and the deploy would be for nothing. A probe bind with SO_REUSEADDR, as grpc
    binds: a listener refuses it, connections left in TIME_WAIT by a gateway that just stopped do not.
    Not a reservation: a process that takes the port between this check and the bind still makes the
    bind fail, with the error it always gave."""
    import errno
    import socket

    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return  # a host grpc cannot resolve either: its bind reports it
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # e.g. no IPv6 here: grpc binds what it can, as before
                    continue
                raise PortTaken(f"port: cannot listen on {host}:{port} for gRPC: "
                                f"{exc.strerror or exc}") from exc


_frozen = False


def freeze_startup_heap() -> None:
    """Move everything allocated so far into the garbage collector's permanent generation, once per
    process. Called once the replicas are up, so that is Ray, gRPC, SQLAlchemy, numpy and the catalog:
    ~250k long-lived objects that every full collection would otherwise walk (measured under load: a
    100-180 ms pause every ~10 s, which set the p99; after: under 3 ms). Requests' garbage is still
    collected. Ray Serve does the same in its proxy and replicas."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def ensure_ray(address: str | None, num_cpus: int) -> None:
    """Join RAY_ADDRESS when given; otherwise start a local Ray with explicit CPUs."""
    import os

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


async def serve_forever(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"chimera gateway listening on {config.host}:{gateway.port}"
          + (f", metrics on :{config.metrics_port}" if config.metrics_port else "")
          + f", event loop {type(loop).__module__.split('.')[0]}"  # asyncio or uvloop
          + (f", connections age out after {age:g} s" if (age := config.max_connection_age_s) > 0
             else ", connections never age out"), flush=True)
    await stop.wait()
    print("shutting down: draining in-flight calls and flushing the prediction log", flush=True)
    await gateway.stop()
