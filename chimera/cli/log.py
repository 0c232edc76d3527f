"""`chimera log bench|prune|export`: the prediction log as a thing of its own (issue 17).

- bench: the writer's ingest rate on a registry (loadtest.bench_log drives a real
  gateway.records.PredictionLog, built here because loadtest sits below the gateway's floor).
- prune: retention of predictions, request_errors, shadow_predictions and outcomes, in batches of
  `--batch` rows, each batch its own short transaction; on PostgreSQL whole day partitions first
  (chimera.cli.log_retention says which rows of which table, and the outcome and --model rules).
  --dry-run lists those partitions and counts exactly the rows the batches would delete.
  Pruned rows can no longer be recomputed by `chimera analyze`: export first.
- export: the old rows as Parquet for retraining and archive, one file per model and UTC day
  (DIR/<model>/<YYYY-MM-DD>.parquet), every column of the log plus the outcome joined by request id
  (NaN/None when none arrived), features as list<float32>. Exporting a day again merges with its file
  (union by request id), so "export, then prune" can run repeatedly with any cutoff and no row is
  lost or doubled. Files are written to a temporary name and renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from chimera.cli import views
from chimera.cli.log_retention import count_rows, log_models, prune_rows
from chimera.cli.shared import load_settings, open_registry

if TYPE_CHECKING:
    from registry import Registry

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
    answered_at: Annotated[str | None, typer.Option(
        help="HH:MM (UTC): time the rows' answers from this time today on, e.g. 23:50 for the half hour "
             "around midnight, where PostgreSQL's writer also looks each id up on the neighbouring day "
             "(default: the real clock)")] = None,
) -> None:
    """Prediction-log ingest: rows/s sustained, enqueue-to-commit p99 and RSS (exit 3 when not sustained)."""
    from gateway.records.prediction_log import PredictionLog
    from loadtest.bench_log import MODEL, LogBenchSpec, format_result, run_log_bench
    from registry import Registry

    clock = _answer_clock(answered_at)
    tmp = Path(tempfile.mkdtemp(prefix="chimera-log-bench-"))
    url = registry_url or f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    try:
        reg.upgrade()
        backend = reg.engine.dialect.name
        writer = PredictionLog(reg, tmp / "spill.jsonl", max_queue=max_queue, batch_size=batch_size,
                               clock=clock)
        spec = LogBenchSpec(rate=rate, duration_s=duration, warmup_s=warmup, block=block, features=features)
        when = f", answers timed from {answered_at} UTC today" if answered_at else ""
        views.console.print(f"log bench on {backend} ({views.safe_url(url)}): {duration:.0f} s after "
                            f"{warmup:.0f} s warm-up{when}")
        result = run_log_bench(writer, spec, backend, progress=views.console.print)
        views.console.print(format_result(result), highlight=False, soft_wrap=True)
        if json_path is not None:
            json_path.write_text(json.dumps({**result.as_dict(), "answered_at": answered_at}, indent=2))
        if registry_url and not keep:
            _delete_model_rows(reg, MODEL)
    finally:
        reg.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(0 if result.sustained else 3)


def _answer_clock(answered_at: str | None) -> Callable[[], float]:
    """The writer's answer clock: the real one, or one that reads `answered_at` (HH:MM, UTC) today at
    the start and runs at the real clock's pace from there."""
    if answered_at is None:
        return time.time
    try:
        at = datetime.strptime(answered_at, "%H:%M").time()
    except ValueError:
        raise typer.BadParameter(f"{answered_at!r} is not HH:MM", param_hint="--answered-at") from None
    offset = datetime.combine(datetime.now(UTC).date(), at, UTC).timestamp() - time.time()
    return lambda: time.time() + offset


def _delete_model_rows(reg: Registry, model: str) -> None:
    """Remove the bench's rows (in batches, as prune does)."""
    prune_rows(reg, datetime.now(UTC) + timedelta(days=1), model=model)


OlderThan = Annotated[str, typer.Option("--older-than", help="age, e.g. 30d, 12h, 2w (rows created before "
                                         "now minus this)")]
ModelOpt = Annotated[str | None, typer.Option(help="only this model (default: every model in the log)")]


@log_app.command("prune")
def prune(older_than: OlderThan, model: ModelOpt = None,
          batch: Annotated[int, typer.Option(help="rows deleted per transaction")] = 10_000,
          dry_run: Annotated[bool, typer.Option(help="delete nothing: list the whole day partitions that "
                                                "would be dropped (estimated rows) and count the rows the "
                                                "batches would delete")] = False) -> None:
    """Delete prediction-log rows, request errors, shadow scores and outcomes (without --model) older
    than --older-than: on PostgreSQL, whole days' partitions are dropped (without --model), the rest is
    deleted in batches."""
    from registry.errors import PartitionError

    cutoff = _cutoff(older_than)
    reg = open_registry(load_settings())
    try:
        if dry_run:
            counts = count_rows(reg, cutoff, model=model)
            views.console.print(f"would delete {_rows_said(counts, model)} created before "
                                f"{cutoff.isoformat(timespec='seconds')} in batches"
                                + _partitions_said("drop", dict(counts["partitions"])) + _kept_said(model))
            return
        try:
            done = prune_rows(reg, cutoff, model=model, batch=batch)
        except PartitionError as exc:
            views.fail(f"{exc}; nothing else was deleted: run prune again")
    finally:
        reg.dispose()
    views.console.print(f"deleted {_rows_said(done, model)} created before "
                        f"{cutoff.isoformat(timespec='seconds')}"
                        + _partitions_said("dropped", done["partitions_dropped"]) + _kept_said(model))


def _rows_said(rows: dict[str, Any], model: str | None) -> str:
    """"N predictions, M request errors, S shadow scores and O outcomes" (without outcomes for a model)."""
    said = [f"{rows['predictions']:,} predictions", f"{rows['request_errors']:,} request errors",
            f"{rows['shadow_predictions']:,} shadow scores"]
    if model is None:
        said.append(f"{rows['outcomes']:,} outcomes")
    return ", ".join(said[:-1]) + " and " + said[-1]


def _kept_said(model: str | None) -> str:
    """With --model, that outcomes were left (they carry no model); "" without."""
    return "" if model is None else "; outcomes kept (they carry no model: prune without --model prunes them)"


def _partitions_said(verb: str, parts: dict[str, int | None]) -> str:
    """" and dropped 2 whole day partitions (~M rows by the planner's estimate: a ~x, b ~y)"; a partition
    whose table was never analyzed (no estimate) is named apart, not counted as 0; "" for none."""
    if not parts:
        return ""
    known = {name: rows for name, rows in parts.items() if rows is not None}
    said = []
    if known:
        said.append(f"~{sum(known.values()):,} rows by the planner's estimate: "
                    + ", ".join(f"{name} ~{rows:,}" for name, rows in known.items()))
    if len(known) < len(parts):
        said.append("rows not estimated (table never analyzed): "
                    + ", ".join(name for name, rows in parts.items() if rows is None))
    plural = "s" if len(parts) != 1 else ""
    return f" and {verb} {len(parts)} whole day partition{plural} ({'; '.join(said)})"


@log_app.command("export")
def export(older_than: OlderThan,
           to: Annotated[Path, typer.Option("--to", help="directory for <model>/<YYYY-MM-DD>.parquet")],
           model: ModelOpt = None) -> None:
    """Write prediction-log rows older than --older-than to Parquet, one file per model and UTC day."""
    cutoff = _cutoff(older_than)
    reg = open_registry(load_settings())
    try:
        files = export_rows(reg, cutoff, to, model=model)
    finally:
        reg.dispose()
    total = sum(n for _p, n in files)
    views.console.print(f"exported {total:,} rows created before {cutoff.isoformat(timespec='seconds')} "
                        f"into {len(files)} file(s) under {to}")


def _cutoff(older_than: str) -> datetime:
    from training.feedback import parse_window

    try:
        return datetime.now(UTC) - parse_window(older_than)
    except ValueError as exc:
        views.fail(f"--older-than: {exc}", 2)


# ------------------------------------------------------------------ export (no CLI here)
_SCHEMA_FIELDS = (("request_id", "string"), ("model", "string"), ("version", "int32"),
                  ("routing_key", "string"), ("score", "float64"), ("latency_ms", "float64"),
                  ("created_at", "timestamp"), ("features", "list<float32>"), ("split_revision", "int64"),
                  ("pinned", "bool"), ("failed_version", "int32"), ("outcome", "float64"),
                  ("outcome_at", "timestamp"))


def _arrow_schema() -> Any:
    import pyarrow as pa

    types = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
             "bool": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC"),
             "list<float32>": pa.list_(pa.float32())}
    return pa.schema([(name, types[t]) for name, t in _SCHEMA_FIELDS])


def export_rows(reg: Registry, cutoff: datetime, directory: Path, *, model: str | None = None,
                rows_per_group: int = 100_000) -> list[tuple[Path, int]]:
    """Write every row created before `cutoff` to DIR/<model>/<day>.parquet (see the module docstring).
    Returns (file, rows added) per file that gained rows."""
    written: list[tuple[Path, int]] = []
    for m in [model] if model else log_models(reg):
        for day in _days(reg, m, cutoff):
            until = min(day + timedelta(days=1), cutoff)
            path = directory / _safe_name(m) / f"{day:%Y-%m-%d}.parquet"
            added = _export_day(reg, m, day, until, path, rows_per_group)
            if added:
                written.append((path, added))
    return written


def _safe_name(model: str) -> str:
    """A model name as one path component (names are validated at the door, but never trust a path)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model).lstrip(".") or "_"


def _days(reg: Registry, model: str, cutoff: datetime) -> Iterator[datetime]:
    from sqlalchemy import func, select

    from registry.models import Prediction, as_utc, logged_between

    with reg.session() as s:
        first = s.scalar(select(func.min(Prediction.created_at)).where(
            Prediction.model == model, *logged_between(reg.is_postgres, before=cutoff)))
    if first is None:
        return
    day = as_utc(first).replace(hour=0, minute=0, second=0, microsecond=0)
    while day < cutoff:
        yield day
        day += timedelta(days=1)


def _export_day(reg: Registry, model: str, since: datetime, until: datetime, path: Path,
                rows_per_group: int) -> int:
    """Rows of one model in [since, until) merged into `path`; returns the rows the file gained."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlalchemy import select

    from registry.models import Outcome, Prediction, logged_between, outcome_of

    schema = _arrow_schema()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    known: set[str] = set()
    added = 0
    cols = [Prediction.request_id, Prediction.model, Prediction.version, Prediction.routing_key,
            Prediction.score, Prediction.latency_ms, Prediction.created_at, Prediction.features,
            Prediction.split_revision, Prediction.pinned, Prediction.failed_version, Outcome.value,
            Outcome.created_at]
    q = (select(*cols).outerjoin(Outcome, outcome_of(reg.is_postgres, since, until))
         .where(Prediction.model == model, *logged_between(reg.is_postgres, since, before=until))
         .order_by(Prediction.created_at, Prediction.id))
    with pq.ParquetWriter(tmp, schema) as writer:
        if path.exists():  # a day exported before (and maybe pruned since): keep every row it has
            old = pq.read_table(path, schema=schema)
            known.update(old.column("request_id").to_pylist())
            writer.write_table(old)
        with reg.session() as s:
            result = s.execute(q.execution_options(stream_results=True, yield_per=rows_per_group))
            for part in result.partitions():
                rows = [r for r in part if r[0] not in known]
                if not rows:
                    continue
                columns = list(zip(*rows, strict=True))
                arrays = [pa.array(_column(columns[i], f.name), type=f.type) for i, f in enumerate(schema)]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                added += len(rows)
    if added or path.exists():
        os.replace(tmp, path)
    else:  # a day with no rows: no file
        tmp.unlink(missing_ok=True)
    return added


def _column(values: tuple[Any, ...], name: str) -> list[Any]:
    from registry.models import as_utc

    if name in ("created_at", "outcome_at"):
        return [None if v is None else as_utc(v) for v in values]
    return list(values)
