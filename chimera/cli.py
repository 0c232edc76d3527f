"""`chimera` command line (Typer). Commands are thin: they parse options and call the packages."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table

from chimera.settings import Settings

app = typer.Typer(
    help="Chimera: gRPC model-serving gateway with canary routing.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Registry database.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models and versions.", no_args_is_help=True)
canary_app = typer.Typer(help="Canary traffic.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollout state and decisions.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(canary_app, name="canary")
console = Console()

TargetOpt = Annotated[str, typer.Option("--target", help="gateway host:port")]


def _registry():  # noqa: ANN202
    from registry import Registry

    return Registry(Settings.from_env().registry_url)


def main() -> None:
    """The `chimera` command: registry errors (database unreachable, schema missing) end with one line
    naming the problem instead of a traceback; the URL's password is never printed."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        app()
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        console.print(f"[red]error:[/red] registry: {first} (check CHIMERA_REGISTRY_URL; a new database "
                      "needs `chimera db upgrade`)")
        sys.exit(1)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations to CHIMERA_REGISTRY_URL (default: ./chimera.db)."""
    settings = Settings.from_env()
    reg = _registry()
    reg.upgrade()
    console.print(f"registry at {_safe_url(settings.registry_url)} is up to date")


def _safe_url(url: str) -> str:
    """Never print a password from a database URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="model name in the registry")],
    synthetic: Annotated[int, typer.Option(help="rows of synthetic trading-signal data")] = 0,
    data: Annotated[Path | None, typer.Option(help="CSV or Parquet file instead of synthetic data")] = None,
    algo: Annotated[str, typer.Option(help="xgboost or logreg")] = "xgboost",
    seed: Annotated[int, typer.Option()] = 0,
    degrade: Annotated[
        float, typer.Option(help="shuffle this fraction of labels (a deliberately worse model)")
    ] = 0.0,
    metric: Annotated[
        str, typer.Option(help="comparison metric for canaries of a new model")
    ] = "success_rate",
    publish: Annotated[bool, typer.Option(help="publish the version into the registry")] = False,
) -> None:
    """Train on a walk-forward split, export ONNX, check parity, and (with --publish) publish."""
    from training.datasets import load_dataset, synthetic_signals
    from training.pipeline import train as run_train
    from training.publish import publish_result

    if data is None and synthetic <= 0:
        _fail("give --synthetic N or --data PATH")
    try:
        df = load_dataset(data) if data is not None else synthetic_signals(synthetic, seed=seed)
        result = run_train(df, algo=algo, seed=seed, degrade=degrade)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError) as exc:  # a bad file or too little data: say so, no traceback
        _fail(f"{'--data' if data is not None else '--synthetic'}: {exc}")
    table = Table(title=f"{model} ({algo}) on the test window")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if publish:
        reg = _registry()
        reg.upgrade()
        info = publish_result(reg, model, result, metric=metric)
        console.print(f"published [bold]{model} v{info.version}[/bold] sha256 {info.sha256[:16]}…")
    else:
        console.print("not published (add --publish)")


@models_app.command("list")
def models_list() -> None:
    """Models with their versions and current weights."""
    reg = _registry()
    table = Table("model", "metric", "revision", "version", "status", "weight", "auc", "created")
    for m in reg.list_models():
        for v in m.versions:
            auc = v.metrics.get("auc")
            table.add_row(
                m.name,
                m.metric,
                str(m.split.revision),
                str(v.version),
                v.status,
                str(m.split.weights.get(v.version, 0)),
                f"{auc:.4f}" if auc else "-",
                v.created_at.strftime("%Y-%m-%d %H:%M"),
            )
    console.print(table)


@models_app.command("show")
def models_show(model: str, version: Annotated[int | None, typer.Option()] = None) -> None:
    """One model (or one version) in full, as JSON."""
    from registry import NotFoundError

    reg = _registry()
    try:
        info = reg.get_model(model)
    except NotFoundError as exc:
        _fail(str(exc))
    versions = [v for v in info.versions if version is None or v.version == version]
    if version is not None and not versions:
        _fail(f"version: model {model!r} has no version {version}")
    out = {
        "model": info.name,
        "metric": info.metric,
        "split": {"revision": info.split.revision, "weights": dict(info.split.weights)},
        "versions": [
            {
                "version": v.version,
                "status": v.status,
                "sha256": v.sha256,
                "features": list(v.feature_names),
                "metrics": dict(v.metrics),
                "params": dict(v.params),
                "data_hash": v.data_hash,
                "parent_version": v.parent_version,
                "size_bytes": v.size_bytes,
                "created_at": v.created_at.isoformat(),
            }
            for v in versions
        ],
    }
    console.print_json(json.dumps(out, default=str))


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="gRPC port")] = 50051,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: off)")] = 9090,
    host: Annotated[str, typer.Option(help="address to bind")] = "0.0.0.0",
    replica_cpus: Annotated[float | None, typer.Option(help="CPUs per replica")] = None,
    grace: Annotated[
        float, typer.Option(help="seconds from SIGTERM to exit: drain, let in-flight calls finish")
    ] = 10.0,
    drain_delay: Annotated[
        float, typer.Option(help="seconds new calls are still taken after health turns NOT_SERVING")
    ] = 1.0,
    controller_interval: Annotated[
        float, typer.Option(help="seconds between rollout-controller looks (0: no controller here)")
    ] = 2.0,
    event_loop: Annotated[
        str, typer.Option("--loop", help="event loop: asyncio, or uvloop (~10 % more req/s here, but a "
                          "call arriving as shutdown starts can be CANCELLED instead of drained)")
    ] = "asyncio",
    promotion_loadtest_max_age: Annotated[
        float | None,
        typer.Option(help="seconds a passing load test stays good for promotion "
                     "(default CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S, else 86400)"),
    ] = None,
    log_features_sample: Annotated[
        float | None,
        typer.Option(help="fraction 0..1 of predictions logged with their feature row "
                     "(default CHIMERA_LOG_FEATURES_SAMPLE, else 1)"),
    ] = None,
) -> None:
    """Deploy replicas for every weighted version and run the gateway until Ctrl-C / SIGTERM.
    CHIMERA_PREDICT_TOKEN, when set, is required on every PredictionService call;
    CHIMERA_TRACES_EXPORTER (console, otlp) turns on OpenTelemetry spans."""
    from chimera.settings import parse_log_features_sample, parse_promotion_loadtest_max_age

    if event_loop not in ("uvloop", "asyncio"):
        raise typer.BadParameter("--loop must be uvloop or asyncio")
    try:  # an option overrides its environment variable; a bad value of either fails here
        if promotion_loadtest_max_age is not None:
            parse_promotion_loadtest_max_age(promotion_loadtest_max_age, "--promotion-loadtest-max-age")
        if log_features_sample is not None:
            parse_log_features_sample(log_features_sample, "--log-features-sample")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        _fail(str(exc), 2)
    if promotion_loadtest_max_age is None:
        promotion_loadtest_max_age = settings.promotion_loadtest_max_age_s
    if log_features_sample is None:
        log_features_sample = settings.log_features_sample
    import asyncio

    from gateway.server import GatewayConfig, ensure_ray, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _registry().upgrade()
    ensure_ray(settings.ray_address, settings.ray_num_cpus)
    config = GatewayConfig(
        registry_url=settings.registry_url,
        port=port,
        host=host,
        metrics_port=metrics_port or None,
        admin_token=settings.admin_token,
        replica_cpus=replica_cpus or settings.replica_num_cpus,
        grace_period_s=grace,
        drain_delay_s=drain_delay,
        predict_token=settings.predict_token,
        controller_interval_s=controller_interval,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_client_ca=settings.tls_client_ca,
        traces_exporter=settings.traces_exporter,
        promotion_loadtest_max_age_s=promotion_loadtest_max_age,
        log_features_sample=log_features_sample,
    )
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(serve_forever(config))
    else:
        asyncio.run(serve_forever(config))


@canary_app.command("set")
def canary_set(
    model: str,
    version: Annotated[int, typer.Option(help="canary version")],
    percent: Annotated[int, typer.Option(help="canary weight 0..100")],
    target: TargetOpt = "127.0.0.1:50051",
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Give VERSION PERCENT of the traffic; the current main version takes the rest."""
    from chimera.client import admin_metadata, rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    stub = rollout_stub(target)
    md = admin_metadata()
    try:
        split = stub.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), metadata=md, timeout=10)
        weights = {w.version: w.weight for w in split.weights}
        weights = canary_weights(weights, version, percent)
        new = stub.SetTrafficSplit(
            rpb.SetTrafficSplitRequest(
                model=model,
                expected_revision=split.revision,
                reason=reason or f"canary set {version}={percent}",
                weights=[rpb.VersionWeight(version=v, weight=w) for v, w in sorted(weights.items())],
            ),
            metadata=md,
            timeout=30,
        )
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    console.print(
        f"{model} split revision {new.revision}: "
        + ", ".join(f"v{w.version}={w.weight}%" for w in new.weights)
    )


@canary_app.command("shadow")
def canary_shadow(
    model: str,
    version: Annotated[int, typer.Option(help="version to mirror on live traffic (0: stop)")],
    target: TargetOpt = "127.0.0.1:50051",
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Mirror VERSION on live traffic: scored and logged, never returned to callers."""
    from chimera.client import rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    split = _rpc(
        rollout_stub(target).SetShadow, rpb.SetShadowRequest(model=model, version=version, reason=reason)
    )
    console.print(
        f"{model}: shadow {'v' + str(split.shadow_version) if split.shadow_version else 'off'} "
        f"(split revision {split.revision})"
    )


def canary_weights(current: dict[int, int], version: int, percent: int) -> dict[int, int]:
    """The new split: `version` at `percent`, the heaviest other version absorbs the difference."""
    from rollout import splits

    try:
        return splits.set_weight(current, version, percent)
    except splits.SplitError as exc:
        raise typer.BadParameter(str(exc)) from None


def _rpc(fn, request, timeout: float = 30):  # noqa: ANN001, ANN202
    from chimera.client import admin_metadata

    try:
        return fn(request, metadata=admin_metadata(), timeout=timeout)
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or x != x else format(x, spec)


@rollout_app.command("status")
def rollout_status(
    model: str,
    target: TargetOpt = "127.0.0.1:50051",
    decisions: Annotated[int, typer.Option(help="recent decisions to show")] = 5,
) -> None:
    """Versions, weights, counts and metric per arm, p-value and the last decisions."""
    from chimera.client import rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    st = _rpc(
        rollout_stub(target).GetRolloutStatus, rpb.GetRolloutStatusRequest(model=model, decisions=decisions)
    )
    last = st.decisions[0] if st.decisions else None
    table = Table(
        title=f"{st.model} — metric {st.metric}, split revision {st.revision}"
        + (f", canary since {st.started_at}" if st.started_at else "")
    )
    for col in ("version", "status", "role", "weight %", "requests", "outcomes", st.metric):
        table.add_column(col, justify="right" if col not in ("status", "role") else "left")
    for a in st.arms:
        table.add_row(
            str(a.version),
            a.status,
            a.role,
            str(a.weight),
            str(a.requests) if a.role else "-",
            str(a.outcomes) if a.role else "-",
            _fmt(a.metric_value) if a.role else "-",
        )
    console.print(table)
    if last is not None:
        console.print(
            f"last decision: [bold]{last.action}[/bold] v{last.canary_version} vs v{last.baseline_version} "
            f"p={_fmt(last.p_value)} ({last.test or 'manual'}) at {last.created_at}: {last.reason}"
        )
    if st.decisions:
        hist = Table(
            "id",
            "at",
            "action",
            "canary",
            "p-value",
            "n base",
            "n canary",
            "mean base",
            "mean canary",
            "weight",
            title="recent decisions",
        )
        for d in st.decisions:
            hist.add_row(
                str(d.id),
                d.created_at[:19],
                d.action,
                f"v{d.canary_version}",
                _fmt(d.p_value),
                str(d.n_baseline),
                str(d.n_canary),
                _fmt(d.mean_baseline),
                _fmt(d.mean_canary),
                f"{d.weight_before}→{d.weight_after}",
            )
        console.print(hist)


@app.command()
def promote(
    model: str,
    version: Annotated[int, typer.Option(help="version to give 100 %")],
    target: TargetOpt = "127.0.0.1:50051",
    reason: Annotated[str, typer.Option()] = "",
    force: Annotated[bool, typer.Option(help="skip the load-test gate (audited)")] = False,
) -> None:
    """Promote VERSION to production (needs a recent passing load test unless --force)."""
    from chimera.client import admin_metadata, rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    request = rpb.PromoteRequest(model=model, version=version, reason=reason, force=force)
    try:
        split = rollout_stub(target).Promote(request, metadata=admin_metadata(), timeout=30)
    except grpc.RpcError as exc:
        refused = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not force
        hint = "; or skip the gate with --force (recorded as forced in the audit log)" if refused else ""
        _fail(f"{exc.code().name}: {exc.details()}{hint}")
    forced = " without the load-test gate (forced, audited)" if force else ""
    console.print(f"{model}: v{version} promoted{forced} (split revision {split.revision})")


@app.command()
def rollback(
    model: str,
    version: Annotated[int, typer.Option(help="version to roll back (default: the canary)")] = 0,
    target: TargetOpt = "127.0.0.1:50051",
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Roll the canary back (or, with no canary, return to the standby version)."""
    from chimera.client import rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    split = _rpc(
        rollout_stub(target).Rollback, rpb.RollbackRequest(model=model, version=version, reason=reason)
    )
    console.print(
        f"{model}: split revision {split.revision}: "
        + ", ".join(f"v{w.version}={w.weight}%" for w in split.weights)
    )


@app.command()
def analyze(
    model: str,
    decision: Annotated[int | None, typer.Option(help="decision id (default: the latest)")] = None,
) -> None:
    """Recompute a stored decision from the logged rows in CHIMERA_REGISTRY_URL and compare.

    Reads the registry directly rather than asking a gateway: an auditor should not have to trust the
    process that made the decision."""
    from registry.rollouts import decisions
    from rollout.analysis import recompute

    reg = _registry()
    if decision is None:
        rows = [r for r in decisions(reg, model, limit=50) if r["test"]]
        if not rows:
            _fail(f"no statistical decisions stored for {model!r}")
        decision = rows[0]["id"]
    result = recompute(reg, decision)
    stored, d = result.stored, result.decision
    table = Table(
        "quantity",
        "stored",
        "recomputed",
        "|diff|",
        title=f"decision {decision}: {stored['action']} v{stored['canary_version']} "
        f"vs v{stored['baseline_version']} ({stored['metric']}, {stored['details'].get('test')})",
    )
    diffs = result.differences()
    for key, value in diffs.items():
        s_val = stored["details"].get(key, stored.get(key))
        table.add_row(key, _fmt(s_val, ".10g"), _fmt(getattr(d, key), ".10g"), _fmt(value, ".2e"))
    console.print(table)
    console.print(
        f"window {stored['details']['window']['since']} … {stored['details']['window']['until']}; "
        f"recomputed action: {d.action}"
    )
    if max(diffs.values()) > 1e-9:
        _fail("recomputation differs from the stored decision by more than 1e-9")


@app.command()
def loadtest(
    model: Annotated[str, typer.Option(help="model name")],
    rps: Annotated[float, typer.Option(help="target arrival rate, requests/s")],
    duration: Annotated[float, typer.Option(help="measured seconds (after warmup)")],
    target: TargetOpt = "127.0.0.1:50051",
    version: Annotated[int, typer.Option(help="pin this version (needs CHIMERA_ADMIN_TOKEN); 0: routed")] = 0,
    warmup: Annotated[float, typer.Option(help="seconds of load before measuring")] = 1.0,
    arrival: Annotated[str, typer.Option(help="constant | poisson")] = "constant",
    concurrency_limit: Annotated[
        int, typer.Option(help="max calls in flight (0: none); over it, arrivals queue and their wait counts")
    ] = 0,
    workers: Annotated[int, typer.Option(help="worker processes (0: auto)")] = 0,
    timeout: Annotated[float, typer.Option(help="per-request deadline, seconds from intended send")] = 10.0,
    slo_p50_ms: Annotated[float | None, typer.Option(help="p50 latency SLO, ms")] = None,
    slo_p90_ms: Annotated[float | None, typer.Option(help="p90 latency SLO, ms")] = None,
    slo_p99_ms: Annotated[float | None, typer.Option(help="p99 latency SLO, ms")] = None,
    slo_p999_ms: Annotated[float | None, typer.Option(help="p99.9 latency SLO, ms")] = None,
    max_error_rate: Annotated[float, typer.Option(help="max fraction of failed requests")] = 0.01,
    min_achieved_ratio: Annotated[float, typer.Option(help="min achieved/target rate")] = 0.9,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG latency plot here")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="CSV/Parquet rows to send (default: generated from the version's feature schema)"),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(help="registry for the schema and the stored run (default CHIMERA_REGISTRY_URL)"),
    ] = None,
    store: Annotated[bool, typer.Option(help="store the run in the registry")] = True,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Open-loop load test with an SLO gate: exit 0 when every SLO holds, 3 when one fails."""
    from loadtest.command import LoadTestOptions
    from loadtest.command import main as loadtest_main
    from loadtest.slo import SLO

    opts = LoadTestOptions(
        target=target,
        model=model,
        rps=rps,
        duration_s=duration,
        version=version,
        warmup_s=warmup,
        arrival=arrival,  # type: ignore[arg-type]  # validated by the runner
        concurrency_limit=concurrency_limit,
        workers=workers,
        timeout_s=timeout,
        slo=SLO(
            p50_ms=slo_p50_ms,
            p90_ms=slo_p90_ms,
            p99_ms=slo_p99_ms,
            p99_9_ms=slo_p999_ms,
            max_error_rate=max_error_rate,
            min_achieved_ratio=min_achieved_ratio,
        ),
        report_path=report,
        plot_path=plot,
        data_path=data,
        registry_url=registry_url,
        store=store,
        seed=seed,
    )
    raise typer.Exit(loadtest_main(opts, console))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo keeps its registry and files")] = Path(
        "chimera-demo"
    ),
    requests: Annotated[int, typer.Option(help="Predict calls to send")] = 3000,
) -> None:
    """The main job on embedded defaults: train, publish, serve 90/10, score, record outcomes."""
    from chimera.demo import run_demo

    sys.exit(run_demo(workdir, requests=requests, console=console))


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="aa | ab-worse | ab-better | all")] = "all",
    runs: Annotated[
        int | None, typer.Option(help="runs per scenario (default 500 for aa, 200 for the others)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output (the only format)")] = True,
) -> None:
    """Run the real rollout decision code on simulated outcome streams (always-valid vs naive); prints
    JSON. With --scenario all, exits 1 when an acceptance check fails."""
    del as_json  # the report is JSON whether or not --json is given
    if runs is not None and runs < 1:
        _fail(f"--runs: must be at least 1, got {runs}", 2)
    from rollout.simulate import main as simulate_main

    argv = ["--scenario", scenario, "--seed", str(seed)]
    argv += ["--runs", str(runs)] if runs is not None else []
    sys.exit(simulate_main(argv))


@app.command()
def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="write the JSON report here")] = None,
    duration: Annotated[float, typer.Option(help="measured seconds per case")] = 10.0,
    warmup: Annotated[float, typer.Option(help="unmeasured seconds before each case")] = 2.0,
    soak: Annotated[float, typer.Option(help="soak seconds at 70% of max throughput (0: none)")] = 0.0,
    quick: Annotated[bool, typer.Option(help="tiny durations: checks the machinery, not speed")] = False,
    profile: Annotated[float, typer.Option(help="py-spy the gateway this many seconds in one case")] = 0.0,
    profile_out: Annotated[Path | None, typer.Option(help="profile file (.svg, .json, .txt)")] = None,
    profile_case: Annotated[str, typer.Option(help="the case to profile")] = "chimera_c64",
) -> None:
    """Raw onnxruntime vs Ray Serve's gRPC proxy vs the Chimera gateway, same model, one run."""
    from loadtest.bench import main as bench_main

    argv = ["--duration", str(duration), "--warmup", str(warmup), "--soak", str(soak),
            "--profile", str(profile), "--profile-case", profile_case]
    argv += ["--json", str(json_path)] if json_path else []
    argv += ["--profile-out", str(profile_out)] if profile_out else []
    argv += ["--quick"] if quick else []
    sys.exit(bench_main(argv))


# ------------------------------------------------------------------------------ continuous training
def _parse_when(text: str):  # noqa: ANN202
    from datetime import UTC, datetime

    dt = datetime.fromisoformat(text.strip())
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def retrain_table(out) -> Table:  # noqa: ANN001 - training.retrain.RetrainOutcome, imported lazily
    """Production vs candidate on the retrain holdout (also used by the demo)."""
    rows = int(out.candidate["n"])
    table = Table(title=f"{out.run.model}: holdout of run {out.run.id} ({rows} newest rows)")
    for col in ("metric", f"production v{out.production_version}", "candidate", "delta", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for c in out.comparison:
        verdict = "[red]worse[/red]" if c.worse else "[green]ok[/green]"
        table.add_row(c.metric, _fmt(c.production), _fmt(c.candidate), _fmt(c.delta, "+.4f"), verdict)
    return table


def drift_table(report, recent: str = "recent") -> Table:  # noqa: ANN001 - training.drift.DriftReport
    """Feature, PSI, KS statistic, p-value, flag per feature plus the score row (also used by the demo)."""
    r0, r1 = report.reference_window
    title = f"{report.model} v{report.version}: {recent} vs {report.reference_kind.replace('_', ' ')}"
    if r0 and r1:
        title += f" ({r0:%Y-%m-%d %H:%M} .. {r1:%Y-%m-%d %H:%M})"
    table = Table("feature", "PSI", "KS statistic", "p-value", "n ref", "n recent", "flag", title=title)
    for f in [*report.features, *([report.score] if report.score else [])]:
        flag = f"[red]DRIFT[/red] {f.reason}" if f.flagged else "[green]ok[/green]"
        name = "[italic]score[/italic]" if f is report.score else f.feature
        table.add_row(
            name,
            _fmt(f.psi, ".3f"),
            _fmt(f.ks_statistic, ".3f"),
            _fmt(f.ks_pvalue, ".2g"),
            str(f.n_reference),
            str(f.n_current),
            flag,
        )
    return table


@app.command()
def retrain(
    model: Annotated[str, typer.Option(help="model name in the registry")],
    window: Annotated[str, typer.Option(help="rolling window of logged feedback: 90d, 12h, 2w")] = "90d",
    mode: Annotated[str, typer.Option(help="full | incremental (continue production's booster)")] = "full",
    tolerance: Annotated[
        float, typer.Option(help="how much worse than production a gate metric may be (metric units)")
    ] = 0.0,
    canary_percent: Annotated[
        int | None, typer.Option(help="canary weight (default: first step of the model's rollout policy)")
    ] = None,
    canary: Annotated[bool, typer.Option("--canary/--no-canary", help="canary when published")] = True,
    gate: Annotated[str, typer.Option(help="metrics not to get worse")] = "auc,brier,ece,outcome_metric",
    threshold: Annotated[float, typer.Option(help="label = outcome > threshold (continuous outcomes)")] = 0.0,
    min_rows: Annotated[int, typer.Option(help="least feedback rows to train on")] = 500,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    loadtest_target: Annotated[
        str | None,
        typer.Option(help="gateway host:port: load-test the candidate (pinned; CHIMERA_ADMIN_TOKEN) "
                     "before its canary, no canary if it fails (default CHIMERA_GATEWAY_TARGET; "
                     "none: no load test)"),
    ] = None,
    loadtest_rps: Annotated[float | None, typer.Option(help="load-test rate, req/s (default 50)")] = None,
    loadtest_duration: Annotated[
        float | None, typer.Option(help="measured load-test seconds (default 10)")
    ] = None,
    loadtest_slo_p99_ms: Annotated[
        float | None, typer.Option(help="load-test p99 SLO, ms (default 250)")
    ] = None,
    loadtest_max_error_rate: Annotated[
        float | None, typer.Option(help="load-test max failed fraction (default 0.01)")
    ] = None,
) -> None:
    """Retrain from logged outcomes; publish only if not worse than production; start a canary.

    Exit status: 0 published (canaried unless --no-canary or another canary has traffic); 3 held back
    (not published: worse than production; or published but not canaried: its load test failed or could
    not run); 1 the retrain could not run; 2 bad options; 75 another process is retraining this model."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from registry import NotFoundError
    from training.feedback import parse_window
    from training.retrain import LoadTestGate, RetrainBusy, RetrainConfig, RetrainError
    from training.retrain import retrain as run_retrain

    try:
        gate_lt = LoadTestGate.from_env(None, target=loadtest_target, rps=loadtest_rps,
                                        duration_s=loadtest_duration, slo_p99_ms=loadtest_slo_p99_ms,
                                        max_error_rate=loadtest_max_error_rate)
        config = RetrainConfig(
            window=parse_window(window),
            mode=mode,
            tolerance=tolerance,
            canary=canary,
            canary_percent=canary_percent,
            gate=tuple(g.strip() for g in gate.split(",")),
            threshold=threshold,
            min_rows=min_rows,
            seed=seed,
            loadtest=gate_lt,
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    reg = _registry()
    reg.upgrade()
    try:
        with Progress(
            TextColumn("[bold]{task.fields[model]}[/bold]"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=as_json,
            transient=False,
        ) as bar:
            task = bar.add_task("starting", total=1.0, model=model)
            out = run_retrain(
                reg,
                model,
                config,
                trigger="cli",
                progress=lambda f, stage: bar.update(task, completed=f, description=stage),
            )
    except RetrainBusy as exc:
        console.print(f"[yellow]skipped:[/yellow] {exc}")
        raise typer.Exit(75) from None
    except (RetrainError, NotFoundError, ValueError) as exc:
        _fail(str(exc))
    held = out.published is None or (config.loadtest is not None
                                     and (out.loadtest is None or not out.loadtest.passed))
    if as_json:
        print(
            json.dumps(
                {
                    "run": out.run.id,
                    "published_version": out.run.published_version,
                    "production_version": out.production_version,
                    "reason": out.reason,
                    "canary": dict(out.canary.weights) if out.canary else None,
                    "loadtest": out.run.metrics.get("loadtest"),
                    "metrics": out.run.metrics,
                },
                default=str,
            )
        )
    else:
        console.print(retrain_table(out))
        color = "yellow" if held else "green"
        console.print(
            f"[{color}]{out.reason}[/{color}]  (run {out.run.id}, {out.run.duration_s or 0:.1f}s, "
            f"data {out.run.data_hash[:12]}, code {out.run.code_revision[:12] or '-'})"
        )
    if held:
        raise typer.Exit(3)


@app.command()
def drift(
    model: str,
    window: Annotated[str, typer.Option(help="recent served requests to check: 1d, 6h")] = "1d",
    reference: Annotated[
        str | None,
        typer.Option(
            help="reference window START..END (ISO times); default: the production version's "
            "training window, else the window just before the recent one"
        ),
    ] = None,
    version: Annotated[int | None, typer.Option(help="version whose schema and scores to use")] = None,
    psi_threshold: Annotated[float, typer.Option(help="flag a feature above this PSI")] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    fail_on_drift: Annotated[bool, typer.Option(help="exit with status 3 when anything drifted")] = False,
) -> None:
    """Per-feature PSI and KS of recent served requests against the training window, and score drift."""
    from registry import NotFoundError
    from training.drift import DriftThresholds, drift_report
    from training.feedback import parse_window

    ref = None
    if reference:
        start, sep, end = reference.partition("..")
        if not sep:
            _fail("reference: expected START..END", 2)
        ref = (_parse_when(start), _parse_when(end))
    try:
        report = drift_report(
            _registry(),
            model,
            window=parse_window(window),
            reference=ref,
            version=version,
            thresholds=DriftThresholds(psi=psi_threshold),
        )
    except (ValueError, NotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        console.print(drift_table(report, f"last {window}"))
        score_note = f"; score drift ({report.score.reason})" if report.score and report.score.flagged else ""
        console.print(f"flagged: {', '.join(report.flagged) or 'none'}{score_note}")
    if fail_on_drift and report.drifted:
        raise typer.Exit(3)


@app.command()
def scheduler(
    once: Annotated[bool, typer.Option(help="run every configured job once, now, and exit")] = False,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: off)")] = 9109,
) -> None:
    """Run retrain and drift jobs on CHIMERA_RETRAIN_SCHEDULE / CHIMERA_DRIFT_SCHEDULE (cron, UTC);
    the holder of a PostgreSQL advisory lock is the one scheduler that acts."""
    import signal
    import threading

    from training.scheduler import JobResult, Scheduler, SchedulerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = SchedulerSettings.from_env()
    except ValueError as exc:
        _fail(str(exc), 2)
    reg = _registry()
    reg.upgrade()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)

    def show(results: list[JobResult]) -> None:
        for r in results:
            console.print(f"{r.job} {r.model}: [bold]{r.status}[/bold] {r.detail}")

    sched = Scheduler(reg, settings)
    jobs = ", ".join(f"{name} '{spec.text}'" for name, spec in sched.jobs.items()) or "none"
    models = ", ".join(settings.models) or "all with a production version"
    console.print(f"scheduler: {jobs}; models: {models}")
    if once:
        try:
            show(sched.run_now())
        finally:
            sched.lock.release()
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        sched.run_forever(stop, on_results=show)
    except KeyboardInterrupt:
        stop.set()
