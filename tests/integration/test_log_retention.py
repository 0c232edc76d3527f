"""`chimera log export` then `chimera log prune` on both backends (issue 17): old rows leave the database
in batches, they are in the Parquet files first with their features and outcomes, exporting a day twice
neither loses nor doubles a row, and recent rows and other models are untouched."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, insert, select
from typer.testing import CliRunner

from chimera.cli import app
from chimera.cli.log import export_rows, log_models, prune_rows
from gateway.records.inserter import Inserter
from registry.models import Outcome, Prediction, RequestError

DAY = 86400.0


def _log(registry, model: str, ages_days: list[float], prefix: str) -> list[str]:  # noqa: ANN001
    ins = Inserter(registry)
    now = time.time()
    rows = [(f"{prefix}-{i}", model, 1, f"k{i}", 0.25 * (i % 4), 1.5, ins.timestamp(now - age * DAY),
             f"[{i},0.5,-1.25]", 3, False, None) for i, age in enumerate(ages_days)]
    assert ins.insert(rows) == len(rows)
    return [r[0] for r in rows]


def _count(registry, table, model: str) -> int:  # noqa: ANN001
    with registry.session() as s:
        return int(s.scalar(select(func.count()).select_from(table).where(table.model == model)))


def test_export_then_prune_moves_old_rows_to_parquet(registry, tmp_path: Path) -> None:  # noqa: ANN001
    old_ids = _log(registry, "m", [40.2, 40.1, 35.5, 35.4, 35.3, 31.0, 31.0], "old")
    new_ids = _log(registry, "m", [1.0, 0.5, 0.0], "new")
    _log(registry, "other", [50.0], "oth")
    with registry.transaction() as s:
        s.execute(insert(Outcome), [{"request_id": old_ids[0], "value": 1.0,
                                     "created_at": datetime.now(UTC)}])
        s.execute(insert(RequestError), [{"request_id": "err-old", "model": "m", "version": 1, "error": "x",
                                          "created_at": datetime.now(UTC) - timedelta(days=45)}])
    assert log_models(registry) == ["m", "other"]
    cutoff = datetime.now(UTC) - timedelta(days=30)

    files = export_rows(registry, cutoff, tmp_path / "out", model="m")
    assert sum(n for _p, n in files) == 7
    with registry.session() as s:
        stamps = s.scalars(select(Prediction.created_at).where(Prediction.request_id.in_(old_ids))).all()
    assert sorted(p.name for p, _n in files) == sorted({f"{t:%Y-%m-%d}.parquet" for t in stamps})
    assert all(p.parent.name == "m" for p, _n in files)
    table = pq.read_table(tmp_path / "out" / "m")
    got = {r["request_id"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(old_ids)
    assert got[old_ids[0]]["outcome"] == 1.0 and got[old_ids[1]]["outcome"] is None
    assert got[old_ids[1]]["features"] == [1.0, 0.5, -1.25]
    assert got[old_ids[2]]["created_at"].tzinfo is not None and got[old_ids[2]]["split_revision"] == 3

    done = prune_rows(registry, cutoff, model="m", batch=3)  # several batches
    assert done == {"predictions": 7, "request_errors": 1, "partitions_dropped": {},
                    "partition_rows_estimate": 0}  # one model: no drop
    with registry.session() as s:
        left = set(s.scalars(select(Prediction.request_id).where(Prediction.model == "m")))
    assert left == set(new_ids)
    assert _count(registry, Prediction, "other") == 1  # another model: untouched

    # Rows logged late into an exported (and pruned) day: a second export merges, losing nothing.
    late = _log(registry, "m", [40.15], "late")
    files2 = export_rows(registry, cutoff, tmp_path / "out", model="m")
    assert sum(n for _p, n in files2) == 1
    ids = pq.read_table(tmp_path / "out" / "m").column("request_id").to_pylist()
    assert sorted(ids) == sorted(old_ids + late)
    # And exporting again with nothing new doubles nothing.
    export_rows(registry, cutoff, tmp_path / "out", model="m")
    assert len(pq.read_table(tmp_path / "out" / "m")) == 8


def test_cli_prune_and_export(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    _log(registry, "m", [10.0, 10.0, 0.0], "a")
    _log(registry, "n", [10.0], "b")
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry.url)
    runner = CliRunner()
    r = runner.invoke(app, ["log", "prune", "--older-than", "5d", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would delete 3 predictions" in r.output
    r = runner.invoke(app, ["log", "export", "--older-than", "5d", "--to", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert "exported 3 rows" in r.output
    r = runner.invoke(app, ["log", "prune", "--older-than", "5d"])
    assert r.exit_code == 0, r.output
    assert "deleted 3 predictions" in r.output
    assert _count(registry, Prediction, "m") == 1 and _count(registry, Prediction, "n") == 0
    r = runner.invoke(app, ["log", "prune", "--older-than", "soon"])
    assert r.exit_code == 2 and "--older-than" in r.output
