"""`chimera log export` then `chimera log prune` on both backends (issue 17): old rows leave the database
in batches, they are in the Parquet files first with their features and outcomes, exporting a day twice
neither loses nor doubles a row, and recent rows and other models are untouched. Prune also bounds
shadow_predictions and outcomes (an outcome only once its prediction is gone, and never with --model),
through the two indexes migration 0010 builds (CONCURRENTLY on PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import event, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from chimera.cli import app
from chimera.cli.log import export_rows
from chimera.cli.log_retention import count_rows, log_models, prune_rows
from gateway.records.inserter import Inserter
from registry import Registry
from registry.migrate import current_revision, upgrade
from registry.models import Outcome, Prediction, RequestError, ShadowPrediction
from registry.partitions import OUTCOMES_PARENT, SHADOW_PARENT, day_table, ensure_days
from registry.repository import PredictionRow
from registry.rollouts import insert_rollout_rows
from tests.harness import alembic_downgrade

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
    _outcomes(registry, {old_ids[0]: datetime.now(UTC)})
    with registry.transaction() as s:
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
    assert done == {"predictions": 7, "request_errors": 1, "shadow_predictions": 0, "outcomes": 0,
                    "partitions_dropped": {}, "partition_rows_estimate": 0}  # one model: no drop
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


# --------------------------------------------- shadow scores and outcomes (migration 0010's indexes)
D = timedelta(days=1)


def _at(day: date, hour: int) -> datetime:
    return datetime.combine(day, clock_time(hour), tzinfo=UTC)


def _shadow(registry: Registry, model: str, stamps: dict[str, datetime], version: int = 2) -> None:
    registry.insert_shadow_predictions([PredictionRow(rid, model, version, 0.5, 1.0, created_at=at)
                                        for rid, at in stamps.items()])


def _outcomes(registry: Registry, stamps: dict[str, datetime]) -> None:
    """Outcomes created at the given times (the registry's intake stamps now), each under its prediction's
    day as the intake stores it (the newest prediction with its id), or, with none, its own created_at's
    date (as migration 0012 leaves an outcome whose prediction was gone)."""
    with registry.transaction() as s:
        days = dict(s.execute(select(Prediction.request_id, func.max(Prediction.day))
                              .where(Prediction.request_id.in_(list(stamps))).group_by(Prediction.request_id))
                    .tuples().all())
        s.execute(insert(Outcome), [{"request_id": rid, "value": 1.0, "created_at": at,
                                     "day": days.get(rid, at.date())} for rid, at in stamps.items()])


def _rows(registry: Registry) -> dict[str, set[tuple[str, ...]]]:
    """Every stored row of the four tables prune bounds, by its identity."""
    with registry.session() as s:
        return {"predictions": {(r,) for r in s.scalars(select(Prediction.request_id))},
                "request_errors": {(r,) for r in s.scalars(select(RequestError.request_id))},
                "shadow_predictions": set(s.execute(select(ShadowPrediction.model,
                                                           ShadowPrediction.request_id)).tuples()),
                "outcomes": {(r,) for r in s.scalars(select(Outcome.request_id))}}


def test_prune_bounds_shadow_scores_and_outcomes_whose_prediction_is_gone(registry: Registry) -> None:
    """Without --model, prune deletes old shadow scores (of every model, one that only has shadow rows too)
    and old outcomes whose prediction is no longer stored, whether its prediction went in this run by a
    batch, with a dropped day partition (PostgreSQL) or never existed; an old outcome whose prediction is
    still stored, and every newer row, stays, except on PostgreSQL a newer outcome of a prediction whose
    day is dropped (migration 0012: it goes with its prediction's day, late as it came). The result
    counts exactly what the batches deleted, the dry run counted exactly that beforehand, deleting
    nothing, and the dropped days are listed by both."""
    t = datetime.now(UTC).date()
    ensure_days(registry, t, 8)  # PostgreSQL: m-a and m-b sit in day tables the prune drops whole
    cutoff = _at(t + 5 * D, 12)
    insert_rollout_rows(registry, [{"request_id": rid, "model": "m", "version": 1, "score": 0.5,
                                    "latency_ms": 1.0, "created_at": at} for rid, at in {
        "m-a": _at(t + D, 12), "m-b": _at(t + 2 * D, 12), "m-c": _at(t + 5 * D, 6),  # old
        "m-n": _at(t + 6 * D, 12), "m-n2": _at(t + 6 * D, 13)}.items()])  # new
    _shadow(registry, "m", {"m-a": _at(t + 2 * D, 12), "m-b": _at(t + 5 * D, 11),  # old
                            "m-n": _at(t + 6 * D, 12)})
    _shadow(registry, "s", {"s-1": _at(t + D, 1), "s-2": _at(t + 5 * D, 6), "s-3": _at(t + 7 * D, 1)})
    _outcomes(registry, {
        "m-a": _at(t + 2 * D, 12),   # old, its prediction pruned (PostgreSQL: with its day's table): goes
        "m-c": _at(t + 5 * D, 8),    # old, its prediction pruned by a batch: goes
        "ghost": _at(t + D, 0),      # old, no prediction at all: goes
        "m-n": _at(t + 3 * D, 12),   # OLD, but its prediction is new and stays: kept
        "m-b": _at(t + 6 * D, 0),    # new, its prediction pruned: kept (PostgreSQL: goes with its day)
        "m-n2": _at(t + 6 * D, 14),  # new: kept
    })
    assert log_models(registry) == ["m", "s"]  # "s" has shadow rows only
    before = _rows(registry)

    dry = count_rows(registry, cutoff)

    assert _rows(registry) == before  # the dry run deleted nothing
    batches = 1 if registry.is_postgres else 3  # PostgreSQL: m-a and m-b went with their day tables
    shadow_batches = 2 if registry.is_postgres else 4  # and so did the mirror scores of days t+1 and t+2
    # and the outcomes of those days: m-a's, ghost's (its own day t+1) and the late m-b's
    outcome_batches = 1 if registry.is_postgres else 3
    late = set() if registry.is_postgres else {("m-b",)}

    done = prune_rows(registry, cutoff, batch=2)  # several batches per table

    after = _rows(registry)
    assert after == {"predictions": {("m-n",), ("m-n2",)}, "request_errors": set(),
                     "shadow_predictions": {("m", "m-n"), ("s", "s-3")},
                     "outcomes": {("m-n",), ("m-n2",)} | late}
    gone = {key: len(before[key] - after[key]) for key in before}
    assert gone == {"predictions": 3, "request_errors": 0, "shadow_predictions": 4, "outcomes": 4 - len(late)}
    assert {k: done[k] for k in gone} == {**gone, "predictions": batches,
                                          "shadow_predictions": shadow_batches, "outcomes": outcome_batches}
    assert {k: dry[k] for k in gone} == {k: done[k] for k in gone}
    if registry.is_postgres:  # migrations 0011 and 0012: shadow_predictions and outcomes by day too
        assert {day_table(t + D), day_table(t + 2 * D), day_table(t + D, SHADOW_PARENT),
                day_table(t + 2 * D, SHADOW_PARENT), day_table(t + D, OUTCOMES_PARENT),
                day_table(t + 2 * D, OUTCOMES_PARENT)} <= set(done["partitions_dropped"])
        assert {name for name, _rows in dry["partitions"]} == set(done["partitions_dropped"])
    assert prune_rows(registry, cutoff)["outcomes"] == 0  # the kept old outcome stays kept


def test_prune_of_one_model_prunes_its_shadow_scores_and_keeps_every_outcome(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model m`: m's old shadow scores go, another model's stay, and no outcome is deleted (outcomes
    carry no model), which the printed line says; the dry run counts the same. Without --model the same
    CLI then prunes the other model's old shadow scores and the outcomes left without a prediction."""
    m_old, m_new = _log(registry, "m", [40.0, 1.0], "m")
    n_old, n_new = _log(registry, "n", [40.0, 1.0], "n")
    old, new = datetime.now(UTC) - timedelta(days=40), datetime.now(UTC) - timedelta(days=1)
    _shadow(registry, "m", {m_old: old, m_new: new, "m-x": old})
    _shadow(registry, "n", {n_old: old, n_new: new})
    _outcomes(registry, {m_old: old, n_old: old, m_new: new})
    cutoff = datetime.now(UTC) - timedelta(days=30)
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry.url)
    runner = CliRunner()
    before = _rows(registry)

    assert count_rows(registry, cutoff, model="m") == {
        "predictions": 1, "request_errors": 0, "shadow_predictions": 2, "outcomes": 0, "partitions": []}
    r = runner.invoke(app, ["log", "prune", "--older-than", "30d", "--model", "m", "--dry-run"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "would delete 1 predictions, 0 request errors and 2 shadow scores created before" in said
    assert "outcomes kept (they carry no model: prune without --model prunes them)" in said
    assert _rows(registry) == before
    r = runner.invoke(app, ["log", "prune", "--older-than", "30d", "--model", "m"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "deleted 1 predictions, 0 request errors and 2 shadow scores created before" in said
    assert "outcomes kept" in said

    after = _rows(registry)
    assert before["shadow_predictions"] - after["shadow_predictions"] == {("m", m_old), ("m", "m-x")}
    assert after["outcomes"] == before["outcomes"]  # m_old's outcome too, though its prediction is gone
    assert after["predictions"] == before["predictions"] - {(m_old,)}

    r = runner.invoke(app, ["log", "prune", "--older-than", "30d", "--dry-run"])
    said = " ".join(r.output.split())
    assert "would delete 1 predictions, 0 request errors, 1 shadow scores and 2 outcomes created" in said
    r = runner.invoke(app, ["log", "prune", "--older-than", "30d"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "deleted 1 predictions, 0 request errors, 1 shadow scores and 2 outcomes created before" in said
    assert "outcomes kept" not in said
    assert _rows(registry)["outcomes"] == {(m_new,)}
    assert _rows(registry)["shadow_predictions"] == {("m", m_new), ("n", n_new)}


RETENTION_INDEXES = {"shadow_predictions": ("ix_shadow_predictions_model_created", ["model", "created_at"]),
                     "outcomes": ("ix_outcomes_created", ["created_at"])}


def _retention_indexes(reg: Registry) -> dict[str, list[str]]:
    """The two indexes of migration 0010 present now: name -> columns (PostgreSQL: valid ones only)."""
    found: dict[str, list[str]] = {}
    with reg.engine.connect() as conn:
        insp = inspect(conn)
        for table, (name, _columns) in RETENTION_INDEXES.items():
            for ix in insp.get_indexes(table):
                if ix["name"] == name:
                    found[name] = list(ix["column_names"])
        if reg.is_postgres:
            q = text("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                     "WHERE NOT i.indisvalid")
            for invalid in conn.execute(q).scalars():
                found.pop(invalid, None)
    return found


def test_migration_0010_builds_the_retention_indexes_and_downgrade_drops_them(registry_url: str) -> None:
    """Upgrading a 0009 database builds both indexes (on PostgreSQL with CREATE INDEX CONCURRENTLY, seen
    in the statements sent), downgrading to 0009 drops them. PostgreSQL: an upgrade after a concurrent
    build that failed (it leaves an INVALID index of the same name) drops that and builds it again, and an
    index already built is kept, not an error."""
    reg = Registry(registry_url)
    sent: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        sent.append(" ".join(statement.split()))

    try:
        upgrade(registry_url, reg.engine, revision="0009")
        assert _retention_indexes(reg) == {}
        event.listen(reg.engine, "before_cursor_execute", record)
        upgrade(registry_url, reg.engine, revision="0010")
        event.remove(reg.engine, "before_cursor_execute", record)
        assert current_revision(reg.engine) == "0010"
        assert _retention_indexes(reg) == {name: columns for name, columns in RETENTION_INDEXES.values()}
        creates = [q for q in sent if q.startswith("CREATE INDEX")]
        assert len(creates) == 2
        if reg.is_postgres:
            assert all(q.startswith("CREATE INDEX CONCURRENTLY") for q in creates), creates

        alembic_downgrade(reg, "0009")
        assert current_revision(reg.engine) == "0009"
        assert _retention_indexes(reg) == {}
        if reg.is_postgres:
            # A failed concurrent build of ix_outcomes_created (a UNIQUE one over equal created_at values
            # fails after the catalog entry is made): an INVALID index is left; and the other one built.
            same = datetime.now(UTC)
            _log(reg, "m", [1.0, 1.0], "p")
            with reg.transaction() as s:  # outcomes as 0009 left it: no day column yet (migration 0012)
                s.execute(text("INSERT INTO outcomes (request_id, value, created_at) "
                               "VALUES ('p-0', 1.0, :t), ('p-1', 1.0, :t)"), {"t": same})
            with reg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                with pytest.raises(IntegrityError):
                    conn.execute(text("CREATE UNIQUE INDEX CONCURRENTLY ix_outcomes_created "
                                      "ON outcomes (created_at)"))
                conn.execute(text("CREATE INDEX ix_shadow_predictions_model_created "
                                  "ON shadow_predictions (model, created_at)"))
            assert "ix_outcomes_created" not in _retention_indexes(reg)  # there, but INVALID
        upgrade(registry_url, reg.engine, revision="0010")
        assert current_revision(reg.engine) == "0010"
        assert _retention_indexes(reg) == {name: columns for name, columns in RETENTION_INDEXES.values()}
        with reg.engine.connect() as conn:
            assert not any(ix["unique"] for ix in inspect(conn).get_indexes("outcomes"))
    finally:
        reg.dispose()
