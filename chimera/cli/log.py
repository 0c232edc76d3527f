"""`chimera log bench|prune|export`: the prediction log as a thing of its own (issue 17).

- bench: the writer's ingest rate on a registry (loadtest.bench_log drives a real
  gateway.records.PredictionLog, built here because loadtest sits below the gateway's floor).
- prune / export: retention and the retraining hand-off (added with those commands)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from chimera.cli import views

log_app = typer.Typer(help="The prediction log: ingest bench, retention, export.", no_args_is_help=True)


@log_app.command("bench")
def bench(
    registry_url: Annotated[
        str | None,
        typer.Option(help="registry to write into (default: a new SQLite file in a temporary directory); "
                     "use a throwaway database: the bench's rows are deleted at the end unless --keep"),
    ] = None,
    rate: Annotated[float, typer.Option(help="offered rows/s; 0: as fast as the writer takes them")] = 0.0,
    duration: Annotated[float, typer.Option(help="measured seconds")] = 60.0,
    warmup: Annotated[float, typer.Option(help="unmeasured seconds before")] = 5.0,
    block: Annotated[int, typer.Option(help="rows per logged record (PredictBatch group); 1: unary")] = 256,
    features: Annotated[int, typer.Option(help="feature width logged with every row; 0: none")] = 32,
    batch_size: Annotated[int, typer.Option(help="the writer's rows per insert")] = 5000,
    max_queue: Annotated[int, typer.Option(help="the writer's queue bound (rows)")] = 100_000,
    keep: Annotated[bool, typer.Option(help="keep the bench's rows")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the result as JSON here")] = None,
) -> None:
    """Prediction-log ingest: rows/s sustained, enqueue-to-commit p99 and RSS (exit 3 when not sustained)."""
    from gateway.records.prediction_log import PredictionLog
    from loadtest.bench_log import MODEL, LogBenchSpec, format_result, run_log_bench
    from registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="chimera-log-bench-"))
    url = registry_url or f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    try:
        reg.upgrade()
        backend = reg.engine.dialect.name
        writer = PredictionLog(reg, tmp / "spill.jsonl", max_queue=max_queue, batch_size=batch_size)
        spec = LogBenchSpec(rate=rate, duration_s=duration, warmup_s=warmup, block=block, features=features)
        views.console.print(f"log bench on {backend} ({views.safe_url(url)}): {duration:.0f} s after "
                            f"{warmup:.0f} s warm-up")
        result = run_log_bench(writer, spec, backend, progress=views.console.print)
        views.console.print(format_result(result), highlight=False, soft_wrap=True)
        if json_path is not None:
            json_path.write_text(json.dumps(result.as_dict(), indent=2))
        if registry_url and not keep:
            _delete_model_rows(reg, MODEL)
    finally:
        reg.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(0 if result.sustained else 3)


def _delete_model_rows(reg: object, model: str) -> None:
    """Remove the bench's rows (one statement: the bench database is meant to be throwaway)."""
    from sqlalchemy import delete

    from registry import Registry
    from registry.models import Prediction

    assert isinstance(reg, Registry)
    with reg.transaction() as s:
        s.execute(delete(Prediction).where(Prediction.model == model))
