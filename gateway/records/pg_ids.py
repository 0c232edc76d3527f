"""PostgreSQL's request-id rules for the prediction log's writer (gateway.records.inserter): when a batch
may go by binary COPY, and the INSERT that keeps ids unique when it may not (fed by binary COPY into a
staging table: gateway.records.pg_copy.stage_rows). Split from the inserter
(the statements and connections) because these are the rules an auditor asks about: a request id is
stored once per UTC day (UNIQUE (request_id, day): migration 0009 partitions the log by day) and once
across midnight, within pg_copy.SAME_ID_WINDOW_MIN minutes either side.

Why COPY first: ON CONFLICT DO NOTHING costs ~2 us a row of server CPU even when nothing conflicts (a
unique-index probe before each row's speculative insert; measured on 5,000-row statements: 11.9 -> 13.9
us a row), and COPY has no such clause. A unique violation (23505) rolls a COPY back and the batch is
written again by the INSERT, as is every batch for the next CONFLICT_MODE_S seconds (TakenWindow); a
batch with a row near midnight goes by the INSERT too (pg_copy.NearMidnight). The INSERT reads the
batch from the connection's staging table, so it costs the COPY plus the ON CONFLICT probe (and, near
midnight, the neighbouring day's), not a parse of array literals."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.records.pg_copy import DAY_COLUMN, EARLY, LATE, NearMidnight

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


class TakenWindow:
    """PostgreSQL's rule for one table: COPY first. A batch with a row near midnight (NearMidnight) goes
    by the INSERT, which checks the neighbouring day. A unique violation (a key stored already: a
    replay, a reused client id, a lane written twice) rolls the COPY back, and that batch and every batch
    for the next CONFLICT_MODE_S seconds go through the INSERT ... ON CONFLICT DO NOTHING, so keys
    reused on purpose cost one retry a minute."""

    def __init__(self) -> None:
        self.until = 0.0  # monotonic time until which batches skip COPY

    def copy_first(self, copy: Callable[[], int], plain: Callable[[], int]) -> int:
        if time.monotonic() >= self.until:
            try:
                return copy()
            except NearMidnight:  # ids checked against the neighbouring day: not a conflict
                return plain()
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
