"""Training commands: `train` (build, export, check and publish a version), `retrain` (from logged
outcomes, gated on production and on an optional load test), `drift` (PSI/KS of served requests) and
`scheduler` (retrain and drift on cron schedules). The retrain load-test gate
(loadtest.candidate_gate.LoadTestGate) is built here and injected: training never imports loadtest."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from chimera.cli import views
from chimera.cli.shared import load_settings, open_registry
from chimera.cli.views import drift_table, retrain_table
from chimera.settings import Settings

if TYPE_CHECKING:
    from loadtest.candidate_gate import LoadTestGate


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
        views.fail("give --synthetic N or --data PATH")
    try:
        df = load_dataset(data) if data is not None else synthetic_signals(synthetic, seed=seed)
        result = run_train(df, algo=algo, seed=seed, degrade=degrade)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError) as exc:  # a bad file or too little data: say so, no traceback
        views.fail(f"{'--data' if data is not None else '--synthetic'}: {exc}")
    table = Table(title=f"{model} ({algo}) on the test window")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    views.console.print(table)
    if publish:
        reg = open_registry()
        reg.upgrade()
        info = publish_result(reg, model, result, metric=metric)
        views.console.print(f"published [bold]{model} v{info.version}[/bold] sha256 {info.sha256[:16]}…")
    else:
        views.console.print("not published (add --publish)")


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
    from training.retrain import RetrainBusy, RetrainConfig, RetrainError
    from training.retrain import retrain as run_retrain

    settings = load_settings()
    try:
        gate_lt = _loadtest_gate(settings, target=loadtest_target, rps=loadtest_rps,
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
        views.fail(str(exc), 2)
    reg = open_registry(settings)
    reg.upgrade()
    try:
        with Progress(
            TextColumn("[bold]{task.fields[model]}[/bold]"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=views.console,
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
        views.console.print(f"[yellow]skipped:[/yellow] {exc}")
        raise typer.Exit(75) from None
    except (RetrainError, NotFoundError, ValueError) as exc:
        views.fail(str(exc))
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
        views.console.print(retrain_table(out))
        color = "yellow" if held else "green"
        views.console.print(
            f"[{color}]{out.reason}[/{color}]  (run {out.run.id}, {out.run.duration_s or 0:.1f}s, "
            f"data {out.run.data_hash[:12]}, code {out.run.code_revision[:12] or '-'})"
        )
    if held:
        raise typer.Exit(3)


def _loadtest_gate(settings: Settings, **overrides: Any) -> LoadTestGate | None:
    """The pre-canary load test from CHIMERA_GATEWAY_TARGET / CHIMERA_RETRAIN_LOADTEST_* with the
    command's options on top (None: not given); None when no target is set. ValueError when a value
    is out of range."""
    from loadtest.candidate_gate import LoadTestGate

    return LoadTestGate.from_settings(settings.retrain, **overrides)


def _parse_when(text: str) -> datetime:
    """An ISO time from the command line; without an offset it means UTC."""
    from registry.models import as_utc

    return as_utc(datetime.fromisoformat(text.strip()))


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
            views.fail("reference: expected START..END", 2)
        ref = (_parse_when(start), _parse_when(end))
    try:
        report = drift_report(
            open_registry(),
            model,
            window=parse_window(window),
            reference=ref,
            version=version,
            thresholds=DriftThresholds(psi=psi_threshold),
        )
    except (ValueError, NotFoundError) as exc:
        views.fail(str(exc))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        views.console.print(drift_table(report, f"last {window}"))
        score_note = f"; score drift ({report.score.reason})" if report.score and report.score.flagged else ""
        views.console.print(f"flagged: {', '.join(report.flagged) or 'none'}{score_note}")
    if fail_on_drift and report.drifted:
        raise typer.Exit(3)


def scheduler(
    once: Annotated[bool, typer.Option(help="run every configured job once, now, and exit")] = False,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: off)")] = 9109,
) -> None:
    """Run retrain and drift jobs on CHIMERA_RETRAIN_SCHEDULE / CHIMERA_DRIFT_SCHEDULE (cron, UTC);
    the holder of a PostgreSQL advisory lock is the one scheduler that acts."""
    import signal
    import threading

    from training.scheduler import JobResult, Scheduler, check_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    try:
        schedule = check_settings(settings.scheduler)
    except ValueError as exc:
        views.fail(str(exc), 2)
    try:
        gate_lt = _loadtest_gate(settings)
    except ValueError as exc:
        views.fail(f"CHIMERA_RETRAIN_LOADTEST_*: {exc}", 2)
    reg = open_registry(settings)
    reg.upgrade()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)

    def show(results: list[JobResult]) -> None:
        for r in results:
            views.console.print(f"{r.job} {r.model}: [bold]{r.status}[/bold] {r.detail}")

    sched = Scheduler(reg, schedule, loadtest_gate=gate_lt)
    jobs = ", ".join(f"{name} '{spec.text}'" for name, spec in sched.jobs.items()) or "none"
    models = ", ".join(schedule.models) or "all with a production version"
    views.console.print(f"scheduler: {jobs}; models: {models}")
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
