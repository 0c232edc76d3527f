"""The prediction log's day partitions (registry.partitions, migration 0009) as a user meets them, on both
backends: on PostgreSQL the writer keeps today and the next two days as tables and rows land in their
day's table; `chimera log prune` drops whole old days (reporting the planner's estimate of their rows,
never a count that scans them), deletes the cutoff's own day and the DEFAULT partition's old rows one by
one and counts those exactly, and its dry run lists the days it would drop; a held lock or a refused day
is a clear error, never a stuck writer. On SQLite (one plain table) the same calls do nothing and the
same prune leaves the same rows."""

from __future__ import annotations

import logging
import time as clock
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from chimera.cli import app
from chimera.cli import log as log_cli
from chimera.cli.log_retention import prune_rows
from gateway.records.prediction_log import PredictionLog
from registry import Registry, partitions
from registry.errors import PartitionError
from registry.models import Prediction
from registry.partitions import (
    ERRORS_PARENT,
    OUTCOMES_PARENT,
    PARENT,
    PARENTS,
    SHADOW_PARENT,
    day_table,
    drop_partitions_before,
    ensure_days,
    old_partitions,
    partitions_of,
)
from registry.repository import PredictionRow
from registry.rollouts import insert_rollout_rows
from tests.harness import wait_for

DAY = timedelta(days=1)


def _today() -> date:
    return datetime.now(UTC).date()


def _at(day: date, hour: int) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=UTC)


def _insert(registry: Registry, stamps: dict[str, datetime], model: str = "m", **extra: object) -> None:
    insert_rollout_rows(registry, [{"request_id": rid, "model": model, "version": 1, "score": 0.5,
                                    "latency_ms": 1.0, "created_at": at, **extra}
                                   for rid, at in stamps.items()])


def _ids(registry: Registry) -> set[str]:
    with registry.session() as s:
        return set(s.scalars(select(Prediction.request_id)))


def _tables(registry: Registry, parent: str = PARENT) -> dict[str, str]:
    """PostgreSQL: the partition each row of `parent` is stored in, by request id."""
    with registry.session() as s:
        rows = s.execute(text(f"SELECT request_id, tableoid::regclass::text FROM {parent}"))
        return dict(rows.tuples().all())


def _covering(registry: Registry, day: date, parent: str = PARENT) -> str | None:
    return next((p.name for p in partitions_of(registry, parent) if p.covers(day)), None)


def _old(registry: Registry, before: date) -> list[str]:
    """The partitions of every table a prune with a cutoff on `before` drops, as it names them."""
    return [p.name for parent in PARENTS for p in partitions_of(registry, parent)
            if not p.is_default and p.upper is not None and p.upper <= before]


@contextmanager
def _reader(registry: Registry) -> Iterator[None]:
    """Another session reading predictions (a long rollout look or export): it holds ACCESS SHARE, which
    every CREATE ... PARTITION OF and DETACH must wait for."""
    with registry.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(text("LOCK TABLE predictions IN ACCESS SHARE MODE"))
        try:
            yield
        finally:
            tx.rollback()


def test_upkeep_makes_the_next_days_and_rows_land_in_their_day(registry: Registry) -> None:
    today = _today()
    if not registry.is_postgres:  # one plain table: nothing to keep
        assert partitions_of(registry) == []
        assert ensure_days(registry, today, 5) == [] and old_partitions(registry, today + 30 * DAY) == []
        assert drop_partitions_before(registry, today + 30 * DAY) == {}
        _insert(registry, {f"r{i}": _at(today + i * DAY, 12) for i in range(5)})
        assert _ids(registry) == {f"r{i}" for i in range(5)}
        return
    for parent in PARENTS:  # migrations 0009, 0011 and 0012
        parts = partitions_of(registry, parent)
        assert [p.name for p in parts if p.is_default] == [f"{parent}_default"]
        assert parts[0].lower is None and parts[0].name.startswith(f"{parent}_upto_")
    ensure_days(registry, today, 3)  # what the writer does at start (the migrations made them already)
    assert all(_covering(registry, today + i * DAY, parent) for i in range(3) for parent in PARENTS)
    days = [today + i * DAY for i in range(5)]
    missing = {parent: [d for d in days if _covering(registry, d, parent) is None] for parent in PARENTS}
    assert all(len(days) >= 2 for days in missing.values())  # the migrations made their day + 2 at most
    assert ensure_days(registry, today, 5) == [day_table(d, parent) for parent in PARENTS
                                               for d in missing[parent]]
    assert ensure_days(registry, today, 5) == []  # made once
    _insert(registry, {f"r{i}": _at(today + i * DAY, 12) for i in range(5)})
    registry.insert_shadow_predictions([PredictionRow(f"r{i}", "m", 2, 0.5, 1.0,
                                                      created_at=_at(today + i * DAY, 12)) for i in range(5)])
    insert_rollout_rows(registry, [], [{"request_id": f"r{i}", "model": "m", "version": 1, "error": "x",
                                        "created_at": _at(today + i * DAY, 12)} for i in range(5)])
    # An outcome, stored now, lands in the day of the prediction it reports on (migration 0012).
    assert registry.record_outcomes([(f"r{i}", 1.0) for i in range(5)]) == [None] * 5
    for parent in PARENTS:
        stored = _tables(registry, parent)
        for i in range(5):
            assert stored[f"r{i}"] == _covering(registry, today + i * DAY, parent) != f"{parent}_default"
        for d in missing[parent]:
            assert day_table(d, parent) in stored.values()


def test_a_day_whose_rows_are_in_default_is_reported_and_the_others_made(registry: Registry) -> None:
    later = _today() + 20 * DAY
    _insert(registry, {"stray": _at(later, 9)})  # no table for that day yet: it lands in DEFAULT
    if not registry.is_postgres:
        assert ensure_days(registry, later - DAY, 3) == []
        return
    assert _tables(registry)["stray"] == "predictions_default"
    with pytest.raises(PartitionError) as err:
        ensure_days(registry, later - DAY, 3)
    assert str(later) in str(err.value) and "predictions_default holds rows" in str(err.value)
    others = (SHADOW_PARENT, ERRORS_PARENT, OUTCOMES_PARENT)  # DEFAULT partitions empty: three days made
    assert err.value.done == [day_table(later - DAY), day_table(later + DAY),
                              *(day_table(later + i * DAY, parent) for parent in others for i in (-1, 0, 1))]
    assert _covering(registry, later) is None and _tables(registry)["stray"] == "predictions_default"


def test_a_held_lock_gives_up_quickly_with_a_clear_error(registry: Registry) -> None:
    later = _today() + 40 * DAY
    if not registry.is_postgres:
        assert ensure_days(registry, later, 2, lock_timeout_s=0.3) == []
        return
    before = partitions_of(registry)
    with _reader(registry):
        t0 = clock.monotonic()
        held = "no lock on predictions or predictions_default within 0.3 s"
        with pytest.raises(PartitionError, match=held) as err:
            ensure_days(registry, later, 2, lock_timeout_s=0.3)
        assert clock.monotonic() - t0 < 2.0 and err.value.done == []  # the second day was not tried
        with pytest.raises(PartitionError, match="not dropped") as err:
            drop_partitions_before(registry, _today() + 3 * DAY, lock_timeout_s=0.3)
        assert err.value.done == []
    assert partitions_of(registry) == before
    assert ensure_days(registry, later, 2) == [day_table(later + i * DAY, parent)
                                               for parent in PARENTS for i in (0, 1)]


def _shape(registry: Registry, table: str) -> dict[str, list[tuple[object, ...]]]:
    """What a partition is made of, with its own name taken out: indexes, constraints, columns."""
    with registry.engine.connect() as conn:
        def rows(sql: str) -> list[tuple[object, ...]]:
            return sorted(tuple(str(v).replace(table, "T") for v in r)
                          for r in conn.execute(text(sql), {"t": table}))
        return {
            "indexes": rows("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"),
            "constraints": rows("SELECT conname, pg_get_constraintdef(oid), conislocal, coninhcount "
                                "FROM pg_constraint WHERE conrelid = to_regclass(:t)"),
            "columns": rows("SELECT attname, attnum, atttypid, attnotnull, attstorage, attcompression, "
                            "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
                            "ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                            "WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0 AND NOT a.attisdropped"),
        }


def _waiting_for(registry: Registry, table: str) -> bool:
    with registry.engine.connect() as conn:
        return bool(conn.scalar(text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted "
            "AND c.relname = :t "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"t": table}))


def test_a_day_is_made_beside_readers_and_inserts_not_in_front_of_them(registry: Registry) -> None:
    """A day's table is made by CREATE (LIKE) + ATTACH, which takes SHARE UPDATE EXCLUSIVE on predictions
    (registry.partitions says why). A session reading today's table (what a rollout look holds) no longer
    delays it: it is made at once. A session reading predictions_default still makes it wait, but the
    log's inserts of today's rows go on meanwhile: under CREATE ... PARTITION OF (ACCESS EXCLUSIVE on
    predictions while it waited for predictions_default) an insert queued for the whole wait, and this
    test's insert, bounded to 0.5 s, failed. The table made has the same indexes, keys, CHECK and columns
    as the days migration 0009 made with CREATE ... PARTITION OF."""
    import threading

    today = _today()
    later = today + 60 * DAY
    if not registry.is_postgres:
        assert ensure_days(registry, later, 2, lock_timeout_s=0.5) == []
        return
    _insert(registry, {"seen": _at(today, 0)})
    with registry.engine.connect() as look:  # reads one day: holds predictions and today's table
        tx = look.begin()
        assert look.scalar(text("SELECT count(*) FROM predictions WHERE day = :d"), {"d": today}) >= 1
        assert ensure_days(registry, later, 1, lock_timeout_s=0.5) == [day_table(later, p) for p in PARENTS]
        tx.rollback()
    # The same table as CREATE ... PARTITION OF makes (as migration 0009 did for its days).
    reference = later + 30 * DAY
    with registry.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {day_table(reference)} PARTITION OF predictions "
                          f"FOR VALUES FROM ('{reference}') TO ('{reference + DAY}')"))
    assert _shape(registry, day_table(later)) == _shape(registry, day_table(reference))

    errors: list[BaseException] = []

    def make() -> None:
        try:
            ensure_days(registry, later + DAY, 1, lock_timeout_s=3.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with registry.engine.connect() as reader, registry.engine.connect() as writer:
        tx = reader.begin()
        reader.execute(text("LOCK TABLE predictions_default IN ACCESS SHARE MODE"))  # a read of DEFAULT
        maker = threading.Thread(target=make)
        maker.start()
        wait_for(lambda: _waiting_for(registry, "predictions_default"), 10, "the ATTACH to wait")
        with writer.begin():
            writer.execute(text("SET LOCAL lock_timeout = '500ms'"))
            writer.execute(text(
                "INSERT INTO predictions (request_id, model, version, routing_key, score, latency_ms, "
                "created_at, pinned, day) VALUES ('during', 'm', 1, '', 0.5, 1.0, :at, false, :d)"),
                {"at": _at(today, 1), "d": today})
        tx.rollback()
        maker.join(10)
    assert not errors, errors  # the reader let go within the 3 s: the day was made after it
    assert _tables(registry)["during"] == _covering(registry, today)
    assert _covering(registry, later + DAY) == day_table(later + DAY)


def test_prune_drops_whole_old_days_and_deletes_the_rest_by_rows(registry: Registry) -> None:
    t = _today()
    ensure_days(registry, t, 4)  # tables up to t + 3
    ensure_days(registry, t + 6 * DAY, 3)  # t + 6 .. t + 8; t + 4 and t + 5 are left to DEFAULT
    _insert(registry, {"a": _at(t - 3 * DAY, 12), "b": _at(t, 1), "c": _at(t + DAY, 12),
                       "d": _at(t + 2 * DAY, 12), "e": _at(t + 4 * DAY, 10), "f": _at(t + 5 * DAY, 20),
                       "k": _at(t + 6 * DAY, 0), "h": _at(t + 7 * DAY, 6), "i": _at(t + 7 * DAY, 18),
                       "j": _at(t + 8 * DAY, 12), "g": _at(t + 30 * DAY, 12)})
    _insert(registry, {"n3": _at(t + 3 * DAY, 23)}, model="n")  # another model: its old days go too
    insert_rollout_rows(registry, [], [{"request_id": "err", "model": "m", "version": 1, "error": "x",
                                        "created_at": _at(t - DAY, 12)}])
    cutoff = _at(t + 7 * DAY, 12)
    if registry.is_postgres:
        in_default = {rid for rid, table in _tables(registry).items() if table == "predictions_default"}
        assert in_default == {"e", "f", "g"}
        old = [p.name for p in partitions_of(registry)
               if not p.is_default and p.upper is not None and p.upper <= cutoff.date()]
        assert old[0].startswith("predictions_upto_") and day_table(t + 6 * DAY) in old and len(old) >= 4

        old = _old(registry, cutoff.date())  # and shadow_predictions' (migration 0011)

    done = prune_rows(registry, cutoff, batch=2)

    assert _ids(registry) == {"i", "j", "g"}  # the cutoff's day after 12:00, later days, DEFAULT's future
    assert done["request_errors"] == (0 if registry.is_postgres else 1)  # PostgreSQL: with its day's table
    if not registry.is_postgres:
        assert done["predictions"] == 9 and done["partitions_dropped"] == {}
        return
    # The batches deleted e, f (DEFAULT) and h (the cutoff's day); the other six went with their tables.
    assert done["predictions"] == 3 and list(done["partitions_dropped"]) == old
    left = [p.name for p in partitions_of(registry)]
    assert left == [day_table(t + 7 * DAY), day_table(t + 8 * DAY), "predictions_default"]
    assert prune_rows(registry, cutoff) == {"predictions": 0, "request_errors": 0, "shadow_predictions": 0,
                                            "outcomes": 0, "partitions_dropped": {},
                                            "partition_rows_estimate": 0}
    _insert(registry, {"after": _at(t + 8 * DAY, 1)})  # the first partition gone, the log still takes rows
    assert _tables(registry)["after"] == day_table(t + 8 * DAY)


def test_a_day_made_meanwhile_by_another_writer_counts_as_made(registry: Registry,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    later = _today() + 50 * DAY
    if not registry.is_postgres:
        assert ensure_days(registry, later, 1) == []
        return
    read = partitions._partitions
    reads: list[int] = []

    def then_another_gateway_makes_it(conn: Connection, parent: str) -> list[partitions.Partition] | None:
        parts = read(conn, parent)
        reads.append(1)
        if len(reads) == 1:  # right after the first read, before our CREATE
            conn.execute(text(f"CREATE TABLE {day_table(later)} PARTITION OF predictions "
                              f"FOR VALUES FROM ('{later}') TO ('{later + DAY}')"))
        return parts

    monkeypatch.setattr(partitions, "_partitions", then_another_gateway_makes_it)
    assert ensure_days(registry, later, 2, parents=[PARENT]) == [day_table(later + DAY)]  # only ours named
    assert len(reads) == 2  # the CREATE found the name taken and read the partitions again
    monkeypatch.undo()
    assert _covering(registry, later) == day_table(later)


def test_prune_of_one_model_drops_no_partition(registry: Registry) -> None:
    t = _today()
    _insert(registry, {"m-old": _at(t - 2 * DAY, 12), "m-new": _at(t + 2 * DAY, 12)})
    _insert(registry, {"n-old": _at(t - 2 * DAY, 12)}, model="n")
    before = partitions_of(registry)
    done = prune_rows(registry, _at(t + 5 * DAY, 0), model="m")
    assert done == {"predictions": 2, "request_errors": 0, "shadow_predictions": 0, "outcomes": 0,
                    "partitions_dropped": {}, "partition_rows_estimate": 0}
    assert _ids(registry) == {"n-old"} and partitions_of(registry) == before


def test_postgres_refuses_a_row_whose_day_is_not_its_created_at_s(registry: Registry) -> None:
    """Dropping a whole partition whose upper bound is at or before the cutoff's day is right only if every
    row in it was created before that day: migration 0009's CHECK keeps day = created_at's UTC date for
    whatever writes the row (SQLite, one table pruned by created_at, has no such rule)."""
    if not registry.is_postgres:
        pytest.skip("the partitions' CHECK is PostgreSQL's")
    t = _today()
    with pytest.raises(IntegrityError, match="ck_predictions_day"):
        _insert(registry, {"future": _at(t + 20 * DAY, 12)}, day=t)
    assert _ids(registry) == set()


def test_the_log_writer_keeps_the_days_and_writes_through_a_failed_attempt(
        registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = _today()
    if registry.is_postgres:  # as if the day after tomorrow had never been made
        with registry.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {day_table(t + 2 * DAY)}"))
        assert _covering(registry, t + 2 * DAY) is None
    log = PredictionLog(registry, tmp_path / "p.spill", flush_interval_s=0.05)
    log.start()
    try:
        log.log_one("w1", "m", 1, "", 0.5, 1.0)
        assert log.flush()
        if registry.is_postgres:  # made in the writer's first round
            wait_for(lambda: _covering(registry, t + 2 * DAY) == day_table(t + 2 * DAY), 10, "the day")
    finally:
        log.stop()
    assert log.stats.partition_failures == 0 and _ids(registry) == {"w1"}
    if not registry.is_postgres:
        return

    with registry.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {day_table(t + 2 * DAY)}"))
    log = PredictionLog(registry, tmp_path / "q.spill", flush_interval_s=0.05)
    log.partition_lock_timeout_s = 0.3
    log.partition_retry_s = 0.5
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.records.prediction_log"), _reader(registry):
            log.start()
            wait_for(lambda: log.stats.partition_failures >= 1, 10, "a failed upkeep attempt")
            t0 = clock.monotonic()
            log.log_many([f"x{i}" for i in range(100)], "m", 1, [""] * 100, [0.5] * 100, 1.0)
            assert log.flush(10)
            assert clock.monotonic() - t0 < 3.0  # an attempt holds rows up by its lock timeout at most
            assert len(_ids(registry)) == 101 and log.stats.spilled == 0
        assert any("partition upkeep failed" in r.getMessage() and "no lock on predictions" in r.getMessage()
                   for r in caplog.records)
        # The reader is gone: the next check makes the day.
        wait_for(lambda: _covering(registry, t + 2 * DAY) == day_table(t + 2 * DAY), 10, "the retried day")
    finally:
        log.stop()


def test_the_writer_makes_the_days_before_it_replays_its_spill(registry: Registry, tmp_path: Path) -> None:
    """After an outage the gateway starts with spilled rows; a row of a day whose table is missing would
    land in DEFAULT if replayed first, and PostgreSQL would then refuse that day's table for good."""
    t = _today()
    if registry.is_postgres:
        with registry.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {day_table(t + 2 * DAY)}"))
    log = PredictionLog(registry, tmp_path / "p.spill", flush_interval_s=0.05, replay_interval_s=0.1)
    ts = log._inserter.timestamp(_at(t + 2 * DAY, 12).timestamp())
    log._spill([("spilled", "m", 1, "", 0.5, 1.0, ts, None, None, False, None)])
    assert log.has_spill
    log.start()
    try:
        wait_for(lambda: not log.has_spill and log.stats.replayed >= 1, 10, "the replay")
    finally:
        log.stop()
    assert log.stats.partition_failures == 0 and _ids(registry) == {"spilled"}
    if registry.is_postgres:
        assert _tables(registry)["spilled"] == day_table(t + 2 * DAY)


def test_cli_prune_reports_the_partitions_it_dropped(registry: Registry,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    t = _today()
    ensure_days(registry, t, 4)
    _insert(registry, {"a": _at(t - DAY, 12), "b": _at(t + 2 * DAY, 12), "c": _at(t + 5 * DAY, 12)})
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry.url)
    monkeypatch.setattr(log_cli, "_cutoff", lambda _text: _at(t + 3 * DAY, 12))
    runner = CliRunner()
    if registry.is_postgres:
        with _reader(registry):
            r = runner.invoke(app, ["log", "prune", "--older-than", "1d"])
        said = " ".join(r.output.split())  # the console wraps long lines
        assert r.exit_code == 1 and "not dropped" in said and "run prune again" in said, r.output
        assert _ids(registry) == {"a", "b", "c"}
    r = runner.invoke(app, ["log", "prune", "--older-than", "1d"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    # PostgreSQL: a and b went with their day's tables (dropped, not deleted row by row).
    assert f"deleted {0 if registry.is_postgres else 2} predictions" in said
    assert ("whole day partitions" in said) == registry.is_postgres
    if registry.is_postgres:
        assert day_table(t + 2 * DAY) in said
    assert _ids(registry) == {"c"}


def _analyze(registry: Registry, name: str) -> None:
    with registry.engine.begin() as conn:
        conn.execute(text(f"ANALYZE {name}"))


def _old_days_with_rows(registry: Registry) -> tuple[date, dict[str, int]]:
    """Tables for t + 10 and t + 11 (t: today) with 5 and 3 rows, one row of t + 12 (no table: DEFAULT on
    PostgreSQL) and one of t + 14; the day after: a cutoff that drops the first two days' tables. Returns
    (t, rows by request id prefix)."""
    t = _today()
    ensure_days(registry, t + 10 * DAY, 2)
    _insert(registry, {f"a{i}": _at(t + 10 * DAY, i) for i in range(5)})
    _insert(registry, {f"b{i}": _at(t + 11 * DAY, i) for i in range(3)})
    _insert(registry, {"c0": _at(t + 12 * DAY, 1), "d0": _at(t + 14 * DAY, 1)})
    return t, {"a": 5, "b": 3, "c": 1, "d": 1}


def test_prune_reports_the_planners_estimate_of_each_dropped_day_and_none_when_never_analyzed(
        registry: Registry) -> None:
    """After ANALYZE of a small table pg_class.reltuples is its exact row count, so the estimate of the
    analyzed day must be 5; the other day's table was never analyzed (a few rows: autovacuum leaves it
    alone), so its estimate is unknown: None, not -1 and not 0. "predictions" counts only the row the
    batches deleted (c0, in DEFAULT on PostgreSQL)."""
    t, _rows = _old_days_with_rows(registry)
    cutoff = _at(t + 12 * DAY, 12)
    if registry.is_postgres:
        _analyze(registry, day_table(t + 10 * DAY))
        listed = {p.name: rows for _parent, p, rows in old_partitions(registry, cutoff.date())}
        assert listed[day_table(t + 10 * DAY)] == 5 and listed[day_table(t + 11 * DAY)] is None
        assert len(_ids(registry)) == 10  # listing drops nothing

    done = prune_rows(registry, cutoff)

    assert _ids(registry) == {"d0"}
    if not registry.is_postgres:
        assert done == {"predictions": 9, "request_errors": 0, "shadow_predictions": 0, "outcomes": 0,
                        "partitions_dropped": {}, "partition_rows_estimate": 0}
        return
    dropped = done["partitions_dropped"]
    assert list(dropped) == list(listed)  # the dry run's list is the drop's
    assert dropped[day_table(t + 10 * DAY)] == 5 and dropped[day_table(t + 11 * DAY)] is None
    assert done["partition_rows_estimate"] == sum(n for n in dropped.values() if n is not None) >= 5
    assert done["predictions"] == 1 and done["request_errors"] == 0


def test_dropping_and_listing_old_days_send_no_statement_that_reads_their_rows(registry: Registry) -> None:
    """The old report counted each partition before dropping it (`SELECT count(*) FROM predictions_YYYYMMDD`,
    a scan of a whole day, which could outlast CHIMERA_DB_QUERY_TIMEOUT_S). Every statement the engine
    sends while listing and dropping is recorded here: the day's table is named only by its DETACH and
    DROP, and its estimate is one catalog read with the name bound as a value. A client-side proof (what
    was sent): PostgreSQL keeps no per-statement record of a table that no longer exists, and any lock
    that would stop a reader of the partition stops its DETACH too."""
    t, _rows = _old_days_with_rows(registry)
    if not registry.is_postgres:
        assert old_partitions(registry, t + 12 * DAY) == [] and drop_partitions_before(registry, t) == {}
        return
    name = day_table(t + 10 * DAY)
    sent: list[tuple[str, object]] = []

    def record(_conn: object, _cursor: object, statement: str, parameters: object, *_args: object) -> None:
        sent.append((statement, parameters))

    event.listen(registry.engine, "before_cursor_execute", record)
    try:
        listed = [(p.name, rows) for _parent, p, rows in old_partitions(registry, t + 12 * DAY)]
        dropped = drop_partitions_before(registry, t + 12 * DAY)
    finally:
        event.remove(registry.engine, "before_cursor_execute", record)
    assert name in dict(listed) and list(dropped) == [n for n, _e in listed]
    assert [s for s, _p in sent if f'"{name}"' in s] == [
        f'ALTER TABLE "predictions" DETACH PARTITION "{name}"', f'DROP TABLE "{name}"']
    assert not [s for s, _p in sent if "count(" in s.lower()]
    estimates = [s for s, p in sent if isinstance(p, dict) and p.get("t") == name]
    assert len(estimates) == 2 and all("reltuples" in s for s in estimates)  # when listed, when dropped


def test_cli_prune_prints_the_estimate_or_says_it_is_not_estimated(registry: Registry,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    t, _rows = _old_days_with_rows(registry)
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry.url)
    monkeypatch.setattr(log_cli, "_cutoff", lambda _text: _at(t + 12 * DAY, 12))
    if registry.is_postgres:
        _analyze(registry, day_table(t + 10 * DAY))
    r = CliRunner().invoke(app, ["log", "prune", "--older-than", "1d"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    if not registry.is_postgres:
        assert "deleted 9 predictions" in said and "partition" not in said
        return
    assert "deleted 1 predictions, 0 request errors, 0 shadow scores and 0 outcomes created before" in said
    assert "whole day partitions (~" in said and "rows by the planner's estimate: " in said
    assert f"{day_table(t + 10 * DAY)} ~5" in said
    unknown = set(said.split("rows not estimated (table never analyzed): ")[1].rstrip(")").split(", "))
    assert day_table(t + 11 * DAY) in unknown and day_table(t + 10 * DAY) not in unknown


def test_cli_dry_run_lists_the_days_it_would_drop_and_counts_only_the_batches_rows(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run deletes nothing; it names each partition the prune would drop with its estimate, and its
    exact count is of the rows the batches would delete: on PostgreSQL not the rows of those partitions
    (the cutoff's own day, and DEFAULT's older days, here e and f, which sit before a dropped day), so it
    equals what the prune then reports as deleted. With --model no partition is dropped: it counts as the
    batches of that model would."""
    t = _today()
    ensure_days(registry, t, 4)
    ensure_days(registry, t + 6 * DAY, 3)  # t + 4 and t + 5 are left to DEFAULT
    _insert(registry, {"a": _at(t - 3 * DAY, 12), "c": _at(t + DAY, 12), "e": _at(t + 4 * DAY, 10),
                       "f": _at(t + 5 * DAY, 20), "k": _at(t + 6 * DAY, 0), "k2": _at(t + 6 * DAY, 1),
                       "h": _at(t + 7 * DAY, 6), "i": _at(t + 7 * DAY, 18), "g": _at(t + 30 * DAY, 12)})
    _insert(registry, {"n3": _at(t + 3 * DAY, 23), "n7": _at(t + 7 * DAY, 1)}, model="n")
    insert_rollout_rows(registry, [], [{"request_id": "err", "model": "m", "version": 1, "error": "x",
                                        "created_at": _at(t - DAY, 12)}])
    cutoff = _at(t + 7 * DAY, 12)
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry.url)
    monkeypatch.setattr(log_cli, "_cutoff", lambda _text: cutoff)
    if registry.is_postgres:
        _analyze(registry, day_table(t + 6 * DAY))
    before, parts = _ids(registry), partitions_of(registry)
    runner = CliRunner()

    r = runner.invoke(app, ["log", "prune", "--older-than", "1d", "--dry-run"])

    assert r.exit_code == 0, r.output
    assert _ids(registry) == before and partitions_of(registry) == parts  # nothing deleted
    said = " ".join(r.output.split())
    batches = 4 if registry.is_postgres else 9  # PostgreSQL: e, f (DEFAULT), h, n7 (the cutoff's day)
    errors = 0 if registry.is_postgres else 1  # PostgreSQL: "err" goes with its day's table
    assert (f"would delete {batches} predictions, {errors} request errors, 0 shadow scores and 0 outcomes "
            "created before") in said
    if registry.is_postgres:
        old = _old(registry, cutoff.date())  # both tables' (migrations 0009 and 0011)
        assert {day_table(t + 6 * DAY), day_table(t + 6 * DAY, SHADOW_PARENT)} <= set(old) and len(old) >= 8
        assert f"and drop {len(old)} whole day partitions (~" in said
        assert f"{day_table(t + 6 * DAY)} ~2" in said and all(name in said for name in old)
    else:
        assert "partition" not in said
    r = runner.invoke(app, ["log", "prune", "--older-than", "1d", "--dry-run", "--model", "n"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "would delete 2 predictions, 0 request errors and 0 shadow scores" in said
    assert "partition" not in said

    done = prune_rows(registry, cutoff, batch=2)

    assert done["predictions"] == batches and _ids(registry) == {"i", "g"}
    assert list(done["partitions_dropped"]) == (old if registry.is_postgres else [])
