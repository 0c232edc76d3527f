"""Ray Serve application per served model version: its own replicas, so a crashing canary cannot
take the stable version down.

Scoring a batch takes onnxruntime tens to hundreds of microseconds, less than Ray Serve's own hops,
so the replica runs it directly on its event loop (`async def score`) and Ray Serve runs user code
on the replica's main loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0) instead of handing every
call to a second loop and a thread pool: measured here, that removes about 1 ms per call.

Two ways in: the gateway deploys what it needs (`deploy_version`, through `serve.run`), or the cluster
declares the applications (deploy/ray/serve-config.yaml under KubeRay or `serve deploy`, through
`build_app`), and the gateway then uses them as they are (`declared_app`).

Secrets: the registry URL reaches a replica without its password (Ray shows actor arguments on its
dashboard and state API); the replica takes the full URL from CHIMERA_REGISTRY_URL in its Ray node's
environment (`actor_registry_url`, `replica_registry_url`).

Several gateways, one cluster: every gateway deploys the versions it routes to with `serve.run`, and
Serve gives each `serve.run` a new random code version, so each gateway that started (or restarted)
replaced every replica the others were scoring on (measured: "Stopping 1 replicas ... with outdated
versions" for each version when a second gateway started). Ray 2.60 no longer lets a caller name the
version publicly, so `deploy_version` marks each application with a fingerprint of what it runs (its
replicas' init arguments, actor options, this package's source, and its replica scaling) in the
deployment's `user_config` (changing it is a lightweight update, never a restart), and uses an
application already running under the same fingerprint as it is.

Scaling changes at run time (the model's rollout policy, gateway.serving.replica_pool): the deployment's
version is named after what its replicas run without the scaling (`code_version`, through
`Deployment.options(version=..., _internal=True)`, the parameter Serve's own config path uses), so a
`serve.run` that changes only `num_replicas` / `autoscaling_config` is the lightweight update Ray Serve
documents (Updating Applications In-Place): the replicas keep running and Serve adds or removes replicas
to the new bounds. A real change (new code, another registry, other actor options) still rolls the
replicas. Every gateway computes the same scaling from the registry, so they agree on the fingerprint.

Tracing: a replica builds its own TracerProvider from the exporter it is given (an init argument, so
it does not depend on the environment reaching the Ray worker) and continues the trace whose W3C
context arrives with the rows."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from chimera.settings import ReplicaScaling
from replicas.local_channel import LocalServer
from replicas.scorer import OnnxScorer
from replicas.serve_state import app_details, app_status, deployment_error, plain, running_fingerprint

log = logging.getLogger(__name__)


def app_name(model: str, version: int) -> str:
    return f"chimera-{model}-v{version}"


REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
REDACTED = "***"  # SQLAlchemy's own mask (URL.render_as_string(hide_password=True))


def actor_registry_url(url: str) -> str:
    """The registry URL as it may appear in a replica's init arguments: without its password. Ray
    shows actor arguments to anyone who reaches its dashboard or state API, so a password there is a
    password published; the replica takes it from CHIMERA_REGISTRY_URL in its own environment (the
    Ray nodes' Secret) instead (`replica_registry_url`). URLs without a password pass unchanged."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def replica_registry_url(given: str, environ: Mapping[str, str] | None = None) -> str:
    """The URL a replica connects with: `given` itself, or, when its password was withheld
    (`actor_registry_url`), CHIMERA_REGISTRY_URL of this Ray node when that names the same database
    (driver, user, host, port, database). Anything else is an error that says what to set."""
    import os

    from sqlalchemy.engine import make_url

    parsed = make_url(given)
    if parsed.password != REDACTED:
        return given
    env_url = (os.environ if environ is None else environ).get("CHIMERA_REGISTRY_URL")
    def target(u: Any) -> tuple:
        return (u.drivername, u.username, u.host, u.port, u.database, dict(u.query))

    if env_url and target(make_url(env_url)) == target(parsed):
        return env_url
    raise RuntimeError(f"registry {given}: its password is kept out of Ray's actor arguments, and this Ray "
                       "node's CHIMERA_REGISTRY_URL " + ("names another database" if env_url else "is unset")
                       + ": set CHIMERA_REGISTRY_URL (with the password) in every Ray node's environment "
                       "to the gateway's registry URL (deploy/k8s: the chimera-registry Secret)")


# Health checks every 2 s (Ray's default is 10 s): a replica whose process died is replaced within
# seconds, which is how long its version's traffic runs on the fallback version (gateway.serving.failover).
@serve.deployment(name="scorer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25},
                  logging_config={"enable_access_log": False}, health_check_period_s=2,
                  health_check_timeout_s=10)
class VersionReplica:
    """Loads its version's bytes from the registry itself (not through the driver) and verifies the
    sha256 before building the session, so what scores is exactly what was published."""

    def __init__(self, registry_url: str, model: str, version: int, traces_exporter: str = "none") -> None:
        from chimera.tracing import Tracing
        from registry import Registry

        # First: a bad exporter setting (otlp without its package) fails the replica with its message.
        self.tracing = Tracing(traces_exporter, service_name="chimera-replica")
        self._tracer = self.tracing.tracer
        reg = Registry(replica_registry_url(registry_url))
        try:
            data, sha = reg.get_onnx(model, version)
        finally:
            reg.dispose()
        self.model = model
        self.version = version
        self.scorer = OnnxScorer(data, sha)
        self._local: LocalServer | None = None  # the local channel, started by the first local_endpoint
        self._local_lock = asyncio.Lock()

    async def score(self, rows: np.ndarray, trace_carrier: Mapping[str, str] | None = None) -> np.ndarray:
        """One batch from a gateway's micro-batcher. Each gateway keeps at most a few calls in flight
        per version, so max_ongoing_requests (64) is never the limit for a handful of gateways: at
        Ray's default (5), a full replica makes the caller's router back off for up to 0.5 s.
        `trace_carrier`: the caller's W3C trace context (a `chimera.replica.score` span continues it
        when this replica traces); None, as from callers that do not trace, changes nothing."""
        if trace_carrier is None or self._tracer is None:
            return self.scorer.score(rows)
        return self._traced_score(rows, trace_carrier)

    def _traced_score(self, rows: np.ndarray, carrier: Mapping[str, str]) -> np.ndarray:
        from opentelemetry.trace import SpanKind

        from chimera.tracing import context_from_carrier

        assert self._tracer is not None
        attributes = {"chimera.model": self.model, "chimera.version": self.version, "chimera.rows": len(rows)}
        parent = context_from_carrier(carrier)
        with self._tracer.start_as_current_span("chimera.replica.score", context=parent, kind=SpanKind.SERVER,
                                                attributes=attributes) as span:
            t0 = time.perf_counter()
            scores = self.scorer.score(rows)
            span.set_attribute("chimera.inference_ms", (time.perf_counter() - t0) * 1e3)
            return scores

    async def local_endpoint(self) -> dict[str, Any]:
        """Where a gateway on this Ray node reaches this replica's local channel (replicas.local_channel),
        started on first use on the replica's own event loop: its node, loopback port and key. Only
        callers Ray lets through the Serve handle get the key."""
        import ray

        async with self._local_lock:
            if self._local is None:
                self._local = await LocalServer(self.scorer.score).start()
        return {"node_id": ray.get_runtime_context().get_node_id(), "port": self._local.port,
                "key": self._local.key}

    def finished_spans(self) -> list[dict[str, Any]]:
        """The spans this replica finished, as plain dicts (the `memory` exporter only; else [])."""
        return self.tracing.finished_spans()

    def __del__(self) -> None:
        """Ray Serve calls this when it stops the replica: export the spans still batched."""
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()
        local = getattr(self, "_local", None)
        if local is not None:
            local.close()

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Serve's user_config: only the deployment's fingerprint (see the module docstring)."""
        self.fingerprint = str(config.get("fingerprint", ""))

    def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises."""
        self.scorer.score(np.zeros((1, self.scorer.n_features), dtype=np.float32))


def _source_digest() -> str:
    """sha256 of this package's source: replicas built from other code are another deployment."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """What a replica runs, as one short string: equal for every gateway that deploys the same thing."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([_source_digest(), *parts], sort_keys=True).encode()).hexdigest()[:20]


def version_app(registry_url: str, model: str, version: int, *, num_cpus: float = 0.25,
                scaling: ReplicaScaling | None = None, traces_exporter: str = "none",
                shutdown_wait_s: float | None = None) -> Application:
    """The Ray Serve application of one version (not deployed). The registry URL goes in without its
    password (`actor_registry_url`); `user_config` carries the fingerprint (module docstring);
    `scaling`: a fixed replica count or Ray Serve's autoscaler (chimera.settings.ReplicaScaling);
    `shutdown_wait_s`: Serve's graceful_shutdown_wait_loop_s (None: Serve's default), left out of the
    fingerprint: it only changes how fast a stopping replica goes, so a gateway with another value uses
    the running application as it is."""
    args = (actor_registry_url(registry_url), model, version, traces_exporter)
    replicas = (scaling or ReplicaScaling()).serve_options()
    shutdown = {} if shutdown_wait_s is None else {"graceful_shutdown_wait_loop_s": shutdown_wait_s}
    return VersionReplica.options(
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
        user_config={"fingerprint": fingerprint(args, num_cpus, replicas)},
        version=code_version(args, num_cpus), _internal=True,  # a scaling change restarts nothing
        **replicas, **shutdown,
    ).bind(*args)


def code_version(*parts: Any) -> str:
    """The Serve deployment version: what the replicas run, not how many of them (module docstring)."""
    return "code-" + fingerprint("code", *parts)


def deploy_version(registry_url: str, model: str, version: int, *, num_cpus: float = 0.25,
                   scaling: ReplicaScaling | None = None, traces_exporter: str = "none",
                   wait: bool = True, shutdown_wait_s: float | None = None) -> DeploymentHandle | None:
    """Use the version's application if one runs with the same fingerprint (another gateway deployed
    it), else deploy it; either way wait until it is ready. `wait=False` (a scaling change of a running
    application): hand Serve the new config and return None at once; the replicas that run keep
    serving while Serve adds or removes replicas."""
    app = version_app(registry_url, model, version, num_cpus=num_cpus, scaling=scaling,
                      traces_exporter=traces_exporter, shutdown_wait_s=shutdown_wait_s)
    name = app_name(model, version)
    wanted = app._bound_deployment._deployment_config.user_config["fingerprint"]
    if running_fingerprint(name, timeout_s=120.0 if wait else 0.0) == wanted:
        log.info("using the running application %s (same fingerprint)", name)
        return serve.get_app_handle(name) if wait else None
    if wait and app_status(name) == "DEPLOY_FAILED":
        # Serve keeps a failed application as it is: a serve.run of the same config over it changes
        # nothing and fails again with the old error, even once the cause has cleared (a repaired
        # artifact, Serve's proxy back after being killed). Deploy afresh instead.
        log.warning("application %s failed to deploy before; deleting it to deploy it afresh", name)
        serve.delete(name, _blocking=True)
    if not wait:
        from ray.serve.api import RunTarget

        serve.run_many([RunTarget(app, name=name, route_prefix=None)], wait_for_applications_running=False)
        return None
    try:
        return serve.run(app, name=name, route_prefix=None, blocking=False)
    except RuntimeError as exc:  # Serve says which deployment failed, not why: add the replica's error
        why = deployment_error(name)
        if why is None:
            raise
        raise RuntimeError(f"{exc} The replica said: {why}") from exc


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder for `serve deploy` / KubeRay (`import_path:
    replicas.deployment:build_app` in deploy/ray/serve-config.yaml). `args`: `model`, `version`, and
    optionally `registry_url` (default: CHIMERA_REGISTRY_URL of the Ray pod; an error when neither is
    set, since a replica must never fall back to a local SQLite file), `num_cpus` (default
    CHIMERA_REPLICA_NUM_CPUS), `traces_exporter` (default CHIMERA_TRACES_EXPORTER). The config's
    `deployments:` section overrides replica count and actor options as usual."""
    from chimera.settings import Settings, registry_url_from_env
    from chimera.tracing import check_exporter

    missing = [k for k in ("model", "version") if args.get(k) in (None, "")]
    if missing:
        raise ValueError(f"build_app: args {', '.join(missing)} required (got {sorted(args)})")
    model = str(args["model"])
    try:
        version = int(args["version"])
    except (TypeError, ValueError):
        raise ValueError(f"build_app: args.version must be an integer, got {args['version']!r}") from None
    registry_url = args.get("registry_url") or registry_url_from_env()
    if not registry_url:
        raise ValueError(f"build_app({model} v{version}): no registry URL: set CHIMERA_REGISTRY_URL in the "
                         "Ray pods' environment (deploy/k8s: the chimera-registry Secret) or pass "
                         "args.registry_url")
    settings = Settings.from_env()
    num_cpus = float(args["num_cpus"]) if args.get("num_cpus") is not None else settings.replica_num_cpus
    exporter = check_exporter(args.get("traces_exporter") or settings.traces_exporter)
    return version_app(str(registry_url), model, version, num_cpus=num_cpus, traces_exporter=exporter)


class DeclaredAppError(RuntimeError):
    """An application the cluster's Serve config declared failed to deploy or did not come up."""


def declared_app(model: str, version: int, *, timeout_s: float = 300.0, poll_s: float = 0.25) -> bool:
    """Whether the version's application was declared to Ray Serve by a config (serve-config.yaml via
    KubeRay or `serve deploy`). If so, wait until it is RUNNING and leave it exactly as declared: a
    `serve.run` over it would replace its config (replica count, resources) with the gateway's. False
    when there is no such application (the gateway deploys one itself, as before). Raises when the
    declared application failed to deploy or is not RUNNING within `timeout_s`."""
    name = app_name(model, version)
    deadline = time.monotonic() + timeout_s
    while True:
        details = app_details(name)  # None also when Serve is not even running: nothing was declared
        if details is None or plain(details.get("source")).lower() != "declarative":
            return False
        status = plain(details.get("status")).upper()
        if status == "RUNNING":
            return True
        if status in ("DEPLOY_FAILED", "DELETING"):
            raise DeclaredAppError(f"application {name} declared by the Serve config is {status}: "
                               f"{details.get('message') or 'no message'}")
        if time.monotonic() > deadline:
            raise DeclaredAppError(f"application {name} declared by the Serve config is still {status} after "
                               f"{timeout_s:g} s: {details.get('message') or 'no message'}")
        time.sleep(poll_s)


def undeploy_version(model: str, version: int, *, blocking: bool = True) -> None:
    serve.delete(app_name(model, version), _blocking=blocking)


def undeploy_versions(versions: list[tuple[str, int]], *, timeout_s: float = 60.0) -> None:
    """Delete several versions' applications at once and wait until all are gone: Serve tears them
    down in parallel, where deleting one by one waits for each replica to stop in turn."""
    import time

    names = {app_name(m, v) for m, v in versions}
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while names & set(serve.status().applications) and time.monotonic() < deadline:
        time.sleep(0.2)
