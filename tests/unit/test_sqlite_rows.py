"""The prediction log's many-rows-a-statement INSERT on SQLite (gateway.records.sqlite_rows), on a real
SQLite file: every row stored exactly once whatever the count, ids already taken skipped and counted as
executemany would, rows inserted in the order of their key (the unique index then takes a batch page
by page), and a malformed row refused instead of shifting the values after it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.records.sqlite_rows import MAX_ROWS, MultiRowInsert

COLUMNS = ("request_id", "model", "score")


def _db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "log.db")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, "
                 "model TEXT NOT NULL, score REAL NOT NULL)")
    return conn


def _rows(n: int, start: int = 0) -> list[tuple[str, str, float]]:
    return [(f"r{i}", "m", i / 7) for i in range(start, start + n)]


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 3 * MAX_ROWS + 77])
def test_every_row_is_stored_once_with_its_own_values(tmp_path: Path, n: int) -> None:
    conn = _db(tmp_path)
    insert = MultiRowInsert("p", COLUMNS, "ON CONFLICT (request_id) DO NOTHING")
    with conn:
        assert insert(conn.cursor(), _rows(n)) == n
    stored = conn.execute("SELECT request_id, model, score FROM p ORDER BY id").fetchall()
    assert stored == sorted(_rows(n))  # every row with its own values, inserted in request-id order
    # Bounded statement texts: powers of two up to MAX_ROWS, so the connection's cache keeps them all.
    assert all(k & (k - 1) == 0 and k <= MAX_ROWS for k in insert._statements)


def test_taken_ids_are_skipped_and_not_counted_like_executemany(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    insert = MultiRowInsert("p", COLUMNS, "ON CONFLICT (request_id) DO NOTHING")
    with conn:
        insert(conn.cursor(), _rows(300))
    batch = _rows(100, start=250) + [("r999", "m", 1.0), ("r999", "other", 2.0)]  # 50 taken, 1 twice
    with conn:
        assert insert(conn.cursor(), batch) == 51
    # The same batch row by row gives the same count: the log's duplicate check relies on it.
    ref = sqlite3.connect(":memory:")
    ref.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, "
                "model TEXT NOT NULL, score REAL NOT NULL)")
    ref.executemany(insert.single, _rows(300))
    cur = ref.executemany(insert.single, batch)
    assert cur.rowcount == 51
    assert conn.execute("SELECT model, score FROM p WHERE request_id = 'r999'").fetchone() == ("m", 1.0)
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (351,)


def test_a_row_of_the_wrong_width_is_refused_not_shifted(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    insert = MultiRowInsert("p", COLUMNS)
    rows: list[tuple[object, ...]] = [*_rows(10), ("short", "m"), *_rows(10, start=20)]
    with pytest.raises(ValueError, match="expected 3 values each"):
        insert(conn.cursor(), rows)
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (0,)


def test_a_missing_value_fails_the_statement_as_a_data_error(tmp_path: Path) -> None:
    """A NOT NULL column given None: IntegrityError (what the log's bisection treats as a bad row)."""
    conn = _db(tmp_path)
    insert = MultiRowInsert("p", COLUMNS)
    with pytest.raises(sqlite3.IntegrityError), conn:
        insert(conn.cursor(), [*_rows(5), ("bad", None, 1.0)])
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (0,)


def test_a_sqlite_that_binds_few_variables_gets_smaller_statements(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 20)  # 6 rows of 3 columns at most
    insert = MultiRowInsert("p", COLUMNS)
    assert insert.max_rows(conn.cursor()) == 6
    with conn:
        assert insert(conn.cursor(), _rows(50)) == 50
    assert max(insert._statements) == 4
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (50,)


def test_keys_inside_the_index_go_row_by_row_and_keys_past_its_edge_in_many_row_statements(
        tmp_path: Path) -> None:
    """Many rows a statement only pay where keys are appended at the index's right edge (the gateway's
    time-prefixed ids); random client ids go row by row (the module docstring's measurements). The
    statements SQLite ran, from its own trace, show which way each call went."""
    conn = _db(tmp_path)
    ran: list[str] = []
    conn.set_trace_callback(ran.append)
    insert = MultiRowInsert("p", COLUMNS, "ON CONFLICT (request_id) DO NOTHING")

    def call(prefix: str) -> tuple[int, int]:
        ran.clear()
        rows = [(f"{prefix}{i:03d}", "m", float(i)) for i in (7, 3, 9, 1, 5, 0, 8, 2, 6, 4)]  # unsorted
        with conn:
            assert insert(conn.cursor(), rows) == 10
        inserts = [q for q in ran if q.startswith("INSERT")]
        return len(inserts), sum(q.count("), (") + 1 for q in inserts)

    assert call("b") == (2, 10)   # the first call: 8 + 2 rows in two statements
    assert call("a") == (10, 10)  # every key before the last call's largest: one statement a row
    assert call("c") == (2, 10)   # past the edge again
    ids = [r[0] for r in conn.execute("SELECT request_id FROM p ORDER BY id")]
    assert ids == sorted(ids[:10]) + sorted(ids[10:20]) + sorted(ids[20:])  # each call in key order
