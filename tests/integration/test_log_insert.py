"""The prediction log's bulk insert on both backends (issue 17: on PostgreSQL binary COPY until an id is
taken, then binary COPY into a staging table and INSERT ... SELECT with ON CONFLICT): what is stored is
exactly what was logged, whatever the text holds, ids already stored are skipped and counted, and a row the
database refuses fails the whole statement as a data error (so the row store bisects it out)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import select

from gateway.records.inserter import Inserter
from gateway.records.spill import is_data_error
from registry.models import Prediction
from tests.harness import midday


def _rows(ts: str, numpy: bool) -> list[tuple]:
    """numpy scalars where the gateway may hand them over (PostgreSQL prints them into the arrays with
    str(); SQLite's driver would store a numpy int as a blob, so the SQLite rows use Python numbers)."""
    i64, f32, f64, b = (np.int64, np.float32, np.float64, np.bool_) if numpy else (int, float, float, bool)
    return [
        ("edge-1", "m", 1, 'a"b\\c,{}\tx\ny é', 0.125, 1.0, ts, "[1,2.5]", None, False, None),
        ("edge-2", "m", i64(2), "", 0.5, f32(0.25), ts, None, 7, b(True), 1),
        ("edge-3", "m", 1, "NULL", f64(0.75), 2.0, ts, "[]", 1, True, None),
        ("edge-4", "m", 1, "k", 1e-300, 3.5, ts, "[3.40282347e+38,-0]", None, False, None),
    ]


def test_rows_round_trip_exactly_and_duplicates_are_skipped(registry) -> None:  # noqa: ANN001
    ins = Inserter(registry)
    ts = ins.timestamp(midday())
    rows = _rows(ts, numpy=registry.engine.dialect.name == "postgresql")
    assert ins.insert(rows) == 4
    assert ins.insert(rows) == 0  # every id taken: skipped, counted as not inserted
    assert ins.insert([*rows[:2], ("edge-5", "m", 1, "k", 0.1, 1.0, ts, None, None, False, None)]) == 1
    with registry.session() as s:
        got = {r.request_id: r for r in s.scalars(select(Prediction).where(Prediction.model == "m"))}
    assert sorted(got) == ["edge-1", "edge-2", "edge-3", "edge-4", "edge-5"]
    assert got["edge-1"].routing_key == 'a"b\\c,{}\tx\ny é'
    assert got["edge-1"].features == [1, 2.5] and got["edge-1"].split_revision is None
    assert (got["edge-2"].version, got["edge-2"].routing_key, got["edge-2"].latency_ms) == (2, "", 0.25)
    assert got["edge-2"].features is None and got["edge-2"].pinned is True
    assert got["edge-2"].failed_version == 1
    assert got["edge-3"].routing_key == "NULL" and got["edge-3"].features == []
    # JSON text is stored as it is on SQLite; PostgreSQL's bytea column (0008) packs it to float32 first.
    big = 3.40282347e38 if registry.engine.dialect.name == "sqlite" else 3.4028235e38
    assert got["edge-4"].score == 1e-300 and got["edge-4"].features == [big, 0]


def test_a_time_without_offset_is_stored_as_that_utc_time(registry) -> None:  # noqa: ANN001
    """A spill line written by a gateway on SQLite carries created_at as SQLite's text, UTC without an
    offset; replayed into PostgreSQL (the registry moved) it is stored at that UTC time, not refused as
    a bad row (binary COPY needs an aware time)."""
    ins = Inserter(registry)
    assert ins.insert([("naive-1", "m", 1, "k", 0.5, 1.0, "2026-01-02 03:04:05.678901", None, None, False,
                        None)]) == 1
    with registry.session() as s:
        got = s.scalar(select(Prediction.created_at).where(Prediction.request_id == "naive-1"))
    assert got.replace(tzinfo=got.tzinfo or UTC) == datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.mark.parametrize("bad", [
    ("bad-nul", "m", 1, "a\x00b", 0.5, 1.0, None, None, None, False, None),  # PostgreSQL refuses NUL
    ("bad-len", "m", 1, "k" * 300, 0.5, 1.0, None, None, None, False, None),  # routing_key is 256 at most
])
def test_a_refused_row_fails_its_statement_as_a_data_error(registry, bad: tuple) -> None:  # noqa: ANN001
    ins = Inserter(registry)
    if registry.engine.dialect.name == "sqlite":
        pytest.skip("SQLite stores NUL and ignores VARCHAR lengths")
    ts = ins.timestamp(midday())
    good = ("good-1", "m", 1, "k", 0.5, 1.0, ts, None, None, False, None)
    with pytest.raises(Exception) as err:
        ins.insert([good, (*bad[:6], ts, *bad[7:])])
    assert is_data_error(err.value)
    with registry.session() as s:  # nothing of the statement was stored
        assert s.scalar(select(Prediction.id).where(Prediction.request_id == "good-1")) is None


def test_mirror_scores_round_trip_per_version_and_replays_are_skipped(registry) -> None:  # noqa: ANN001
    """ShadowMirror's rows (gateway.serving.shadow) through the same fast path: one row per (request id,
    version), so a canary row keeps production's score (its covariate) beside a shadow version's; a
    lane written twice stores nothing new; created_at is the epoch given, in UTC."""
    from registry.models import ShadowPrediction

    ins = Inserter(registry)
    now = time.time()
    rows = [("s-1", "m", 1, 0.25, 1.5, now), ("s-1", "m", 3, 0.75, 2.0, now),
            ('s-"2\\', "m", 1, 1e-300, 0.0, now)]
    assert ins.insert_shadow(rows) == 3
    assert ins.insert_shadow(rows) == 0
    if registry.engine.dialect.name == "postgresql":  # the lane went in by COPY, the repeat by ON CONFLICT
        assert ins._shadow_conflicts.until > time.monotonic()
    assert ins.insert_shadow([("s-1", "m", 1, 0.5, 1.0, now), ("s-3", "m", 3, 0.5, 1.0, now)]) == 1
    with registry.session() as s:
        got = {(r.request_id, r.version): r for r in s.scalars(select(ShadowPrediction))}
    assert sorted(got) == [('s-"2\\', 1), ("s-1", 1), ("s-1", 3), ("s-3", 3)]
    assert got["s-1", 1].score == 0.25 and got["s-1", 3].score == 0.75  # the first write of each pair
    assert got['s-"2\\', 1].score == 1e-300 and got["s-1", 3].latency_ms == 2.0
    stored = got["s-1", 1].created_at
    stored = stored if stored.tzinfo else stored.replace(tzinfo=UTC)
    assert abs(stored.timestamp() - now) < 1e-3


def test_feature_rows_read_back_as_the_scored_float32_values(registry) -> None:  # noqa: ANN001
    """The log writes feature rows as packed float32 vectors on both backends (PostgreSQL's column is
    bytea since migration 0008); JSON text (older SQLite rows, replayed spill lines) is taken too, and
    every form reads back the floats the model scored; `portable` (spill and dead-letter lines) turns
    packed rows into JSON text that reads back the same."""
    import json

    from gateway.records.inserter import portable

    ins = Inserter(registry)
    x = np.array([[0.1, -2.5, 3.4028235e38, -0.0], [0.0, 1e-7, 7.0, 123456.79]], dtype=np.float32)
    encoded = ins.encode_matrix(x)
    assert all(isinstance(e, bytes) for e in encoded)
    ts = ins.timestamp(midday())
    rows = [(f"f-{i}", "m", 1, "", 0.5, 1.0, ts, encoded[i], None, False, None) for i in range(2)]
    rows.append(("f-json", "m", 1, "", 0.5, 1.0, ts, "[1.5,2]", None, False, None))  # older rows: text
    assert ins.insert(rows) == 3
    with registry.session() as s:
        got = dict(s.execute(select(Prediction.request_id, Prediction.features)
                             .where(Prediction.model == "m")).tuples().all())
    # Both forms read back as the JSON text would: the shortest decimal of each float32 (0.1, not
    # 0.10000000149011612), so a reader cannot tell which form a row was stored in.
    assert got["f-0"] == [0.1, -2.5, 3.4028235e38, -0.0] and got["f-1"] == [0.0, 1e-7, 7.0, 123456.79]
    assert got["f-json"] == [1.5, 2]
    assert all(np.array(got[f"f-{i}"], dtype=np.float32).tobytes() == x[i].tobytes() for i in range(2))
    lines = portable(rows)
    assert all(isinstance(r[7], str) for r in lines) and lines[2] == rows[2]
    assert json.loads(lines[0][7]) == got["f-0"]
    assert lines[0][:7] == rows[0][:7] and lines[0][8:] == rows[0][8:]


def test_postgresql_batches_skip_on_conflict_until_an_id_is_taken(registry) -> None:  # noqa: ANN001
    """PostgreSQL: a batch goes in as a plain INSERT (ON CONFLICT costs ~2 us a row even when nothing
    conflicts); a taken id rolls it back and writes it again with ON CONFLICT, as every batch for a
    while after, so the answer is the same as ON CONFLICT's and a reused id costs one retry a minute."""
    if registry.engine.dialect.name != "postgresql":
        pytest.skip("SQLite always uses ON CONFLICT (the plain-COPY window is PostgreSQL's)")
    ins = Inserter(registry)
    ts = ins.timestamp(midday())
    row = ("c-1", "m", 1, "k", 0.5, 1.0, ts, None, None, False, None)
    assert ins.insert([row]) == 1 and ins._conflicts.until == 0.0
    assert ins.insert([row, (*row[:1], "m", 1, "k", 0.5, 1.0, ts, None, None, False, None)]) == 0
    assert ins._conflicts.until > time.monotonic() + 30
    assert ins.insert([("c-2", *row[1:]), ("c-2", *row[1:])]) == 1  # a batch's own repeat is skipped too
    fresh = Inserter(registry)
    assert fresh.insert([("c-3", *row[1:]), ("c-3", *row[1:])]) == 1 and fresh._conflicts.until > 0


# 12:00 UTC goes by COPY; 23:55 UTC by COPY after a look-up of the neighbouring day
# (gateway.records.pg_ids.taken_across_midnight); after a replayed id, by the INSERT that checks ids, fed
# through the connection's staging table (gateway.records.pg_copy.stage_rows).
@pytest.mark.parametrize("path", ["copy", "near midnight", "staged insert"])
def test_a_big_postgresql_batch_in_two_halves_is_stored_whole_or_not_at_all(registry, path: str) -> None:  # noqa: ANN001
    """PostgreSQL writes a batch of 2,000+ rows as two halves on two connections, committed together
    (gateway.records.paired_tx): all rows stored with their features; a refused row in either half
    (a NUL byte; a routing key longer than its column, which the staging table's own column does not
    refuse, the INSERT from it does) stores nothing (a data error, so the row store bisects it out); a
    repeated id shares its half."""
    if registry.engine.dialect.name != "postgresql":
        pytest.skip("SQLite: one connection writes")
    ins = Inserter(registry)
    ts = ins.timestamp(midday() + (11 * 3600 + 55 * 60 if path == "near midnight" else 0))
    if path == "staged insert":  # a replay: the next minute's batches go by the staged INSERT
        replay = ("replayed", "other", 1, "k", 0.5, 1.0, ts, None, None, False, None)
        assert ins.insert([replay]) == 1 and ins.insert([replay]) == 0
    feats = ins.encode_matrix(np.arange(2500 * 4, dtype=np.float32).reshape(2500, 4))
    rows = [(f"h-{i}", "m", 1, "k", 0.5, 1.0, ts, feats[i], None, False, None) for i in range(2500)]
    for at, key in ((1200, "a\x00b"), (2400, "k" * 300)):
        bad = [*rows[:at], ("h-bad", "m", 1, key, 0.5, 1.0, ts, None, None, False, None), *rows[at:]]
        with pytest.raises(Exception) as err:
            ins.insert(bad)
        assert is_data_error(err.value), err.value
        with registry.session() as s:
            assert s.scalar(select(Prediction.id).where(Prediction.model == "m").limit(1)) is None
    assert ins.insert([*rows, rows[7]]) == 2500
    with registry.session() as s:
        got = dict(s.execute(select(Prediction.request_id, Prediction.features)
                             .where(Prediction.model == "m")).tuples().all())
    assert len(got) == 2500 and got["h-2499"] == [9996.0, 9997.0, 9998.0, 9999.0]


@pytest.mark.parametrize("table", ["predictions", "shadow_predictions"])
def test_copy_types_are_the_columns_own(registry, table: str) -> None:  # noqa: ANN001
    """Binary COPY has no casts: an element type that is not the column's own makes the server refuse
    every row as bad data (22P03), and the log would dead-letter them all. So a migration that changes a
    column's type must change gateway.records.pg_copy.COLUMN_TYPES (or SHADOW_COLUMN_TYPES) too; this
    keeps them together."""
    if registry.engine.dialect.name != "postgresql":
        pytest.skip("binary COPY is PostgreSQL's path")
    from sqlalchemy import text

    from gateway.records.inserter import COLUMNS, SHADOW_COLUMNS
    from gateway.records.pg_copy import COPY_TYPES, DAY_COLUMN, SHADOW_COLUMN_TYPES

    columns, column_types = (((*COLUMNS, DAY_COLUMN), COPY_TYPES) if table == "predictions"
                             else (SHADOW_COLUMNS, SHADOW_COLUMN_TYPES))
    with registry.session() as s:
        types = dict(s.execute(text(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
            f"WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped")).all())
    same = {"varchar": {"character varying"}, "int4": {"integer"}, "int8": {"bigint"},
            "float8": {"double precision"}, "bool": {"boolean"}, "bytea": {"bytea"},
            "timestamptz": {"timestamp with time zone"}, "date": {"date"}}
    wrong = {c: (t, types[c]) for c, t in zip(columns, column_types, strict=True) if types[c] not in same[t]}
    assert wrong == {}


def test_copy_connections_dropped_by_the_server_are_replaced_before_the_next_batch(registry) -> None:  # noqa: ANN001
    """After a PostgreSQL restart or failover the log's idle COPY connections are dead sockets; the next
    batch must be written on fresh ones, not fail and go to the spill file for a later replay."""
    if registry.engine.dialect.name != "postgresql":
        pytest.skip("binary COPY is PostgreSQL's path")
    from sqlalchemy import text

    ins = Inserter(registry)
    assert ins._copy is not None
    ins._copy.ping_after_s = 0.0  # the writer pings connections idle for 5 s; here, every one
    ts = ins.timestamp(midday())

    def rows(tag: str) -> list[tuple]:
        return [(f"{tag}-{i}", "m", 1, "k", 0.5, 1.0, ts, None, None, False, None) for i in range(3000)]

    assert ins.insert(rows("first")) == 3000  # two COPY connections, now idle in the pool
    with registry.engine.connect() as c:  # what a restart does to them
        ended = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                               "pid <> pg_backend_pid() AND datname = current_database() AND "
                               "application_name = '' AND state = 'idle'")).scalar()
    assert ended >= 2
    assert ins.insert(rows("second")) == 3000
    ins.close()


def test_without_the_temporary_privilege_only_the_checked_insert_fails_and_as_the_database_not_the_rows(
        registry) -> None:  # noqa: ANN001
    """PostgreSQL: the INSERT that checks ids reads its batch from a TEMP table of the connection
    (gateway.records.pg_copy.stage_rows), so the registry's role needs the TEMPORARY privilege on the
    database (PUBLIC has it unless revoked; README, PostgreSQL). Without it, batches by COPY are stored as
    before, near midnight too (COPY after a look-up of the neighbouring day), and a batch that needs the
    check (an id already stored: a replay) fails with PostgreSQL's "permission denied" named — as the
    database refusing, not as bad rows: the log keeps such rows (spill) instead of dead-lettering them."""
    if registry.engine.dialect.name != "postgresql":
        pytest.skip("TEMP tables and their privilege are PostgreSQL's")
    from sqlalchemy import make_url, text

    from registry import Registry

    role = "chimera_no_temp"
    db = make_url(registry.url).database
    with registry.engine.begin() as conn:
        conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC'))
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    limited = Registry(make_url(registry.url).set(username=role).render_as_string(hide_password=False))
    ins = Inserter(limited)
    try:
        noon, late = ins.timestamp(midday()), ins.timestamp(midday() + 11 * 3600 + 55 * 60)
        assert ins.insert([("t-1", "m", 1, "k", 0.5, 1.0, noon, None, None, False, None)]) == 1
        assert ins.insert([("t-2", "m", 1, "k", 0.5, 1.0, late, None, None, False, None)]) == 1
        with pytest.raises(Exception) as err:
            ins.insert([("t-1", "m", 1, "k", 0.5, 1.0, noon, None, None, False, None),
                        ("t-3", "m", 1, "k", 0.5, 1.0, noon, None, None, False, None)])
        assert "permission denied" in str(err.value) and "temporary" in str(err.value), err.value
        assert not is_data_error(err.value)
    finally:
        ins.close()
        limited.dispose()
        with registry.engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
    with registry.session() as s:
        assert set(s.scalars(select(Prediction.request_id))) == {"t-1", "t-2"}
