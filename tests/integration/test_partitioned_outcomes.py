"""Outcomes by their prediction's day (migration 0012), on both backends: an outcome is stored under the
day of the prediction it reports on, whenever it comes (on PostgreSQL in that day's partition, so
`chimera log prune` drops it with its prediction's day: tests/integration/test_log_retention.py); it is
still stored once (the same value again is accepted, another refused); it joins the prediction it was
stored against and no other, so where PostgreSQL logged a request id again on a later day the outcome is
counted once, for the later prediction; outcomes stored before the migration get their prediction's day
(their own date when the prediction is gone), keep their values, and the downgrade gives the plain table
back. Reads that plan only their days' outcome partitions: tests/integration/test_partition_pruning.py."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta

import pytest
from sqlalchemy import inspect, text

from registry import Registry
from registry.errors import AlreadyExistsError
from registry.migrate import upgrade
from registry.partitions import OUTCOMES_PARENT, PARENT, ensure_days, partitions_of
from registry.repository import PredictionRow
from registry.rollouts import arm_rows, insert_rollout_rows, look_rows
from tests.harness import alembic_downgrade

M = "m"
DAY = timedelta(days=1)


def _today() -> date:
    """Read in each test (not at import): a suite that runs across midnight must not shift the days."""
    return datetime.now(UTC).date()


def _at(day: date, hour: int) -> datetime:
    return datetime.combine(day, time(hour), UTC)


def _predict(reg: Registry, stamps: dict[str, datetime]) -> None:
    insert_rollout_rows(reg, [{"request_id": rid, "model": M, "version": 1, "score": 0.5, "latency_ms": 1.0,
                               "created_at": at} for rid, at in stamps.items()])


def _predict_again(reg: Registry, rid: str, at: datetime) -> None:
    """`rid` logged again as the log does (a request id already stored that day is skipped)."""
    reg.insert_predictions([PredictionRow(rid, M, 1, 0.5, 1.0, created_at=at)])


def _outcomes(reg: Registry) -> dict[str, tuple[float, date, str]]:
    """request id -> (value, day, the table it is in) of every stored outcome (several a request id on
    PostgreSQL would collide here: the tests check the row count apart)."""
    where = "tableoid::regclass::text" if reg.is_postgres else "'outcomes'"
    with reg.engine.connect() as c:
        rows = c.execute(text(f"SELECT request_id, value, day, {where} FROM outcomes")).tuples().all()
    return {r: (v, d if isinstance(d, date) else date.fromisoformat(d), t) for r, v, d, t in rows}


def _count(reg: Registry) -> int:
    with reg.engine.connect() as c:
        return int(c.execute(text("SELECT count(*) FROM outcomes")).scalar_one())


def _table(reg: Registry, day: date) -> str:
    """The partition of outcomes that holds `day` (PostgreSQL), or the one table (SQLite)."""
    if not reg.is_postgres:
        return "outcomes"
    return next(p.name for p in partitions_of(reg, OUTCOMES_PARENT) if p.covers(day))


def test_an_outcome_is_stored_once_under_the_day_of_its_prediction(registry: Registry) -> None:
    """Two predictions answered on different days, their outcomes reported today: each is stored under its
    prediction's day (PostgreSQL: in that day's table), by RecordOutcome's path and the bulk one alike;
    the same value again changes nothing, another value is refused and the first stays."""
    today = _today()
    ensure_days(registry, today + 3 * DAY, 2)
    _predict(registry, {"a": _at(today + 3 * DAY, 12), "b": _at(today + 4 * DAY, 1)})

    assert registry.record_outcome("a", 1.0) is True
    assert registry.record_outcome("a", 1.0) is False  # a retry of the same report
    with pytest.raises(AlreadyExistsError, match="already stored as 1.0"):
        registry.record_outcome("a", 0.0)
    assert registry.record_outcomes([("b", 0.0), ("b", 0.0), ("a", 1.0)]) == [None, None, None]
    refused = registry.record_outcomes([("b", 1.0)])[0]
    assert isinstance(refused, AlreadyExistsError) and "already stored as 0.0" in str(refused)

    assert _outcomes(registry) == {"a": (1.0, today + 3 * DAY, _table(registry, today + 3 * DAY)),
                                   "b": (0.0, today + 4 * DAY, _table(registry, today + 4 * DAY))}
    if registry.is_postgres:
        assert _table(registry, today + 3 * DAY) == f"outcomes_{today + 3 * DAY:%Y%m%d}"
    assert _count(registry) == 2


def test_an_id_logged_again_on_a_later_day_gets_one_outcome_for_its_later_prediction(
        registry: Registry) -> None:
    """PostgreSQL keeps a request id unique per day (migration 0009), so an id a client reuses days later
    is logged again (README, Failure modes); SQLite keeps the first and skips the second. The outcome
    reported for that id is stored once, under the newest prediction's day, and a look over both days
    gives it to that prediction alone: joined on the request id only, it was counted for both."""
    first = _today() + 5 * DAY
    ensure_days(registry, first, 4)
    _predict(registry, {"reused": _at(first, 12)})
    _predict_again(registry, "reused", _at(first + 3 * DAY, 12))  # SQLite: skipped, the id is taken

    assert registry.record_outcomes([("reused", 1.0)]) == [None]
    assert registry.record_outcome("reused", 1.0) is False
    newest = first + 3 * DAY if registry.is_postgres else first
    assert _outcomes(registry) == {"reused": (1.0, newest, _table(registry, newest))}
    assert _count(registry) == 1

    look = look_rows(registry, M, (1,), _at(first, 0), _at(first + 3 * DAY, 23))
    answered = look.created.tolist()
    assert len(answered) == (2 if registry.is_postgres else 1)
    with_outcome = [t for t, v in zip(answered, look.value.tolist(), strict=True) if not math.isnan(v)]
    assert with_outcome == [_at(newest, 12).timestamp()]
    arm = arm_rows(registry, M, 1, _at(first, 0), _at(first + 3 * DAY, 23))
    assert arm.outcomes.tolist() == [1.0] and arm.requests == len(answered)


def _seed_outcomes(reg: Registry, rows: dict[str, tuple[float, datetime]]) -> None:
    """Outcomes as the tables before migration 0012 held them (no day)."""
    pg = reg.is_postgres
    with reg.engine.begin() as c:
        c.execute(text("INSERT INTO outcomes (request_id, value, created_at) VALUES (:r, :v, :t)"),
                  [{"r": r, "v": v, "t": t if pg else f"{t:%Y-%m-%d %H:%M:%S.%f}"}
                   for r, (v, t) in rows.items()])


def test_outcomes_from_before_the_migration_get_their_predictions_day(registry_url: str) -> None:
    """Migration 0012 on outcomes holding rows: each keeps its value and time and gets the day of its
    prediction (of the newest one, PostgreSQL keeping an id on two days), or its own date when its
    prediction is gone; on PostgreSQL each row sits in the partition of that day (a day predictions had
    a table for gets one, a clock ahead of the migration's otherwise goes to DEFAULT). Reports after it
    are stored once as before; downgrade gives the plain table with its key back and the same rows; an
    upgrade after that works again."""
    today = _today()
    tomorrow = today + DAY
    reg = Registry(registry_url)
    pg = reg.is_postgres
    try:
        upgrade(registry_url, reg.engine, revision="0011")
        ensure_days(reg, today + 4 * DAY, 1, parents=(PARENT,))  # a day of predictions made far ahead
        _predict(reg, {"yday": _at(today - DAY, 10), "old": _at(today - 9 * DAY, 10),
                       "skewed": _at(today + 6 * DAY, 10), "twice": _at(today - 9 * DAY, 11),
                       "ahead": _at(today + 4 * DAY, 10)})
        _predict_again(reg, "twice", _at(today - 2 * DAY, 11))  # PostgreSQL: its second day; SQLite: skipped
        seeded = {"yday": (1.0, _at(today, 1)), "old": (0.0, _at(today - 2 * DAY, 1)),
                  "skewed": (1.0, _at(today, 2)), "twice": (0.5, _at(today - DAY, 3)),
                  "ahead": (1.0, _at(today, 4)),
                  "ghost": (1.0, _at(today - 4 * DAY, 5))}  # its prediction already pruned
        _seed_outcomes(reg, seeded)

        upgrade(registry_url, reg.engine)

        first = f"outcomes_upto_{tomorrow:%Y%m%d}" if pg else "outcomes"
        twice = today - (2 if pg else 9) * DAY
        assert _outcomes(reg) == {
            "yday": (1.0, today - DAY, first), "old": (0.0, today - 9 * DAY, first),
            "skewed": (1.0, today + 6 * DAY, "outcomes_default" if pg else first),
            "twice": (0.5, twice, first), "ghost": (1.0, today - 4 * DAY, first),
            # the migration made outcomes a table for each day predictions had one for, not DEFAULT
            "ahead": (1.0, today + 4 * DAY, f"outcomes_{today + 4 * DAY:%Y%m%d}" if pg else first)}
        with reg.engine.connect() as c:
            times = dict(c.execute(text("SELECT request_id, created_at FROM outcomes")).tuples().all())
        stamps = {r: t if isinstance(t, datetime) else datetime.fromisoformat(t) for r, t in times.items()}
        assert {r: t if t.tzinfo else t.replace(tzinfo=UTC) for r, t in stamps.items()} == {
            r: t for r, (_v, t) in seeded.items()}
        if pg:
            days = {f"outcomes_{d:%Y%m%d}" for d in (tomorrow, tomorrow + DAY, today + 4 * DAY)}
            assert {p.name for p in partitions_of(reg, OUTCOMES_PARENT)} == {first, "outcomes_default", *days}
            with reg.engine.connect() as c:
                key = inspect(c).get_pk_constraint("outcomes")["constrained_columns"]
            assert key == ["request_id", "day"]

        assert reg.record_outcomes([("yday", 1.0), ("twice", 0.5), ("old", 1.0)])[:2] == [None, None]
        assert _count(reg) == 6  # nothing stored twice, "old" refused (another value)

        alembic_downgrade(reg, "0011")
        with reg.engine.connect() as c:
            back = dict(c.execute(text("SELECT request_id, value FROM outcomes")).tuples().all())
            table = inspect(c)
            cols = {col["name"] for col in table.get_columns("outcomes")}
            primary = table.get_pk_constraint("outcomes")["constrained_columns"]
            indexes = {ix["name"] for ix in table.get_indexes("outcomes")}
        assert back == {r: v for r, (v, _t) in seeded.items()} and "day" not in cols
        assert primary == ["request_id"] and "ix_outcomes_created" in indexes
        if pg:
            with reg.engine.connect() as c:
                kind = c.scalar(text("SELECT relkind FROM pg_class WHERE oid = 'outcomes'::regclass"))
            assert kind == "r"  # a plain table again

        upgrade(registry_url, reg.engine)
        assert _outcomes(reg)["twice"] == (0.5, twice, first)
    finally:
        reg.dispose()


def test_a_bulk_report_sends_its_outcomes_in_one_insert(registry: Registry) -> None:
    """RecordOutcomes of 300 outcomes sends one INSERT statement on PostgreSQL, not one a row: a list of
    parameter sets went to psycopg2's executemany, a round trip a row (~75 % of such a call, profiled:
    docs/performance.md, "Time partitioning", point 7). SQLite's executemany runs in-process; both store
    every outcome under its prediction's day."""
    from sqlalchemy import event

    day = _today() + 7 * DAY
    ensure_days(registry, day, 1)
    _predict(registry, {f"b{i}": _at(day, 9) for i in range(300)})
    inserts: list[bool] = []

    def record(_conn: object, _cursor: object, statement: str, _params: object, _ctx: object,
               many: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO OUTCOMES"):
            inserts.append(many)

    event.listen(registry.engine, "before_cursor_execute", record)
    try:
        assert registry.record_outcomes([(f"b{i}", 1.0) for i in range(300)]) == [None] * 300
    finally:
        event.remove(registry.engine, "before_cursor_execute", record)
    assert inserts == ([False] if registry.is_postgres else [True])
    assert {r: d for r, (_v, d, _t) in _outcomes(registry).items()} == {f"b{i}": day for i in range(300)}
