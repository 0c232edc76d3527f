"""PostgreSQL's request-id rules for the prediction log's writer (gateway.records.inserter): when a batch
may go by binary COPY, and the INSERT that keeps ids unique when it may not (fed by binary COPY into a
staging table: gateway.records.pg_copy.stage_rows). Split from the inserter
(the statements and connections) because these are the rules an auditor asks about: a request id is
stored once per UTC day (UNIQUE (request_id, day): migration 0009 partitions the log by day) and once
across midnight, within pg_copy.SAME_ID_WINDOW_MIN minutes either side.

Why COPY first: ON CONFLICT DO NOTHING costs ~2 us a row of server CPU even when nothing conflicts (a
unique-index probe before each row's speculative insert; measured on 5,000-row statements: 11.9 -> 13.9
us a row), and COPY has no such clause. A unique violation (23505) rolls a COPY back and the batch is
written again by the INSERT, as is every batch for the next CONFLICT_MODE_S seconds (TakenWindow). The
INSERT reads the batch from the connection's staging table, so it costs the COPY plus the ON CONFLICT
probe (and, near midnight, the neighbouring day's), not a parse of array literals.

Near midnight (pg_copy.NearMidnight) a batch still goes by COPY, after one SELECT in the same transaction
looks its near-midnight ids up on the neighbouring day (`taken_across_midnight`) and the batch drops the
ones found and its own repeats. Until 2026-12-06 such a batch went by the staged INSERT, which held the
log below 100k rows/s for that half hour (docs/performance.md, "Time partitioning", point 2).

Concurrency: two writers (gateway processes) storing the same id on both sides of midnight at the same
moment can both store it, by either path: each checks the neighbouring day before the other commits
(READ COMMITTED; no unique key spans two days). A client's retry comes after an answer, so after the
first row was committed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from gateway.records.pg_copy import DAY_COLUMN, EARLY, LATE, NearMidnight, Timestamps

UNIQUE_VIOLATION = "23505"
CONFLICT_MODE_S = 60.0


def pg_insert_sql(table: str, cols: str, picks: Sequence[str], source: str, names: Sequence[str]) -> str:
    """The INSERT that checks ids on PostgreSQL (migration 0009: partitioned by day), reading the batch
    from `source` (the staging table, gateway.records.pg_copy.stage_rows) under the column names `names`.
    Each row's day is its created_at's UTC date; ON CONFLICT takes a request id already stored on that
    day, and a row within pg_copy.SAME_ID_WINDOW_MIN minutes of midnight is also skipped when its id is
    stored on the neighbouring day (a retry that crossed 00:00 UTC, in either order). `picks` are the
    values of the table's `cols`: names[0] is the request id, names[6] created_at."""
    rid, ts = names[0], names[6]
    return (f"INSERT INTO {table} ({cols}, {DAY_COLUMN}) SELECT {', '.join(picks)}, d "
            f"FROM (SELECT *, ({ts} AT TIME ZONE 'UTC')::date AS d, ({ts} AT TIME ZONE 'UTC')::time AS t "
            f"FROM {source} AS u({', '.join(names)})) AS r "
            f"WHERE (t >= '{EARLY}' AND t < '{LATE}') OR NOT EXISTS (SELECT 1 FROM {table} p "
            f"WHERE p.request_id = r.{rid} "
            f"AND p.{DAY_COLUMN} = CASE WHEN t < '{EARLY}' THEN d - 1 ELSE d + 1 END) "
            f"ON CONFLICT (request_id, {DAY_COLUMN}) DO NOTHING")


# The ids of a look-up go as one text split by the server (string_to_array): ~0.09 us an id against
# ~1.1 us for a list, which psycopg dumps element by element (measured, 2,500 ids). The separator is the
# ASCII unit separator; a batch whose ids hold it (request ids may hold any character but NUL), or a
# lone empty id, goes as a list.
_SEP = "\x1f"


def taken_sql(table: str) -> tuple[str, str]:
    """The look-ups of `taken_across_midnight`: which request ids `table` stores on one day (its
    partition's (request_id, day) index); the ids as one text joined by _SEP, and as a list."""
    head = f"SELECT request_id FROM {table} WHERE {DAY_COLUMN} = %s AND request_id = ANY("
    return head + f"string_to_array(%s, chr({ord(_SEP)})))", head + "%s)"


def taken_across_midnight(cur: Any, sql: tuple[str, str], rows: Sequence[Sequence[Any]],
                          when: Timestamps) -> set[str]:
    """The request ids of `rows` (the prediction log's rows) answered within pg_copy.SAME_ID_WINDOW_MIN
    minutes of midnight that are already stored on the neighbouring day, by `sql` (taken_sql) on `cur`:
    one statement per neighbouring day (at most two), in the caller's transaction. The caller leaves
    them out of its COPY, as the INSERT's NOT EXISTS (pg_insert_sql) leaves them out."""
    by_day: dict[date, list[str]] = {}
    dated = when.dated
    for r in rows:
        other = dated(r[6])[2]
        if other is not None:
            by_day.setdefault(other, []).append(r[0])
    joined_sql, list_sql = sql
    taken: set[str] = set()
    for day, ids in by_day.items():
        joined = _SEP.join(ids)
        if joined and joined.count(_SEP) == len(ids) - 1:  # "" would split to no id at all
            cur.execute(joined_sql, (day, joined))
        else:
            cur.execute(list_sql, (day, ids))
        taken.update(t[0] for t in cur.fetchall())
    return taken


class TakenWindow:
    """PostgreSQL's rule for one table: COPY first. A batch with a row near midnight (NearMidnight) goes
    by `near_midnight` when given (COPY after its ids were checked against the neighbouring day), as does
    every batch for the next CONFLICT_MODE_S seconds (a batch without such rows costs that path no
    statement, and the COPY attempt that would find them is saved), else by the INSERT, which checks them
    itself. A unique violation (a key stored already: a replay, a reused client id, a lane written twice)
    rolls the COPY back, and that batch and every batch for the next CONFLICT_MODE_S seconds go through
    the INSERT ... ON CONFLICT DO NOTHING, so keys reused on purpose cost one retry a minute."""

    def __init__(self) -> None:
        self.until = 0.0  # monotonic time until which batches skip COPY
        self.near_until = 0.0  # monotonic time until which batches go by `near_midnight` when given

    def copy_first(self, copy: Callable[[], int], plain: Callable[[], int],
                   near_midnight: Callable[[], int] | None = None) -> int:
        now = time.monotonic()
        if now >= self.until:
            try:
                if near_midnight is not None and now < self.near_until:
                    return near_midnight()
                try:
                    return copy()
                except NearMidnight:  # ids to check against the neighbouring day: not a conflict
                    if near_midnight is None:
                        return plain()
                    self.near_until = time.monotonic() + CONFLICT_MODE_S
                    return near_midnight()
            except Exception as exc:
                if (getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)) != UNIQUE_VIOLATION:
                    raise
                self.until = time.monotonic() + CONFLICT_MODE_S
        return plain()


def first_of_each_id(rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
    """`rows` without the later rows of a request id that occurs more than once (as they were when none
    does)."""
    firsts: dict[Any, Sequence[Any]] = {}
    for r in rows:
        firsts.setdefault(r[0], r)
    return rows if len(firsts) == len(rows) else list(firsts.values())
