"""The prediction log's bulk INSERT on SQLite: many rows per statement (issue 17).

Why: `executemany` runs one statement per row. Each row then pays a statement step, and CPython's sqlite3
releases and takes back the GIL around every step, so the writer thread and the event loop hand the GIL
to each other once a row. One `INSERT ... VALUES (...), (...), ...` of up to `MAX_ROWS` rows binds the
same values in one call and steps once. Measured on this machine (300k rows of 11 columns into the
predictions table's schema and indexes, 5,000-row transactions, WAL): executemany 3.89 us of CPU a row,
100 rows a statement 2.82 us, 500 rows 2.74 us (/work/sim/sqcost.py at the time; the `make bench`
packed case is the end-to-end measurement, docs/performance.md).

What stays the same: the statement text is the single-row INSERT with its conflict clause, repeated;
`ON CONFLICT ... DO NOTHING` skips a taken id in a multi-row statement as it does row by row (also a
second row with the same id in one statement), and `rowcount` is the number of rows inserted, which
the log's duplicate check reads. An error (a NOT NULL value missing) fails the statement, and the
caller's transaction is rolled back as before; the log's bisection then finds the row.

No library does this: the DB-API's `executemany` is the row-by-row loop, and SQLAlchemy's multi-values
insert builds its statement with Python per row (slower than executemany)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

MAX_ROWS = 256  # rows a statement: 2.74-2.82 us a row between 100 and 500 rows, so a round number


class MultiRowInsert:
    """`INSERT INTO <table> (<columns>) VALUES (?, ...), ... <tail>` for any number of rows, cut into
    statements of a power-of-two row count (at most log2(MAX_ROWS) + 1 distinct statements, so the
    connection's statement cache keeps them all prepared)."""

    def __init__(self, table: str, columns: Sequence[str], tail: str = "") -> None:
        self.head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        self.row = "(" + ", ".join("?" * len(columns)) + ")"
        self.tail = f" {tail}" if tail else ""
        self.columns = len(columns)
        self._statements: dict[int, str] = {}

    @property
    def single(self) -> str:
        """The one-row statement (what `executemany` would run)."""
        return self.statement(1)

    def statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = self.head + ", ".join([self.row] * rows) + self.tail
        return sql

    def max_rows(self, cur: Any) -> int:
        """MAX_ROWS, or fewer when this SQLite binds fewer variables a statement (999 before 3.32)."""
        limit = 999
        conn = getattr(cur, "connection", None)
        conn = getattr(conn, "driver_connection", conn)
        if isinstance(conn, sqlite3.Connection):
            limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        elif sqlite3.sqlite_version_info >= (3, 32, 0):
            limit = 32_766
        return max(1, min(MAX_ROWS, limit // self.columns))

    def __call__(self, cur: Any, rows: Sequence[Sequence[Any]]) -> int:
        """Insert `rows` (tuples in column order) on `cur`; returns the rows inserted."""
        inserted = 0
        width = self.columns
        step = self.max_rows(cur)
        i, n = 0, len(rows)
        while i < n:
            k = min(step, n - i)
            k = 1 << (k.bit_length() - 1)  # the largest power of two that fits
            values = list(chain.from_iterable(rows[i:i + k]))
            if len(values) != k * width:  # a row of the wrong width would shift every value after it
                raise ValueError(f"rows {i}..{i + k - 1}: expected {width} values each")
            cur.execute(self.statement(k), values)
            inserted += cur.rowcount
            i += k
        return inserted
