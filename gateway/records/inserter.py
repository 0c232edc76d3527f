"""How prediction rows reach the database: the row tuple, its JSON feature text and the batched
INSERT through the driver's fastest path. Split from gateway.records.prediction_log (the queue, the
writer thread, spill and replay), which is the only user.

SQLite: INSERT ... ON CONFLICT (request_id) DO NOTHING, a batch in request-id order, up to 256 rows a
statement when its ids land at the unique index's right edge (the gateway's own time-prefixed ids: ~1 us
less CPU a row), executemany's statement a row otherwise (gateway.records.sqlite_rows says why).
PostgreSQL with psycopg2 (the engine's driver): binary COPY on psycopg 3 connections
(gateway.records.pg_copy, bounded by registry.copy_conn); near midnight, after one look-up of the
batch's ids on the neighbouring day (gateway.records.pg_ids, which also says how ids stay unique across
days). Once a request id is taken, on the same connections, binary COPY into the connection's TEMP
staging table and `INSERT ... SELECT ... FROM it ON CONFLICT (request_id, day) DO NOTHING`
(pg_copy.stage_rows), so duplicates behave as before.
Every path writes predictions.day, created_at's UTC date (migration 0009). Batches of 2,000+ rows go as
two halves on two connections committed together (gateway.records.paired_tx). Other drivers fall back to
`Registry.insert_predictions`.

Measured on this machine (server CPU a row, 32 features, the table's indexes): execute_values ~45-52 us
client + server, the unnest INSERT 11.8-13.6 us server, binary COPY 9.0 us server; over 60 s with two
connections, 75k rows/s for the unnest INSERT (the INSERT that checks ids until 2026-12-06) and 103-107k
for COPY; in the half hour around midnight, COPY after the look-up 106-133k against 78-102k for the
staged INSERT that took those batches before (docs/performance.md).
Feature rows: packed little-endian float32 vectors (`matrix_f32`) on both backends: SQLite keeps them in
its JSON-typed column, PostgreSQL's column is bytea since migration 0008 (binary COPY sends each as
it is). The column type,
registry.models.FeatureVector, reads packed vectors and JSON text back as the same lists of floats.
Spill and dead-letter lines (`portable`) carry JSON arrays of float32-exact numbers: with orjson, a
whole matrix is encoded in one call (~0.6 us a row); without it, with 9 significant digits through
%-formatting (~5 us a row); a replayed JSON row is packed again on PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import Any, Literal

import numpy as np
from sqlalchemy import insert

from gateway.records.feature_rows import features_json, matrix_f32, matrix_json
from gateway.records.paired_tx import DaemonThreads, end, halves, write_both, written
from gateway.records.pg_copy import (
    DAY_COLUMN,
    SHADOW_STAGE_TABLE,
    STAGE_NAMES,
    STAGE_TABLE,
    Timestamps,
    copy_rows,
    copy_shadow_rows,
    copy_sql,
    stage_rows,
    stage_shadow_rows,
)
from gateway.records.pg_ids import (
    TakenWindow,
    first_of_each_id,
    pg_insert_sql,
    taken_across_midnight,
    taken_sql,
)
from gateway.records.sqlite_rows import MultiRowInsert
from registry import Registry
from registry.copy_conn import CopyConnections, deadline
from registry.models import Prediction, RequestError, ShadowPrediction, prediction_key, shadow_key
from registry.repository import PredictionRow

COLUMNS = ("request_id", "model", "version", "routing_key", "score", "latency_ms", "created_at", "features",
           "split_revision", "pinned", "failed_version")
# A row on its way to the database: the COLUMNS in order, created_at as the text the database stores or
# parses (SQLite: SQLAlchemy's own format; others: ISO 8601 with offset), features as JSON text,
# then what the rollout controller reads (migration 0005): the split revision the row was routed
# under, whether the caller pinned the version (load tests; left out of every rollout test), and the
# version whose failure made the row fail over (None: served by the routed version). Rows are spilled
# as they are, so a spill file replays without conversion; spill lines written before 0005 carry only
# the first 8 fields and replay through `widen`.
Row = tuple[Any, ...]
# A request that failed entirely on `version` (nothing could answer it), for the rollout's error
# guardrail: a Row whose score is 0.0, features None, failed_version None, plus the error text as a
# 12th field. It travels the same queue and spill file as the predictions and goes to request_errors.
ERROR_FIELDS = len(COLUMNS) + 1
_OLD_FIELDS = 8  # rows spilled before migration 0005
_ERROR_COLUMNS = ("request_id", "model", "version", "routing_key", "latency_ms", "created_at",
                  "split_revision", "pinned", "error")
# PostgreSQL: a batch of at least twice this many predictions is written as two halves at once
# (gateway.records.paired_tx: both cores busy, one serial chain of encode then insert otherwise).
_PG_PAIR_MIN_ROWS = 1_000
# A mirror score (gateway.serving.shadow) on its way to shadow_predictions: (request_id, model, version,
# score, latency_ms, created_at as epoch seconds). The same fast paths as predictions: at a 10 % canary
# with the covariate on, one row in ten of the traffic is also one of these, and through SQLAlchemy's
# executemany of dicts they cost the gateway ~10 % of its CPU on packed batches (measured, py-spy).
ShadowRow = tuple[str, str, int, float, float, float]
SHADOW_COLUMNS = ("request_id", "model", "version", "score", "latency_ms", "created_at")

def portable(rows: Sequence[Row]) -> list[Row]:
    """`rows` with packed feature vectors (bytes) turned back into the JSON text other paths carry:
    spill and dead-letter lines are JSON, and a spilled row may be replayed into another database."""
    out: list[Row] = []
    for r in rows:
        f = r[7] if len(r) > 7 else None
        if isinstance(f, (bytes, bytearray, memoryview)):
            r = (*r[:7], matrix_json(np.frombuffer(f, dtype="<f4")[None, :])[0], *r[8:])
        out.append(r)
    return out


class Inserter:
    """Batched INSERT ... ON CONFLICT (request_id) DO NOTHING through the raw DB-API connection."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        engine = registry.engine
        table = Prediction.__table__
        self.dialect = engine.dialect.name
        self.driver = engine.dialect.driver
        # A sampled feature row is stored as a packed float32 vector (registry.models.FeatureVector):
        # on SQLite ~2-3 us less CPU a row than its JSON text (400k rows, 32 features); on PostgreSQL
        # (bytea since migration 0008) the server's cost fell from ~17 to ~9.4 us a row. No text to
        # encode either. Other drivers go through the ORM, where FeatureVector takes bytes too.
        self.encode_matrix: Callable[[np.ndarray], list[Any]] = matrix_f32
        col_type = table.c.created_at.type
        self._ts = col_type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
        self._fast_ts = self._ts is not None and _same_format(self._ts)
        self._second: tuple[int, str] = (-1, "")
        cols = ", ".join(COLUMNS)
        self._copy: CopyConnections | None = None  # PostgreSQL: the plain path (see pg_ids.TakenWindow)
        self._multi: dict[str, MultiRowInsert] = {}  # SQLite: the statements' many-row forms, by text
        if self.dialect == "sqlite":  # day: the date part of created_at's text (UTC, SQLAlchemy's format)
            self.sql = self._many_rows(table.name, COLUMNS, "ON CONFLICT (request_id) DO NOTHING",
                                       {DAY_COLUMN: "substr({created_at}, 1, 10)"})
        elif self.dialect == "postgresql" and self.driver == "psycopg2":
            # The INSERT that checks ids reads the batch from the connection's staging table (pg_copy).
            self.sql = pg_insert_sql(table.name, cols, STAGE_NAMES[:len(COLUMNS)], STAGE_TABLE, STAGE_NAMES)
            self._copy = CopyConnections(registry.url)
            self.copy_sql = copy_sql(table.name, (*COLUMNS, DAY_COLUMN))
            self.taken_sql = taken_sql(table.name)
            self.shadow_copy_sql = copy_sql(ShadowPrediction.__table__.name, (*SHADOW_COLUMNS, DAY_COLUMN))
            self._when = Timestamps()
            self._shadow_when = Timestamps()  # its own cache: shadow rows are written from another thread
        else:
            self.sql = ""
        shadow, shadow_cols = ShadowPrediction.__table__.name, ", ".join(SHADOW_COLUMNS)
        shadow_conflict = f"ON CONFLICT ({', '.join(shadow_key(self.dialect))}) DO NOTHING"
        if self.dialect == "sqlite":
            self.shadow_sql = self._many_rows(shadow, SHADOW_COLUMNS, shadow_conflict,
                                              {DAY_COLUMN: "substr({created_at}, 1, 10)"})
        elif self.sql:
            self.shadow_sql = (f"INSERT INTO {shadow} ({shadow_cols}, {DAY_COLUMN}) "
                               f"SELECT * FROM {SHADOW_STAGE_TABLE} {shadow_conflict}")
        else:
            self.shadow_sql = ""
        self._last: tuple[float, str] = (-1.0, "")
        self._executor: DaemonThreads | None = None  # writes the second half (_pool)
        self._conflicts = TakenWindow()  # PostgreSQL: predictions by COPY unless an id was taken lately
        self._shadow_conflicts = TakenWindow()  # the same for shadow_predictions
        # request_errors.day (migration 0011: PostgreSQL partitions it by day) goes as the last value.
        errors, n_marks = RequestError.__table__.name, len(_ERROR_COLUMNS) + 1
        marks = ", ".join("?" * n_marks) if self.dialect == "sqlite" else ", ".join(["%s"] * n_marks)
        self.error_sql = f"INSERT INTO {errors} ({', '.join(_ERROR_COLUMNS)}, {DAY_COLUMN}) VALUES ({marks})"

    def _many_rows(self, table: str, columns: Sequence[str], tail: str,
                   computed: dict[str, str] | None = None) -> str:
        """SQLite: the single-row statement's text, its many-row form kept for `_write`."""
        multi = MultiRowInsert(table, columns, tail, computed)
        self._multi[multi.single] = multi
        return multi.single

    def timestamp(self, epoch: float) -> str:
        """created_at for epoch seconds as database-ready text: on SQLite exactly what SQLAlchemy
        writes, built from a per-second prefix (formatting a datetime per row costs ~2 us);
        elsewhere ISO 8601 with offset, which PostgreSQL parses into timestamptz. The caches are
        tuples swapped whole, so the writer thread and a spilling request thread can share them."""
        last_epoch, last_text = self._last
        if epoch == last_epoch:
            return last_text
        if self._fast_ts:
            second = int(epoch)
            sec, prefix = self._second
            if second != sec:
                prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
                self._second = (second, prefix)
            us = min(int((epoch - second) * 1e6 + 0.5), 999_999)
            text = f"{prefix}.{us:06d}"
        else:
            dt = datetime.fromtimestamp(epoch, UTC)
            text = self._ts(dt) if self._ts is not None and self.dialect == "sqlite" else dt.isoformat()
        self._last = (epoch, text)
        return text

    def insert(self, rows: Sequence[Row]) -> int | None:
        """Returns the prediction rows inserted (fewer than given: some request ids were taken; the
        prediction log sorts those out), None when the driver cannot tell."""
        if not rows:
            return 0
        sizes = set(map(len, rows))  # in C: the usual batch is all predictions and costs no loop here
        if sizes == {len(COLUMNS)}:
            params, errors = rows, []
        else:
            rows = [widen(r) for r in rows]
            params = [r for r in rows if len(r) == len(COLUMNS)]
            errors = [(r[0], r[1], r[2], r[3], r[5], r[6], r[8], r[9], r[11], utc_day(r[6])) for r in rows
                      if len(r) == ERROR_FIELDS]
        if not self.sql:
            self._insert_orm(params, errors)
            return None

        if self._copy is None:
            return self._insert_rows(self.sql, params, errors)
        # Neither a statement's NOT EXISTS nor the neighbouring day's look-up sees the batch's own rows:
        # the same id twice in a batch across midnight is kept once here (the first, as ON CONFLICT
        # keeps it within a day).
        return self._conflicts.copy_first(
            lambda: self._copy_rows(params, errors),
            lambda: self._copy_rows(first_of_each_id(params), errors, how="staged"),
            lambda: self._copy_rows(first_of_each_id(params), errors, how="midnight"))

    def _copy_rows(self, params: Sequence[Row], errors: list[tuple[Any, ...]],
                   how: Literal["copy", "midnight", "staged"] = "copy") -> int:
        """PostgreSQL, on the COPY connections, each half's statements bounded by
        registry.copy_conn.deadline. `how`: "copy", the plain path, binary COPY into predictions;
        "midnight", the same COPY without the rows whose ids the neighbouring day stores
        (pg_ids.taken_across_midnight, in the same transaction); "staged", the INSERT that checks ids,
        fed by binary COPY into the connection's staging table (gateway.records.pg_copy.stage_rows)."""
        copy = self._copy
        assert copy is not None

        def write(cur: Any, part: Sequence[Row]) -> int:
            if how == "staged":
                return stage_rows(cur, self.sql, part, self._when)
            if how == "midnight":
                taken = taken_across_midnight(cur, self.taken_sql, part, self._when)
                if taken:
                    part = [r for r in part if r[0] not in taken]
                return copy_rows(cur, self.copy_sql, part, self._when, midnight_ok=True)
            return copy_rows(cur, self.copy_sql, part, self._when)
        return self._batch(copy.connect, params, errors, write,
                           bound=lambda cur: deadline(cur.connection, copy.query_timeout_s))

    def _insert_rows(self, sql: str, params: Sequence[Row], errors: list[tuple[Any, ...]]) -> int:
        """SQLite: `sql` in its many-row form on the engine's connections."""
        return self._batch(self.registry.engine.raw_connection, params, errors,
                           lambda cur, part: self._write(cur, sql, part))

    def _batch(self, connect: Callable[[], Any], params: Sequence[Row], errors: list[tuple[Any, ...]],
               write_part: Callable[[Any, Sequence[Row]], int],
               bound: Callable[[Any], AbstractContextManager[Any]] = lambda cur: nullcontext()) -> int:
        """One transaction on a connection from `connect`: `write_part(cursor, rows)`, then the error
        rows; on PostgreSQL a batch of at least 2 x _PG_PAIR_MIN_ROWS predictions as two halves on two
        connections, committed together (gateway.records.paired_tx). `bound(cursor)` wraps each half's
        statements (the COPY connections' deadline; the engine's connections are bounded by its wait
        callback)."""
        def write(cur: Any, part: Sequence[Row] = params, with_errors: bool = True) -> int:
            with bound(cur):
                n = write_part(cur, part)
                if errors and with_errors:  # rare (a failing version): a plain executemany is fast enough
                    cur.executemany(self.error_sql, errors)
            return n

        if self.dialect != "postgresql" or len(params) < 2 * _PG_PAIR_MIN_ROWS:
            return self._in_transaction(write, connect)
        first, second = halves(params, itemgetter(0))
        return write_both(connect, lambda cur: write(cur, first),
                          lambda cur: write(cur, second, with_errors=False), self._pool())

    def close(self) -> None:
        """Close the idle COPY connections (PostgreSQL); a later insert opens new ones."""
        if self._copy is not None:
            self._copy.close()

    def _pool(self) -> DaemonThreads:
        """Where the second half is written: a daemon thread per batch (paired_tx.DaemonThreads)."""
        if self._executor is None:
            self._executor = DaemonThreads("chimera-log-pair")
        return self._executor

    def insert_shadow(self, rows: Sequence[ShadowRow]) -> int | None:
        """Mirror scores into shadow_predictions, a (request id, version) already stored skipped (a
        replayed lane cannot duplicate). Returns the rows inserted, None when the driver cannot tell."""
        if not rows:
            return 0
        ts = self.timestamp
        if not self.shadow_sql:  # other drivers: through the registry (SQLAlchemy Core)
            self.registry.insert_shadow_predictions([
                PredictionRow(request_id=r[0], model=r[1], version=r[2], score=r[3], latency_ms=r[4],
                              created_at=datetime.fromtimestamp(r[5], UTC)) for r in rows])
            return None
        copy = self._copy
        if copy is None:  # SQLite
            params = [(r[0], r[1], r[2], r[3], r[4], ts(r[5])) for r in rows]
            return self._in_transaction(lambda cur: self._write(cur, self.shadow_sql, params))

        # Binary COPY as for predictions (~9 against ~12-14 us of server CPU a row); a (request id,
        # version) already stored (a lane written twice) goes by the INSERT ... ON CONFLICT, fed by COPY
        # into the connection's staging table (pg_copy.stage_shadow_rows).
        def write(cur: Any, staged: bool = False) -> int:
            with deadline(cur.connection, copy.query_timeout_s):
                if staged:
                    return stage_shadow_rows(cur, self.shadow_sql, rows, self._shadow_when)
                return copy_shadow_rows(cur, self.shadow_copy_sql, rows, self._shadow_when)
        return self._shadow_conflicts.copy_first(
            lambda: self._in_transaction(write, copy.connect),
            lambda: self._in_transaction(lambda cur: write(cur, staged=True), copy.connect))

    def _write(self, cur: Any, sql: str, params: Sequence[tuple[Any, ...]]) -> int:
        """SQLite: statements of many rows each (gateway.records.sqlite_rows)."""
        return self._multi[sql](cur, params) if params else 0

    def _in_transaction(self, write: Callable[[Any], int], connect: Callable[[], Any] | None = None) -> int:
        """Run `write(cursor)` on a connection from `connect` (default: a raw DB-API connection of the
        registry's engine), committed as one transaction (rolled back and re-raised on any error)."""
        conn, inserted = written(connect or self.registry.engine.raw_connection, write)
        end(conn, commit=True)
        return inserted


    def _insert_orm(self, params: list[Row], errors: list[tuple[Any, ...]]) -> None:
        """Other drivers: through SQLAlchemy Core, one transaction."""
        def when(text: str) -> datetime:
            return datetime.fromisoformat(text)

        preds = [dict(zip(COLUMNS, r, strict=True)) for r in params]
        for d in preds:
            d["created_at"] = when(d["created_at"])
            if isinstance(d["features"], str):  # bytes pass as they are: FeatureVector takes both
                d["features"] = json.loads(d["features"])
        errs = [dict(zip((*_ERROR_COLUMNS, DAY_COLUMN), e, strict=True)) for e in errors]
        for d in errs:
            d["created_at"], d["day"] = when(d["created_at"]), date.fromisoformat(d["day"])
        with self.registry.transaction() as s:
            if preds:
                s.execute(pg_insert_ignore(Prediction, s), preds)
            if errs:
                s.execute(insert(RequestError), errs)


def pg_insert_ignore(table: Any, session: Any) -> Any:
    """INSERT ... ON CONFLICT (request_id) DO NOTHING where the dialect has it, else a plain INSERT."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        return insert(table)
    return dialect_insert(table).on_conflict_do_nothing(index_elements=prediction_key(name))


def utc_day(created_at: str) -> str:
    """The UTC date (ISO text) of a row's created_at text, as either backend stores it (SQLite: naive
    UTC; others: ISO 8601 with offset): request_errors.day, which PostgreSQL checks against created_at."""
    dt = datetime.fromisoformat(created_at)
    return (dt if dt.tzinfo is None else dt.astimezone(UTC)).date().isoformat()


def widen(row: Sequence[Any]) -> Row:
    """A row as it is now: a spilled pre-0005 row (8 fields) gets no revision, not pinned, no failover."""
    if len(row) == _OLD_FIELDS:
        return (*row, None, False, None)
    return tuple(row)


def _same_format(processor: Callable[[Any], Any]) -> bool:
    """True when the dialect stores datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's SQLite
    default), so the fast formatter writes exactly what SQLAlchemy would."""
    sample = datetime(2001, 2, 3, 4, 5, 6, 7008, tzinfo=UTC)
    return bool(processor(sample) == "2001-02-03 04:05:06.007008")


def legacy_row(d: dict[str, Any], timestamp: Callable[[float], str]) -> Row:
    created = d.get("created_at")
    epoch = datetime.fromisoformat(created).timestamp() if isinstance(created, str) else time.time()
    feats = d.get("features")
    return (d["request_id"], d["model"], int(d["version"]), d.get("routing_key") or "", float(d["score"]),
            float(d["latency_ms"]), timestamp(epoch), features_json(feats) if feats is not None else None,
            d.get("split_revision"), bool(d.get("pinned", False)), d.get("failed_version"))
