"""The prediction log's plain PostgreSQL insert as binary COPY (issue 17), on psycopg 3 connections bounded
by registry.copy_conn; mirror scores (shadow_predictions) go the same way.

Why: COPY in binary format hands the server each value in its wire form, so the server does not lex a
statement or parse array, hex and timestamp literals; its CPU a row fell from 11.8-13.6 us (the unnest
INSERT of array literals, removed 2026-12-06) to 9.0 us over 20 s, and the writer's rate on this 2-core
machine from 75k to 103-107k rows/s over 60 s (two connections each; docs/performance.md "Prediction-log
ingest").

What stays as before: COPY is only the *plain* path. A unique violation (a request id already stored)
aborts the COPY like the plain INSERT, and gateway.records.inserter writes the batch again with the
INSERT ... ON CONFLICT DO NOTHING (and the next batches for a while), which since 2026-12-06 reads the
batch from a TEMP staging table filled by the same binary COPY (`stage_rows`; mirror scores
`stage_shadow_rows`) instead of unnest arrays.
A value the server refuses (a NUL byte, an over-long routing key) raises psycopg's DataError, which the log's
bisection (gateway.records.spill.is_data_error) knows by name; anything else means the database is away
and the rows are kept.

The element types must be the columns' own (binary COPY has no casts): `COLUMN_TYPES`, which
tests/integration/test_log_insert.py checks against the table on PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from registry.models import list_to_packed

# The predictions columns' own PostgreSQL types, in COLUMNS order: binary COPY sends each value in exactly
# this form (into predictions, and into the staging table of the INSERT that checks ids).
COLUMN_TYPES = ("varchar", "varchar", "int4", "varchar", "float8", "float8", "timestamptz", "bytea", "int8",
                "bool", "int4")
# COPY also writes predictions.day (migration 0009: PostgreSQL's partition key), the UTC date of created_at.
DAY_COLUMN = "day"
COPY_TYPES = (*COLUMN_TYPES, "date")
# Request ids are unique per day (UNIQUE (request_id, day)) and, across midnight, within this window: the
# id of a row answered this close to 00:00 UTC is also looked up on the neighbouring day before the row is
# written (gateway.records.pg_ids), so a client's retry that crosses midnight is logged once.
SAME_ID_WINDOW_MIN = 15
EARLY, LATE = time(0, SAME_ID_WINDOW_MIN), time(23, 60 - SAME_ID_WINDOW_MIN)  # a day's own stretch


class NearMidnight(Exception):  # noqa: N818 - a routing signal, not a failure
    """copy_rows met a row within SAME_ID_WINDOW_MIN minutes of 00:00 UTC: nothing is written (the COPY
    is aborted and rolled back); the caller looks the batch's ids up on the neighbouring day and writes it
    again (gateway.records.pg_ids)."""


_ONE_DAY = timedelta(days=1)


def neighbour_day(dt: datetime) -> date | None:
    """The UTC day on which a row answered at `dt` (aware) must also look for its request id: the day
    before when `dt` is within SAME_ID_WINDOW_MIN minutes after a UTC midnight, the day after when within
    them before one, None otherwise (the rest of the day: its own day's unique key is the whole rule)."""
    u = dt.astimezone(UTC)
    t = u.time()
    if t < EARLY:
        return u.date() - _ONE_DAY
    if t >= LATE:
        return u.date() + _ONE_DAY
    return None


# shadow_predictions' (gateway.records.inserter.SHADOW_COLUMNS): request_id, model, version, score,
# latency_ms, created_at; then its day (migration 0011), created_at's UTC date, as for predictions.
SHADOW_COLUMN_TYPES = ("varchar", "varchar", "int4", "float8", "float8", "timestamptz")
SHADOW_COPY_TYPES = (*SHADOW_COLUMN_TYPES, "date")


def copy_sql(table: str, columns: Sequence[str]) -> str:
    return f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"


class Timestamps:
    """created_at text (ISO 8601 with offset, as the writer's rows and spill lines carry it) or epoch
    seconds (mirror scores) to the datetime binary COPY needs; the rows of one batch share a handful of
    values, so the last is kept. Text without an offset is UTC: psycopg refuses a naive datetime for
    timestamptz with a TypeError, which the log would take for a bad row and dead-letter."""

    def __init__(self) -> None:
        self._last: tuple[Any, datetime | None] = (None, None)
        self._dated: tuple[Any, datetime | None, date | None, date | None] = (None, None, None, None)

    def dated(self, value: Any) -> tuple[datetime, date, date | None]:
        """(the datetime, its UTC date, its neighbour_day: None unless near midnight), cached like
        __call__."""
        text, dt, day, other = self._dated
        if value == text and dt is not None and day is not None:
            return dt, day, other
        dt = self(value)
        day, other = dt.astimezone(UTC).date(), neighbour_day(dt)
        self._dated = (value, dt, day, other)
        return dt, day, other

    def __call__(self, value: Any) -> datetime:
        text, dt = self._last
        if value == text and dt is not None:
            return dt
        if isinstance(value, datetime):
            dt = value
        elif isinstance(value, float):  # epoch seconds: mirror scores carry their time so
            dt = datetime.fromtimestamp(value, UTC)
        else:
            dt = datetime.fromisoformat(value)
        if dt.tzinfo is None:  # SQLite's text (a spill line of a gateway on SQLite): UTC
            dt = dt.replace(tzinfo=UTC)
        self._last = (value, dt)
        return dt


def copy_rows(cur: Any, sql: str, rows: Sequence[Sequence[Any]], when: Timestamps, *,
              midnight_ok: bool = False) -> int:
    """COPY `rows` (the prediction log's COLUMNS, in order, then their day) on `cur`'s connection (the
    caller bounds it with registry.copy_conn.deadline). Returns the rows written. Numbers are coerced to
    the column's Python type (a numpy scalar would otherwise fail the dump, which the log would take for
    bad data); features go as packed float32 (JSON text or lists from unary rows and spill lines are
    packed here). Raises NearMidnight, having written nothing that commits, for a row near 00:00 UTC,
    unless `midnight_ok`: the caller has checked those rows' ids against the neighbouring day
    (gateway.records.pg_ids.taken_across_midnight), or writes the staged INSERT's table, which does
    (stage_rows)."""
    dated = when.dated
    with cur.copy(sql) as cp:
        cp.set_types(COPY_TYPES)
        write = cp.write_row
        for r in rows:
            f = r[7]
            dt, day, other = dated(r[6])
            if other is not None and not midnight_ok:
                raise NearMidnight(r[6])
            write((r[0], r[1], int(r[2]), r[3], float(r[4]), float(r[5]), dt,
                   f if f is None or type(f) is bytes else list_to_packed(f),
                   None if r[8] is None else int(r[8]), bool(r[9]), None if r[10] is None else int(r[10]),
                   day))
    return len(rows)


def _stage(table: str, types: Sequence[str]) -> tuple[str, str, tuple[str, ...]]:
    """(CREATE, COPY, column names) of a staging table for a staged INSERT: TEMP, so one per connection,
    without indexes or WAL, and emptied by every commit; its columns c0, c1, ... of `types`. The CREATE
    runs before each staged batch (IF NOT EXISTS: a catalog lookup), so a connection the pool replaced
    gets its table without any bookkeeping here."""
    names = tuple(f"c{i}" for i in range(len(types)))
    columns = ", ".join(f"{n} {t}" for n, t in zip(names, types, strict=True))
    return (f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns}) ON COMMIT DELETE ROWS",
            copy_sql(table, names), names)


# The prediction log's (stage_rows): COPY_TYPES, so copy_rows writes it as it writes predictions.
# STAGE_NAMES: its columns, for the INSERT ... SELECT.
STAGE_TABLE = "chimera_log_stage"
_STAGE_DDL, _STAGE_COPY, STAGE_NAMES = _stage(STAGE_TABLE, COPY_TYPES)


def stage_rows(cur: Any, insert_sql: str, rows: Sequence[Sequence[Any]], when: Timestamps) -> int:
    """The prediction log's INSERT that checks ids (gateway.records.pg_ids.pg_insert_sql: ON CONFLICT, and
    the neighbouring day near midnight) fed by binary COPY: `rows` go into the connection's TEMP table,
    then `insert_sql` (INSERT ... SELECT from it) writes them, in the caller's transaction. Returns the
    rows inserted (fewer than given: ids already taken). The caller removes a batch's own repeated ids
    (one statement cannot see its own rows).

    Why staged: those rules need a statement (COPY has neither ON CONFLICT nor NOT EXISTS), and sending
    the batch as unnest array literals (psycopg2, until 2026-12-06) cost more than binary COPY into a
    table without indexes or WAL. Measured on this machine (`chimera log bench`'s writer with its clock
    at 23:50 UTC, fresh databases, 6 alternated 60 s runs each): the writer's CPU 3.2-3.9 -> 2.3-2.5 us a
    row, its RSS 164 -> 114 MiB, the server's no higher, the rate 85.5k -> 92.6k rows/s on average
    (docs/performance.md, "Time partitioning", point 2)."""
    cur.execute(_STAGE_DDL)
    copy_rows(cur, _STAGE_COPY, rows, when, midnight_ok=True)
    cur.execute(insert_sql)
    return int(cur.rowcount)


def copy_shadow_rows(cur: Any, sql: str, rows: Sequence[Sequence[Any]], when: Timestamps) -> int:
    """COPY mirror scores (gateway.records.inserter.ShadowRow: created_at as epoch seconds) and their day
    into shadow_predictions on `cur`'s connection. Returns the rows written. No row waits for a look-up
    near midnight: a (request id, version) is unique per day only, and the readers pair a mirror score
    with its prediction of the same day (registry.models.mirrored_with)."""
    dated = when.dated
    with cur.copy(sql) as cp:
        cp.set_types(SHADOW_COPY_TYPES)
        write = cp.write_row
        for r in rows:
            dt, day, _ = dated(float(r[5]))
            write((r[0], r[1], int(r[2]), float(r[3]), float(r[4]), dt, day))
    return len(rows)


# Mirror scores' (stage_shadow_rows): SHADOW_COPY_TYPES, in shadow_predictions' SHADOW_COLUMNS order.
SHADOW_STAGE_TABLE = "chimera_shadow_stage"
_SHADOW_STAGE_DDL, _SHADOW_STAGE_COPY, _ = _stage(SHADOW_STAGE_TABLE, SHADOW_COPY_TYPES)


def stage_shadow_rows(cur: Any, insert_sql: str, rows: Sequence[Sequence[Any]], when: Timestamps) -> int:
    """Mirror scores by `insert_sql` (INSERT ... SELECT * FROM SHADOW_STAGE_TABLE ON CONFLICT (request_id,
    version, day) DO NOTHING: the path after a (request id, version) already stored that day, a lane
    written twice), fed by binary COPY into the connection's staging table as stage_rows is. Returns the
    rows inserted."""
    cur.execute(_SHADOW_STAGE_DDL)
    copy_shadow_rows(cur, _SHADOW_STAGE_COPY, rows, when)
    cur.execute(insert_sql)
    return int(cur.rowcount)
