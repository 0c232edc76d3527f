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
    df = load_dataset(data) if data is not None else synthetic_signals(synthetic, seed=seed)
    result = run_train(df, algo=algo, seed=seed, degrade=degrade)  # type: ignore[arg-type]
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
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = 9090,
    host: Annotated[str, typer.Option(help="address to bind")] = "0.0.0.0",
    replica_cpus: Annotated[float | None, typer.Option(help="CPUs per replica")] = None,
    grace: Annotated[float, typer.Option(help="seconds in-flight calls get on shutdown")] = 10.0,
) -> None:
    """Deploy replicas for every weighted version and run the gateway until Ctrl-C / SIGTERM."""
    import asyncio

    from gateway.server import GatewayConfig, ensure_ray, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    _registry().upgrade()
    ensure_ray(settings.ray_address, settings.ray_num_cpus)
    config = GatewayConfig(
        registry_url=settings.registry_url,
        port=port,
        host=host,
        metrics_port=metrics_port,
        admin_token=settings.admin_token,
        replica_cpus=replica_cpus or settings.replica_num_cpus,
        grace_period_s=grace,
    )
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


def canary_weights(current: dict[int, int], version: int, percent: int) -> dict[int, int]:
    """The new split: `version` at `percent`, the heaviest other version absorbs the difference."""
    if not 0 <= percent <= 100:
        raise typer.BadParameter("percent must be within 0..100")
    others = {v: w for v, w in current.items() if v != version and w > 0}
    if not others:
        if percent != 100:
            raise typer.BadParameter(f"no other version has traffic to take the remaining {100 - percent}%")
        return {version: 100}
    main = max(others, key=lambda v: (others[v], -v))
    rest = sum(w for v, w in others.items() if v != main)
    main_weight = 100 - percent - rest
    if main_weight < 0:
        raise typer.BadParameter(f"other versions already hold {rest}%; lower them first")
    return {**{v: w for v, w in others.items()}, main: main_weight, version: percent}


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
    from chimera.client import rollout_stub
    from chimera.v1 import rollout_pb2 as rpb

    split = _rpc(
        rollout_stub(target).Promote,
        rpb.PromoteRequest(model=model, version=version, reason=reason, force=force),
    )
    console.print(f"{model}: v{version} promoted (split revision {split.revision})")


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
    from gateway.analysis import recompute
    from registry.rollouts import decisions

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
    warmup: Annotated[float, typer.Option(help="seconds of load before measuring")] = 0.0,
    arrival: Annotated[str, typer.Option(help="constant | poisson")] = "constant",
    concurrency_limit: Annotated[int, typer.Option(help="max calls in flight (0: none); over it, "
                                                        "arrivals queue and their wait counts")] = 0,
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
    data: Annotated[Path | None, typer.Option(help="CSV/Parquet rows to send (default: generated "
                                                   "from the version's feature schema)")] = None,
    registry_url: Annotated[str | None, typer.Option(help="registry for the schema and the stored run "
                                                          "(default CHIMERA_REGISTRY_URL)")] = None,
    store: Annotated[bool, typer.Option(help="store the run in the registry")] = True,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Open-loop load test with an SLO gate: exit 0 when every SLO holds, 3 when one fails."""
    from loadtest.command import LoadTestOptions
    from loadtest.command import main as loadtest_main
    from loadtest.slo import SLO

    opts = LoadTestOptions(
        target=target, model=model, rps=rps, duration_s=duration, version=version, warmup_s=warmup,
        arrival=arrival,  # type: ignore[arg-type]  # validated by the runner
        concurrency_limit=concurrency_limit, workers=workers, timeout_s=timeout,
        slo=SLO(p50_ms=slo_p50_ms, p90_ms=slo_p90_ms, p99_ms=slo_p99_ms, p99_9_ms=slo_p999_ms,
                max_error_rate=max_error_rate, min_achieved_ratio=min_achieved_ratio),
        report_path=report, plot_path=plot, data_path=data, registry_url=registry_url, store=store, seed=seed)
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
    runs: Annotated[int, typer.Option()] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON only")] = True,
) -> None:
    """Run the real rollout decision code on simulated outcome streams (always-valid vs naive)."""
    from gateway.simulate import main as simulate_main

    argv = ["--scenario", scenario, "--runs", str(runs), "--seed", str(seed)]
    del as_json
    sys.exit(simulate_main(argv))
