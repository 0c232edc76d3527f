"""Mirror scores by day (migration 0011, which partitions request_errors the same way), on both
backends: every writer of shadow_predictions stores a row's day as the UTC date of its created_at, so on
PostgreSQL it lands in that day's partition; a request pairs with the mirror score of its own day only, so
a retry that crossed midnight (two mirror scores on PostgreSQL, where a (request id, version) is unique per
day) is paired once, by the rollout look, the shadow test and the shadow report alike; rows of both tables
stored before the migration keep their ids and get their day; the downgrade gives plain tables back.
Upkeep and pruning of the partitions: tests/integration/test_partitions.py and
tests/integration/test_log_retention.py; request errors written by the log:
tests/integration/test_partitioned_log.py."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from gateway.records.inserter import Inserter, ShadowRow
from registry import Registry
from registry.migrate import upgrade
from registry.partitions import SHADOW_PARENT, partitions_of
from registry.repository import PredictionRow
from registry.rollouts import insert_rollout_rows, look_rows
from registry.shadow_eval import paired_rows
from registry.shadow_rows import shadow_rows
from tests.harness import alembic_downgrade, seed

M = "m"


def _today() -> date:
    """Read in each test (not at import): a suite that runs across midnight must not shift the days."""
    return datetime.now(UTC).date()


def _at(day: date, hh: int, mm: int, ss: float = 0.0) -> datetime:
    return datetime.combine(day, time(hh, mm), UTC) + timedelta(seconds=ss)


def _mirror(rid: str, score: float, at: datetime, version: int = 2) -> ShadowRow:
    """A mirror score as the gateway's shadow path hands it to the log's writer (created_at: epoch)."""
    return (rid, M, version, score, 1.0, at.timestamp())


def _stored(reg: Registry) -> dict[tuple[str, int], tuple[float, date, str]]:
    """(request id, version) -> (score, day, the table it is in), of every mirror score."""
    pg = reg.is_postgres
    where = "tableoid::regclass::text" if pg else "'shadow_predictions'"
    with reg.engine.connect() as c:
        rows = c.execute(text(f"SELECT request_id, version, score, day, {where} FROM shadow_predictions"))
        return {(r, v): (s, d if isinstance(d, date) else date.fromisoformat(d), t) for r, v, s, d, t in rows}


def _table(reg: Registry, day: date) -> str:
    return f"shadow_predictions_{day:%Y%m%d}" if reg.is_postgres else "shadow_predictions"


def test_every_shadow_writer_stores_the_day_and_postgres_files_the_row_under_it(registry: Registry) -> None:
    """The log writer's COPY (PostgreSQL) or many-row INSERT (SQLite), its INSERT ... ON CONFLICT after a
    (request id, version) already stored (a lane written twice: the first score kept), and the
    registry's own insert all store the day; on PostgreSQL the row is in that day's table."""
    today = _today()
    tomorrow = today + timedelta(days=1)
    yesterday = today - timedelta(days=1)
    ins = Inserter(registry)
    try:
        assert ins.insert_shadow([_mirror("copy-a", 0.1, _at(tomorrow, 12, 0)),
                                  _mirror("copy-b", 0.2, _at(tomorrow, 23, 59, 59.5))]) == 2
        assert ins.insert_shadow([_mirror("copy-a", 0.9, _at(tomorrow, 12, 0)),  # written twice
                                  _mirror("staged", 0.3, _at(tomorrow, 13, 0))]) == 1
    finally:
        ins.close()
    registry.insert_shadow_predictions([PredictionRow("orm", M, 2, 0.4, 1.0,
                                                      created_at=_at(yesterday, 13, 0))])
    first = f"shadow_predictions_upto_{tomorrow:%Y%m%d}" if registry.is_postgres else "shadow_predictions"
    assert _stored(registry) == {("copy-a", 2): (0.1, tomorrow, _table(registry, tomorrow)),
                                 ("copy-b", 2): (0.2, tomorrow, _table(registry, tomorrow)),
                                 ("staged", 2): (0.3, tomorrow, _table(registry, tomorrow)),
                                 ("orm", 2): (0.4, yesterday, first)}
    if registry.is_postgres:  # what lets prune drop a whole day unread: CHECK (day = created_at's UTC date)
        with pytest.raises(IntegrityError, match="ck_shadow_predictions_day"), registry.engine.begin() as c:
            c.execute(text("INSERT INTO shadow_predictions (request_id, model, version, score, latency_ms, "
                           "created_at, day) VALUES ('skew', 'm', 2, 0.5, 1.0, :at, :day)"),
                      {"at": _at(tomorrow, 12, 0), "day": today})


def test_a_retry_across_midnight_pairs_its_request_with_one_mirror_score(registry: Registry) -> None:
    """Three requests served by the canary (v3), each mirrored to the baseline (v2) for its covariate:
    "plain" at noon; "retry" at 23:59:58, whose client retried at 00:00:04 (the log keeps the first
    prediction, gateway.records.pg_ids, but the retry's mirror score is written on the next day, where
    PostgreSQL's key (request id, version, day) takes it; SQLite refuses it); "edge" answered 1 ms before
    midnight and mirrored 4 ms after it. Every reader pairs "plain" and "retry" with the score of their
    own day, once each, and "edge" with none (registry.models.mirrored_with): without the day in the
    pairing, PostgreSQL's look would count "retry" twice."""
    d = _today() + timedelta(days=1)
    nxt = d + timedelta(days=1)
    answered = {"plain": _at(d, 12, 0), "retry": _at(d, 23, 59, 58), "edge": _at(d, 23, 59, 59.999)}
    insert_rollout_rows(registry, [{"request_id": rid, "model": M, "version": 3, "score": 0.3,
                                    "latency_ms": 1.0, "created_at": at} for rid, at in answered.items()])
    ins = Inserter(registry)
    try:
        ms = timedelta(milliseconds=4)
        assert ins.insert_shadow([_mirror("plain", 0.5, answered["plain"] + ms),
                                  _mirror("retry", 0.7, answered["retry"] + ms),
                                  _mirror("edge", 0.9, answered["edge"] + ms)]) == 3
        stored_twice = ins.insert_shadow([_mirror("retry", 0.1, _at(nxt, 0, 0, 4.0))])
    finally:
        ins.close()
    assert stored_twice == (1 if registry.is_postgres else 0)
    assert registry.record_outcomes([(rid, 1.0) for rid in answered]) == [None] * 3
    since, until = _at(d, 0, 0), _at(nxt, 1, 0)

    look = look_rows(registry, M, (2, 3), since, until)
    assert look.unit == ["r:plain", "r:retry", "r:edge"]
    assert look.covariate[:2].tolist() == [0.5, 0.7] and math.isnan(look.covariate[2])
    paired = paired_rows(registry, M, shadow=2, served=3, since=since, until=until)
    assert paired.unit == ["r:plain", "r:retry"] and paired.shadow.tolist() == [0.5, 0.7]
    report = shadow_rows(registry, M, 2, since=since, until=until)
    assert report.shadow.tolist() == [0.5, 0.7] and report.served.tolist() == [0.3, 0.3]


def _errors(reg: Registry) -> dict[str, tuple[int, date, str]]:
    """request id -> (id, day, the table it is in), of every request_errors row."""
    where = "tableoid::regclass::text" if reg.is_postgres else "'request_errors'"
    with reg.engine.connect() as c:
        rows = c.execute(text(f"SELECT request_id, id, day, {where} FROM request_errors"))
        return {r: (i, d if isinstance(d, date) else date.fromisoformat(d), t) for r, i, d, t in rows}


def test_mirror_scores_from_before_the_migration_keep_their_ids_and_get_their_own_day(
        registry_url: str) -> None:
    """Migration 0011 on shadow_predictions and request_errors holding rows: each row keeps its id and
    gets its day (a skewed clock's row moved to DEFAULT on PostgreSQL); writes after it are not stored
    twice and take ids after the old ones; downgrade gives the plain tables with their keys back; an
    upgrade after that works again."""
    today = _today()
    tomorrow = today + timedelta(days=1)
    reg = Registry(registry_url)
    pg = reg.is_postgres
    old = {"old-3d": _at(today - timedelta(days=3), 10, 0), "old-now": _at(today, 0, 20),
           "skewed": _at(today + timedelta(days=5), 10, 0)}
    try:
        upgrade(registry_url, reg.engine, revision="0010")
        ids = seed(reg, "shadow_predictions", "INSERT INTO shadow_predictions (request_id, model, version, "
                   "score, latency_ms, created_at) VALUES (:r, 'm', 2, 0.5, 1.0, :t)", old)
        error_ids = seed(reg, "request_errors", "INSERT INTO request_errors (request_id, model, version, "
                         "routing_key, pinned, error, created_at) VALUES (:r, 'm', 2, '', false, 'x', :t)",
                         old)
        upgrade(registry_url, reg.engine)

        errors_first = f"request_errors_upto_{tomorrow:%Y%m%d}" if pg else "request_errors"
        assert _errors(reg) == {
            "old-3d": (error_ids["old-3d"], today - timedelta(days=3), errors_first),
            "old-now": (error_ids["old-now"], today, errors_first),
            "skewed": (error_ids["skewed"], today + timedelta(days=5),
                       "request_errors_default" if pg else errors_first)}
        insert_rollout_rows(reg, [], [{"request_id": "new", "model": M, "version": 2, "error": "x",
                                       "created_at": _at(tomorrow, 12, 0)}])
        new_error = _errors(reg)["new"]
        assert new_error[0] > max(error_ids.values()) and new_error[1:] == (
            tomorrow, f"request_errors_{tomorrow:%Y%m%d}" if pg else "request_errors")

        first = f"shadow_predictions_upto_{tomorrow:%Y%m%d}" if pg else "shadow_predictions"
        # Every row its own day; on PostgreSQL one from a clock ahead of the migration is moved out of the
        # first partition to the day it belongs to (no table for that day yet: the DEFAULT one).
        assert {k[0]: (d, t) for k, (_s, d, t) in _stored(reg).items()} == {
            "old-3d": (today - timedelta(days=3), first), "old-now": (today, first),
            "skewed": (today + timedelta(days=5), "shadow_predictions_default" if pg else first)}
        with reg.engine.connect() as c:
            kept = c.execute(text("SELECT request_id, id FROM shadow_predictions")).tuples().all()
        assert dict(kept) == ids

        ins = Inserter(reg)
        try:  # a lane written before the migration and again after it: not stored twice
            assert ins.insert_shadow([_mirror("old-3d", 0.5, old["old-3d"])]) == 0
            assert ins.insert_shadow([_mirror("new", 0.5, _at(tomorrow, 12, 0))]) == 1
        finally:
            ins.close()
        with reg.engine.connect() as c:
            new_id = c.execute(text("SELECT id FROM shadow_predictions WHERE request_id = 'new'")).scalar()
        assert new_id > max(ids.values())  # the id sequence carried on
        if pg:
            days = {first, "shadow_predictions_default", _table(reg, tomorrow),
                    _table(reg, tomorrow + timedelta(days=1))}
            assert {p.name for p in partitions_of(reg, SHADOW_PARENT)} == days

        alembic_downgrade(reg, "0010")
        with reg.engine.connect() as c:
            back = dict(c.execute(text("SELECT request_id, id FROM shadow_predictions")).tuples().all())
            table = inspect(c)
            cols = {col["name"] for col in table.get_columns("shadow_predictions")}
            unique = [u["column_names"] for u in table.get_unique_constraints("shadow_predictions")]
            primary = table.get_pk_constraint("shadow_predictions")["constrained_columns"]
            indexes = {ix["name"] for ix in table.get_indexes("shadow_predictions")}
        assert back == {**ids, "new": new_id} and "day" not in cols
        with reg.engine.connect() as c:
            errors_back = dict(c.execute(text("SELECT request_id, id FROM request_errors")).tuples().all())
            error_cols = {col["name"] for col in inspect(c).get_columns("request_errors")}
            error_pk = inspect(c).get_pk_constraint("request_errors")["constrained_columns"]
        assert errors_back == {**error_ids, "new": new_error[0]} and "day" not in error_cols
        assert error_pk == ["id"]
        assert unique == [["request_id", "version"]] and primary == ["id"]
        assert {"ix_shadow_predictions_model_version", "ix_shadow_predictions_model_created"} <= indexes
        if pg:
            with reg.engine.connect() as c:
                kind = c.execute(text("SELECT relkind FROM pg_class WHERE relname = 'shadow_predictions'"))
                assert kind.scalar() == "r"
                left = c.execute(text("SELECT count(*) FROM pg_class WHERE relname LIKE "
                                      "'shadow_predictions_2%' OR relname LIKE 'shadow_predictions_upto%'"))
                assert left.scalar() == 0
        upgrade(registry_url, reg.engine)  # and up again: the upgrade runs on a table that was downgraded
        assert {k[0] for k in _stored(reg)} == {*ids, "new"} and set(_errors(reg)) == {*error_ids, "new"}
    finally:
        reg.dispose()
