"""Ray Serve applications per version, seen from the gateway: deploy before traffic, one
micro-batcher per version in front of its handle.

An application the cluster declared (deploy/ray/serve-config.yaml under KubeRay, or `serve deploy`) is
used as it is: the gateway waits for it to be RUNNING and never redeploys or deletes it, since
`serve.run` over it would replace the declared replica count and resources. Versions nobody declared
are deployed by the gateway, as before.

Tracing: with a tracer, each Ray call runs in a `chimera.ray_call` span (CLIENT) and carries the W3C
context to the replica as an extra argument; without one the call is exactly as before.

Handles are fetched inside the gateway's event loop: a handle obtained in one loop and awaited from
another hangs (measured on Ray Serve 2.60).

Replicas per version come from the model's rollout policy (rollout.policy.RolloutPolicy.replica_scaling:
production vs every other version) over the process settings (`scaling`). Every gateway reads them from
the registry (`scaling_plan`), so all deploy the same fingerprint and never replace each other's
replicas. A scaling watch (`start_watch`, every WATCH_INTERVAL_S) applies a changed policy or a changed
role (a promotion makes the canary production) to the applications this pool deployed, in place
(replicas.deployment: no replica restarts), and reports Serve's running replica count per version."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from opentelemetry.trace import SpanKind, Tracer

from chimera.settings import DEFAULT_REPLICA_CALL_TIMEOUT_S, DEFAULT_REPLICA_STALL_TIMEOUT_S, ReplicaScaling
from chimera.tracing import current_carrier
from gateway.serving.batcher import BatchObserver, MicroBatcher
from gateway.serving.errors import UnavailableError
from gateway.serving.failover import VersionHealth
from gateway.serving.local_path import LocalPath, this_node_id
from replicas.local_channel import LocalChannelError, ReplicaError

if TYPE_CHECKING:
    from registry import Registry

log = logging.getLogger(__name__)

# Gets each reading of the scaling watch: RUNNING replicas and (min, max) bounds per version.
ReplicaObserver = Callable[[Mapping[tuple[str, int], int], Mapping[tuple[str, int], tuple[int, int]]], None]
WATCH_INTERVAL_S = 5.0  # scaling watch: policy/role changes applied, replica counts read from Serve


class VersionPlan(NamedTuple):
    role: str  # production | canary (every version but production)
    scaling: ReplicaScaling
    live: bool  # weighted or mirrored: deployed by every gateway


def scaling_plan(registry: Registry, model: str, default: ReplicaScaling) -> dict[int, VersionPlan]:
    """The replica scaling of every version of `model`: its rollout policy's replica fields over
    `default`, the production bounds for the baseline (rollout.splits.arms: the production version,
    else the heaviest; a lone weighted version), the canary bounds for every other version. One short
    read (no ONNX bytes). A stored policy that does not parse (e.g. a metric without its tau) scales by
    `default`: the controller reports that policy's error, serving must not depend on it."""
    from sqlalchemy import select

    from registry.models import Model, ModelVersion, TrafficSplit
    from rollout import splits

    with registry.session() as s:
        m = s.execute(select(Model.id, Model.metric, Model.rollout_config, Model.shadow_version)
                      .where(Model.name == model)).first()
        if m is None:
            return {}
        statuses = dict(s.execute(select(ModelVersion.version, ModelVersion.status)
                                  .where(ModelVersion.model_id == m.id)).all())
        weights = {v: w for v, w in s.execute(select(TrafficSplit.version, TrafficSplit.weight)
                                              .where(TrafficSplit.model_id == m.id)).all() if w > 0}
    pair = splits.arms(weights, statuses)
    baseline = pair[0] if pair else next(iter(weights), None)
    try:
        policy = splits.policy_from_dict(m.rollout_config, metric=m.metric)
        production = policy.replica_scaling(default, canary=False)
        canary = policy.replica_scaling(default, canary=True)
    except ValueError as exc:
        log.warning("model %s: stored rollout policy does not parse (%s); replicas per the process settings",
                    model, exc)
        production = canary = default
    return {v: VersionPlan("production", production, True) if v == baseline
            else VersionPlan("canary", canary, v in weights or v == m.shadow_version) for v in statuses}


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
    instead of ~6 ms, and ~1.5x the throughput at c=64); `local_channel` sends calls over the local
    channel of a replica on this node (gateway.serving.local_path: every call in flight for a version
    with one fixed replica, else one at a time; ~0.15 ms instead of a ~1.7 ms Serve call;
    CHIMERA_LOCAL_REPLICA_CHANNEL=0 turns it off)."""

    max_batch: int = 2048
    max_wait_us: int = 20_000
    max_inflight: int = 4
    call_timeout_s: float = DEFAULT_REPLICA_CALL_TIMEOUT_S
    stall_timeout_s: float = DEFAULT_REPLICA_STALL_TIMEOUT_S  # CHIMERA_REPLICA_STALL_TIMEOUT_S
    direct_transport: bool = True
    router_on_gateway_loop: bool = True
    local_channel: bool = True


class ReplicaPool:
    def __init__(self, registry_url: str, *, replica_cpus: float = 0.25, batch: BatchConfig | None = None,
                 observer_factory: Callable[[str, int], BatchObserver] | None = None,
                 health: VersionHealth | None = None, tracer: Tracer | None = None,
                 traces_exporter: str = "none", scaling: ReplicaScaling | None = None,
                 registry: Registry | None = None, shutdown_wait_s: float | None = None) -> None:
        self.registry_url = registry_url
        self.shutdown_wait_s = shutdown_wait_s  # None: Ray Serve's default
        # Replicas per version when the model's policy does not say (fixed, or autoscaled by Serve).
        self.scaling = scaling or ReplicaScaling()
        self.registry = registry  # None: every version scales by `scaling` (no per-model policy)
        self.applied: dict[tuple[str, int], ReplicaScaling] = {}  # what this pool deployed or adopted
        self.replicas: dict[tuple[str, int], int] = {}  # RUNNING replicas per Serve, read by the watch
        self._watch: asyncio.Task[None] | None = None
        self.health = health or VersionHealth()
        self.replica_cpus = replica_cpus
        self.batch = batch or BatchConfig()
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._handles: list[Any] = []
        self._local_paths: list[LocalPath] = []
        self._observer_factory = observer_factory
        self.tracer = tracer  # None: tracing off
        self.traces_exporter = traces_exporter  # what the replicas this pool deploys trace with
        self._declared: set[tuple[str, int]] = set()
        # Ray Serve's start is not thread-safe (ray.serve._private.api.serve_start): until Serve is known
        # to run, deploys go one at a time; after that, versions deploy in parallel (SplitWatcher.sync_model).
        self._serve_up = False
        self._first_deploy = asyncio.Lock()

    def is_declared(self, model: str, version: int) -> bool:
        """The version's application was declared by the cluster's Serve config: not ours to delete."""
        return (model, version) in self._declared

    def owned_versions(self) -> list[tuple[str, int]]:
        """Versions whose applications this pool deployed itself (the ones to undeploy)."""
        return [k for k in self.ready_versions() if k not in self._declared]

    async def _deploy(self, model: str, version: int) -> None:
        """`_deploy_or_adopt` in a worker thread; alone while Serve may still have to be started."""
        from replicas.serve_state import serve_running

        if not self._serve_up:
            async with self._first_deploy:
                if not self._serve_up and not await asyncio.to_thread(serve_running):
                    await asyncio.to_thread(self._deploy_or_adopt, model, version)  # starts Serve
                    self._serve_up = True
                    return
                self._serve_up = True
        await asyncio.to_thread(self._deploy_or_adopt, model, version)

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
        plan = self.wanted(model).get(version)
        scaling = plan.scaling if plan is not None else self.scaling
        log.info("deploying replicas for %s v%d (%s)", model, version, describe(scaling))
        deploy_version(self.registry_url, model, version, num_cpus=self.replica_cpus, scaling=scaling,
                       traces_exporter=self.traces_exporter, shutdown_wait_s=self.shutdown_wait_s)
        self.applied[(model, version)] = scaling

    def wanted(self, model: str) -> dict[int, VersionPlan]:
        """Blocking (a registry read): the scaling each version of `model` should run now."""
        if self.registry is None:
            return {}
        return scaling_plan(self.registry, model, self.scaling)

    def _rescale(self, model: str, version: int, scaling: ReplicaScaling) -> None:
        """Runs in a worker thread: give the version's running application `scaling` in place."""
        from replicas.deployment import deploy_version

        log.info("model %s v%d: replicas now %s", model, version, describe(scaling))
        deploy_version(self.registry_url, model, version, num_cpus=self.replica_cpus, scaling=scaling,
                       traces_exporter=self.traces_exporter, shutdown_wait_s=self.shutdown_wait_s, wait=False)
        self.applied[(model, version)] = scaling

    async def apply_scaling(self, model: str | None = None) -> list[tuple[str, int]]:
        """Give every application this pool deployed (of `model`, or all) the scaling the registry
        asks for now, where it differs from what this pool applied; returns the versions changed. A
        version another gateway already changed is adopted as it runs (same fingerprint)."""
        changed: list[tuple[str, int]] = []
        mine = [k for k in self.owned_versions() if model is None or k[0] == model]

        async def rescale(key: tuple[str, int], scaling: ReplicaScaling) -> None:
            async with self._locks.setdefault(key, asyncio.Lock()):
                if key in self._batchers and self.applied.get(key) != scaling:
                    await asyncio.to_thread(self._rescale, *key, scaling)
                    changed.append(key)

        for name in sorted({m for m, _ in mine}):
            plan = await asyncio.to_thread(self.wanted, name)
            todo = [(k, plan[k[1]].scaling if k[1] in plan else self.scaling) for k in mine if k[0] == name]
            await asyncio.gather(*(rescale(k, s) for k, s in todo if self.applied.get(k) != s))
        return changed

    async def read_replicas(self) -> dict[tuple[str, int], int]:
        """RUNNING replicas per ready version (this pool's and declared ones), per Serve's status."""
        from replicas.deployment import app_name
        from replicas.serve_state import replica_counts

        keys = self.ready_versions()
        names = {app_name(m, v): (m, v) for m, v in keys}
        counts = await asyncio.to_thread(replica_counts, list(names))
        self.replicas = {names[n]: c for n, c in counts.items()}
        return self.replicas

    def bounds(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(min, max) replicas of each version as this pool last applied them."""
        return {k: (s.min_replicas, s.max_replicas) for k, s in self.applied.items()}

    def start_watch(self, on_replicas: ReplicaObserver | None = None,
                    interval_s: float = WATCH_INTERVAL_S) -> None:
        """The scaling watch on the running loop: apply policy and role changes, then read the replica
        counts (`on_replicas` gets them and the bounds: the gateway's chimera_replicas gauges). A failed
        round (Ray or the database away) is logged and retried at the next."""
        async def run() -> None:
            while True:
                try:
                    await self.apply_scaling()
                    counts = await self.read_replicas()
                    if on_replicas is not None:
                        on_replicas(counts, self.bounds())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("scaling watch: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(interval_s)

        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(run(), name="chimera-scaling-watch")

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

            await self._deploy(model, version)
            cached = serve.get_app_handle(app_name(model, version))
            # A handle of this pool's own: Serve caches one per process, and its router belongs to the
            # event loop that first used it (a second gateway in the process must not share it).
            handle = DeploymentHandle(cached.deployment_name, cached.app_name)
            if self.batch.router_on_gateway_loop:
                handle._init(_run_router_in_separate_loop=False)
            self._handles.append(handle)
            def transport(m: Any) -> Any:
                """Serve's direct gRPC transport to the replica when configured (BatchConfig)."""
                return m.options(_by_reference=False) if self.batch.direct_transport else m

            method = transport(handle.score)
            call_timeout = min(self.batch.call_timeout_s, self.batch.stall_timeout_s)
            health = self.health
            width = [0]
            tracer = self.tracer
            attributes = {"chimera.model": model, "chimera.version": version}
            observer = self._observer_factory(model, version) if self._observer_factory else BatchObserver()
            local = None
            if self.batch.local_channel and tracer is None:  # traced calls carry their context through Serve
                endpoint = transport(handle.local_endpoint)
                def slots() -> int:
                    """All calls in flight for one fixed replica; one at a time otherwise (local_path)."""
                    scaling = self.applied.get(key)
                    lone = scaling is not None and not scaling.autoscaled and scaling.min_replicas == 1
                    return self.batch.max_inflight if lone else 1

                # Not started here: the first call starts it (local_path: an idle gateway makes no call).
                local = LocalPath(lambda: endpoint.remote(), this_node_id(), f"{model} v{version}", slots)
                self._local_paths.append(local)

            async def probe() -> None:
                """One zero row; succeeds once a live replica answers (used while the version is down)."""
                await asyncio.wait_for(method.remote(np.zeros((1, width[0]), dtype=np.float32)),
                                       max(5.0, call_timeout))

            def failed(exc: Exception) -> UnavailableError:
                why = (f"no answer within {call_timeout:g} s: replica dead or hung"
                       if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"[:300])
                health.mark_down(model, version, why, probe)
                return UnavailableError(f"version {version} of {model!r} could not score: {why}")

            async def score(rows: np.ndarray) -> np.ndarray:
                width[0] = rows.shape[1]
                channel = local.take() if local is not None else None
                if channel is not None:
                    healthy = False
                    try:
                        scores = await asyncio.wait_for(channel.call(rows), call_timeout)
                        healthy = True
                        observer.on_call_path("local")
                        return scores
                    except LocalChannelError:
                        observer.on_call_path("local_broken")  # not scored: through Serve below
                    except Exception as exc:  # the replica refused the rows, or did not answer in time
                        healthy = isinstance(exc, ReplicaError)
                        raise failed(exc) from exc
                    finally:
                        local.give_back(channel, healthy=healthy)  # type: ignore[union-attr]
                observer.on_call_path("serve")
                try:
                    if tracer is None:
                        return await asyncio.wait_for(method.remote(rows), call_timeout)
                    with tracer.start_as_current_span("chimera.ray_call", kind=SpanKind.CLIENT,
                                                      attributes={**attributes, "chimera.rows": len(rows)}):
                        return await asyncio.wait_for(method.remote(rows, current_carrier()), call_timeout)
                except Exception as exc:
                    raise failed(exc) from exc

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
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.health.close()
        await asyncio.gather(*(b.close() for b in self._batchers.values()), return_exceptions=True)
        self._batchers.clear()
        # After the batchers: their calls in flight have given their channels back.
        paths, self._local_paths = self._local_paths, []
        await asyncio.gather(*(p.close() for p in paths), return_exceptions=True)
        # Routers that run on this loop are shut down on it (Ray warns about a best-effort
        # synchronous shutdown otherwise).
        handles, self._handles = self._handles, []
        await asyncio.gather(*(h.shutdown_async() for h in handles), return_exceptions=True)


def describe(scaling: ReplicaScaling) -> str:
    """One line for logs and the CLI: "2 fixed" or "1..3 at 2 ongoing, up 30 s, down 600 s"."""
    if not scaling.autoscaled:
        return f"{scaling.min_replicas} fixed"
    return (f"{scaling.min_replicas}..{scaling.max_replicas} at {scaling.target_ongoing_requests:g} ongoing, "
            f"up {scaling.upscale_delay_s:g} s, down {scaling.downscale_delay_s:g} s")
