"""Ray Serve applications per version, seen from the gateway: deploy before traffic, one
micro-batcher per version in front of its handle.

An application the cluster declared (deploy/ray/serve-config.yaml under KubeRay, or `serve deploy`) is
used as it is: the gateway waits for it to be RUNNING and never redeploys or deletes it, since
`serve.run` over it would replace the declared replica count and resources. Versions nobody declared
are deployed by the gateway, as before.

Tracing: with a tracer, each Ray call runs in a `chimera.ray_call` span (CLIENT) and carries the W3C
context to the replica as an extra argument; without one the call is exactly as before.

Handles are fetched inside the gateway's event loop: a handle obtained in one loop and awaited from
another hangs (measured on Ray Serve 2.60)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.trace import SpanKind, Tracer

from chimera.settings import ReplicaScaling
from chimera.tracing import current_carrier
from gateway.serving.batcher import BatchObserver, MicroBatcher
from gateway.serving.errors import UnavailableError
from gateway.serving.failover import VersionHealth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching per version (policy in gateway.serving.batcher). A Ray Serve call costs ~1 ms of this
    process's CPU and a few ms of latency whatever its size, so few large calls beat many small ones.
    `max_batch`: 2048 rows of 32 float32 features are 256 KiB, well under the 4 MiB message limit of
    Ray Serve's replica gRPC transport; PredictBatch callers' rows merge into calls this size.
    `max_wait_us` caps how long a partial batch waits behind busy calls (normally it waits about one
    call latency). `call_timeout_s`: a scoring call that takes longer fails its batch (UNAVAILABLE).
    `stall_timeout_s`: a call that has not answered after this long (normally milliseconds) fails and
    marks its version down: a killed replica's calls wait in Ray Serve's queue until a replacement
    has started, seconds later, so the gateway retries the rows on another version instead
    (gateway.serving.failover). The effective per-call limit is the smaller of the two.

    How the gateway talks to Ray Serve (measured on the 2-core machine, see docs/performance.md):
    `direct_transport` uses Ray Serve's gRPC transport to the replica instead of actor calls (about
    half the CPU per call); `router_on_gateway_loop` runs the handle's router on the gateway's own
    event loop instead of Ray's router thread (no cross-thread hand-off per call: c=1 p50 ~4 ms
    instead of ~6 ms, and ~1.5x the throughput at c=64)."""

    max_batch: int = 2048
    max_wait_us: int = 20_000
    max_inflight: int = 4
    call_timeout_s: float = 30.0
    stall_timeout_s: float = 3.0
    direct_transport: bool = True
    router_on_gateway_loop: bool = True


class ReplicaPool:
    def __init__(self, registry_url: str, *, replica_cpus: float = 0.25, batch: BatchConfig | None = None,
                 observer_factory: Callable[[str, int], BatchObserver] | None = None,
                 health: VersionHealth | None = None, tracer: Tracer | None = None,
                 traces_exporter: str = "none", scaling: ReplicaScaling | None = None) -> None:
        self.registry_url = registry_url
        self.scaling = scaling or ReplicaScaling()  # replicas per version (fixed, or autoscaled by Serve)
        self.health = health or VersionHealth()
        self.replica_cpus = replica_cpus
        self.batch = batch or BatchConfig()
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._handles: list[Any] = []
        self._observer_factory = observer_factory
        self.tracer = tracer  # None: tracing off
        self.traces_exporter = traces_exporter  # what the replicas this pool deploys trace with
        self._declared: set[tuple[str, int]] = set()

    def is_declared(self, model: str, version: int) -> bool:
        """The version's application was declared by the cluster's Serve config: not ours to delete."""
        return (model, version) in self._declared

    def owned_versions(self) -> list[tuple[str, int]]:
        """Versions whose applications this pool deployed itself (the ones to undeploy)."""
        return [k for k in self.ready_versions() if k not in self._declared]

    def _deploy_or_adopt(self, model: str, version: int) -> None:
        """Runs in a worker thread: use the declared application, or deploy one and wait for it."""
        from replicas.deployment import DeclaredAppError, declared_app, deploy_version

        try:
            declared = declared_app(model, version)
        except DeclaredAppError:
            self._declared.add((model, version))  # broken, but still the cluster's to fix, not ours to delete
            raise
        if declared:
            self._declared.add((model, version))
            log.info("using the declared application for %s v%d as it is", model, version)
            return
        log.info("deploying replicas for %s v%d", model, version)
        deploy_version(self.registry_url, model, version, num_cpus=self.replica_cpus, scaling=self.scaling,
                       traces_exporter=self.traces_exporter)

    def is_ready(self, model: str, version: int) -> bool:
        return (model, version) in self._batchers

    def ready_versions(self) -> list[tuple[str, int]]:
        return sorted(self._batchers)

    async def ensure(self, model: str, version: int) -> MicroBatcher:
        """Deploy the version's replicas if needed (or wait for the declared application) and wait until
        they answer."""
        key = (model, version)
        batcher = self._batchers.get(key)
        if batcher is not None:
            return batcher
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            batcher = self._batchers.get(key)
            if batcher is not None:
                return batcher
            from ray import serve
            from ray.serve.handle import DeploymentHandle

            from replicas.deployment import app_name

            await asyncio.to_thread(self._deploy_or_adopt, model, version)
            cached = serve.get_app_handle(app_name(model, version))
            # A handle of this pool's own: Serve caches one per process, and its router belongs to the
            # event loop that first used it (a second gateway in the process must not share it).
            handle = DeploymentHandle(cached.deployment_name, cached.app_name)
            if self.batch.router_on_gateway_loop:
                handle._init(_run_router_in_separate_loop=False)
            self._handles.append(handle)
            method = handle.score
            if self.batch.direct_transport:
                method = method.options(_by_reference=False)
            call_timeout = min(self.batch.call_timeout_s, self.batch.stall_timeout_s)
            health = self.health
            width = [0]
            tracer = self.tracer
            attributes = {"chimera.model": model, "chimera.version": version}

            async def probe() -> None:
                """One zero row; succeeds once a live replica answers (used while the version is down)."""
                await asyncio.wait_for(method.remote(np.zeros((1, width[0]), dtype=np.float32)),
                                       max(5.0, call_timeout))

            async def score(rows: np.ndarray) -> np.ndarray:
                width[0] = rows.shape[1]
                try:
                    if tracer is None:
                        return await asyncio.wait_for(method.remote(rows), call_timeout)
                    with tracer.start_as_current_span("chimera.ray_call", kind=SpanKind.CLIENT,
                                                      attributes={**attributes, "chimera.rows": len(rows)}):
                        return await asyncio.wait_for(method.remote(rows, current_carrier()), call_timeout)
                except Exception as exc:
                    why = (f"no answer within {call_timeout:g} s: replica dead or hung"
                           if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"[:300])
                    health.mark_down(model, version, why, probe)
                    raise UnavailableError(f"version {version} of {model!r} could not score: {why}") from exc

            observer = self._observer_factory(model, version) if self._observer_factory else None
            batcher = MicroBatcher(score, max_batch=self.batch.max_batch, max_wait_us=self.batch.max_wait_us,
                                   max_inflight=self.batch.max_inflight, observer=observer, tracer=tracer,
                                   span_attributes=attributes)
            self._batchers[key] = batcher
            return batcher

    def batcher_or_none(self, model: str, version: int) -> MicroBatcher | None:
        return self._batchers.get((model, version))

    def get(self, model: str, version: int) -> MicroBatcher:
        batcher = self._batchers.get((model, version))
        if batcher is None:
            raise UnavailableError(f"version {version} of {model!r} has no replicas deployed yet")
        return batcher

    async def close(self) -> None:
        await self.health.close()
        await asyncio.gather(*(b.close() for b in self._batchers.values()), return_exceptions=True)
        self._batchers.clear()
        # Routers that run on this loop are shut down on it (Ray warns about a best-effort
        # synchronous shutdown otherwise).
        handles, self._handles = self._handles, []
        await asyncio.gather(*(h.shutdown_async() for h in handles), return_exceptions=True)
