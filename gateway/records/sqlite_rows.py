"""The prediction log's bulk INSERT on SQLite: many rows per statement (issue 17).

Why: `executemany` runs one statement per row. Each row then pays a statement step, and CPython's sqlite3
releases and takes back the GIL around every step, so the writer thread and the event loop hand the GIL
to each other once a row. One `INSERT ... VALUES (...), (...), ...` of up to `MAX_ROWS` rows binds the
same values in one call and steps once. Measured on this machine (300k rows of 11 columns into the
predictions table's schema and indexes, 5,000-row transactions, WAL): executemany 3.89 us of CPU a row,
100 rows a statement 2.82 us, 500 rows 2.74 us (a standalone sqlite3 loop; the `make bench` packed
case is the end-to-end measurement, docs/performance.md).

Which rows go that way: the measurement depends on where the keys land in the unique index. Ids that
arrive in increasing order (the gateway's own, time-prefixed: gateway.serving.rows.RequestIds) are
appended at the index's right edge, and there many rows a statement win as above. Ids chosen by clients
are often random (UUIDs), and there a statement of many rows costs more than one a row once the index is
larger than SQLite's page cache: 2M random 32-hex ids in 5,120-row batches, 16.35 us a row with
executemany, 15.69 with executemany in key order, 18.03 with many rows a statement in key order. So each
call sorts its rows by their first column (the log's request id, the unique index's leading column: the
index then takes a batch page by page, +0.15 us a row to sort), and uses many rows a statement when at
least half of them sort after the largest key of its previous call, executemany otherwise.

What stays the same: the statement text is the single-row INSERT with its conflict clause, repeated;
`ON CONFLICT ... DO NOTHING` skips a taken id in a multi-row statement as it does row by row (also a
second row with the same id in one statement), and `rowcount` is the number of rows inserted, which
the log's duplicate check reads. An error (a NOT NULL value missing) fails the statement, and the
caller's transaction is rolled back as before; the log's bisection then finds the row.

No library does this: the DB-API's `executemany` is the row-by-row loop, and SQLAlchemy's multi-values
insert builds its statement with Python per row (slower than executemany)."""

from __future__ import annotations

import sqlite3
from bisect import bisect_right
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

MAX_ROWS = 256  # rows a statement: 2.74-2.82 us a row between 100 and 500 rows, so a round number
_FIRST = itemgetter(0)


class MultiRowInsert:
    """`INSERT INTO <table> (<columns>) VALUES (?, ...), ... <tail>` for any number of rows, cut into
    statements of a power-of-two row count (at most log2(MAX_ROWS) + 1 distinct statements, so the
    connection's statement cache keeps them all prepared)."""

    def __init__(self, table: str, columns: Sequence[str], tail: str = "",
                 computed: dict[str, str] | None = None) -> None:
        """`computed`: more columns, each an SQL expression of the row's values, `{column}` standing for
        one of `columns` (the prediction log's day from created_at). Parameters are numbered (?NNN), so
        an expression reuses a value without the caller binding it twice."""
        computed = computed or {}
        self.head = f"INSERT INTO {table} ({', '.join([*columns, *computed])}) VALUES "
        self._computed = list(computed.values())
        self._names = list(columns)
        self.tail = f" {tail}" if tail else ""
        self.columns = len(columns)
        self._statements: dict[int, str] = {}
        self._edge: Any = None  # the largest first-column value of the previous call

    @property
    def single(self) -> str:
        """The one-row statement (what `executemany` would run)."""
        return self.statement(1)

    def statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = self.head + ", ".join(map(self._row, range(rows))) + self.tail
        return sql

    def _row(self, k: int) -> str:
        """Row `k`'s value list: its parameters ?(k * columns + 1) on, then the computed columns."""
        marks = {name: f"?{k * self.columns + i + 1}" for i, name in enumerate(self._names)}
        return "(" + ", ".join([*marks.values(), *(e.format(**marks) for e in self._computed)]) + ")"

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
        """Insert `rows` (tuples in column order) on `cur`, in the order of their first column; returns
        the rows inserted."""
        if not rows:
            return 0
        width = self.columns
        if set(map(len, rows)) != {width}:  # a row of the wrong width would shift every value after it
            raise ValueError(f"rows: expected {width} values each")
        rows = sorted(rows, key=_FIRST)
        edge, self._edge = self._edge, rows[-1][0]
        if edge is not None and 2 * (len(rows) - bisect_right(rows, edge, key=_FIRST)) < len(rows):
            cur.executemany(self.single, rows)  # mostly inside the index: row by row (module docstring)
            return int(cur.rowcount)
        inserted = 0
        step = self.max_rows(cur)
        i, n = 0, len(rows)
        while i < n:
            k = min(step, n - i)
            k = 1 << (k.bit_length() - 1)  # the largest power of two that fits
            cur.execute(self.statement(k), list(chain.from_iterable(rows[i:i + k])))
            inserted += cur.rowcount
            i += k
        return inserted
