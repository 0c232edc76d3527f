"""Every range read of the prediction log reads only the days of its range (registry.models.logged_between,
and for the mirror scores paired with it, registry.models.mirrored_with).

On PostgreSQL `predictions` is one table a UTC day (migration 0009), and the planner prunes partitions by
the partition key only: a read whose range is on created_at alone is planned against every day kept (90
index probes and 90 plan nodes for a rollout look that reads one day, with 90 days kept). Here six day
tables hold rows, and every reader a user runs — the rollout's look and arm reads, the paired shadow
evaluation, the shadow report, retraining's served rows, `chimera log export`, `chimera log prune
--model` and its dry run — is recorded statement by statement and each statement that reads predictions
is EXPLAINed with its own values: the plan may name only the partitions whose days meet the read's
range, of predictions, shadow_predictions and request_errors (the last two partitioned alike since
migration 0011) and outcomes (by its prediction's day since 0012, registry.models.outcome_of). The same
calls on SQLite (one table) must return the same rows, which is checked on both."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select

from chimera.cli.log import export_rows
from chimera.cli.log_retention import count_rows, prune_rows
from registry import Registry
from registry.models import Prediction, ShadowPrediction
from registry.partitions import PARENTS, ensure_days, partitions_of
from registry.rollouts import arm_rows, insert_rollout_rows, look_rows
from registry.shadow_eval import paired_rows
from registry.shadow_rows import shadow_rows
from registry.training_runs import served_rows

DAY = timedelta(days=1)
HOURS = (3, 9, 15, 21)
_TABLES = "(?:predictions|shadow_predictions|request_errors|outcomes)"
PARTITION_IN_PLAN = re.compile(rf" on ({_TABLES}_(?:\d{{8}}|upto_\d{{8}}|default))\b")
READS_THE_LOG = re.compile(rf"\b{_TABLES}\b")


def _at(day: date, hour: int) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=UTC)


def _log(registry: Registry, first: date, days: int) -> None:
    """Rows of versions 1 and 2 at HOURS of each day, each with an outcome and version 3's mirror score."""
    stamps = {f"v{v}-{i}-{h}": (v, _at(first + i * DAY, h))
              for i in range(days) for h in HOURS for v in (1, 2)}
    insert_rollout_rows(registry, [{"request_id": rid, "model": "m", "version": v, "score": 0.25 * v,
                                    "latency_ms": 1.0, "created_at": at, "features": [0.1, 0.2]}
                                   for rid, (v, at) in stamps.items()])
    assert registry.record_outcomes([(rid, 1.0) for rid in stamps]) == [None] * len(stamps)
    with registry.transaction() as s:
        s.execute(insert(ShadowPrediction), [{"request_id": rid, "model": "m", "version": 3, "score": 0.5,
                                              "latency_ms": 1.0, "created_at": at}
                                             for rid, (_v, at) in stamps.items()])


@contextmanager
def _sent(registry: Registry) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with their values) the engine sends inside the block."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: object, _cursor: object, statement: str, parameters: Any, *_args: object) -> None:
        sent.append((statement, parameters))

    event.listen(registry.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(registry.engine, "before_cursor_execute", record)


def _planned_partitions(registry: Registry, statement: str, parameters: Any) -> set[str]:
    """The partitions of predictions in `statement`'s plan (EXPLAIN, not run: a DELETE deletes nothing)."""
    with registry.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute("EXPLAIN " + statement, parameters)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        conn.rollback()
    return set(PARTITION_IN_PLAN.findall(plan))


def _allowed(registry: Registry, lo: date | None, hi: date) -> set[str]:
    """The partitions of the four tables holding days in [lo, hi]: the day tables that meet it, and a table's
    DEFAULT when one of its days has no table of its own."""
    meets: set[str] = set()
    for parent in PARENTS:
        parts = partitions_of(registry, parent)
        meets |= {p.name for p in parts if not p.is_default
                  and (p.lower is None or p.lower <= hi) and (lo is None or p.upper is None or lo < p.upper)}
        start = lo if lo is not None else min(p.upper for p in parts if p.upper and p.lower is None)
        days = [start + i * DAY for i in range((hi - start).days + 1)]
        if any(not any(p.covers(d) for p in parts) for d in days):
            meets.add(f"{parent}_default")
    return meets


def test_every_range_read_of_the_log_plans_only_the_days_of_its_range(registry: Registry,
                                                                      tmp_path: Path) -> None:
    first = datetime.now(UTC).date() + 10 * DAY  # six days of their own, clear of the migration's tables
    ensure_days(registry, first, 6)
    _log(registry, first, 6)
    since, until = _at(first + 2 * DAY, 6), _at(first + 3 * DAY, 12)  # 5 rows a version: 9, 15, 21; 3, 9
    cutoff = _at(first + 1 * DAY, 12)  # 6 rows a version before it: the first day's 4, the second's 3 and 9
    reads: dict[str, tuple[Callable[[], Any], date | None, date]] = {
        "look_rows": (lambda: look_rows(registry, "m", (1, 2), since, until).routed.size,
                      since.date(), until.date()),
        "arm_rows": (lambda: arm_rows(registry, "m", 2, since, until).requests, since.date(), until.date()),
        "paired_rows": (lambda: paired_rows(registry, "m", shadow=3, served=1, since=since,
                                            until=until).shadow.size, since.date(), until.date()),
        "shadow_rows": (lambda: shadow_rows(registry, "m", 3, since=since, until=until).shadow.size,
                        since.date(), until.date()),
        "served_rows": (lambda: len(served_rows(registry, "m", since=since, until=until, with_outcome=True)),
                        since.date(), until.date()),
        "log export": (lambda: sum(n for _p, n in export_rows(registry, cutoff, tmp_path, model="m")),
                       None, cutoff.date()),
        "log prune --dry-run": (lambda: count_rows(registry, cutoff, model="m")["predictions"],
                                None, cutoff.date()),
        "log prune": (lambda: prune_rows(registry, cutoff, model="m", batch=4)["predictions"],
                      None, cutoff.date()),
    }
    rows = {"look_rows": 10, "arm_rows": 5, "paired_rows": 5, "shadow_rows": 10, "served_rows": 10,
            "log export": 12, "log prune --dry-run": 12, "log prune": 12}
    checked: dict[str, int] = {}
    for name, (read, lo, hi) in reads.items():
        with _sent(registry) as sent:
            got = read()
        assert got == rows[name], name
        if not registry.is_postgres:
            continue
        allowed = _allowed(registry, lo, hi)
        reading = [(s, p) for s, p in sent if READS_THE_LOG.search(s)]
        planned = [_planned_partitions(registry, s, p) for s, p in reading]
        assert all(planned), (name, [s for (s, _p), got in zip(reading, planned, strict=True) if not got])
        for (statement, _p), names in zip(reading, planned, strict=True):
            assert names <= allowed, (name, sorted(names - allowed), statement)
        checked[name] = len(reading)
    with registry.session() as s:
        left = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.created_at < cutoff))
    assert left == 0  # the prune above deleted every row before the cutoff: the day range lost none
    if registry.is_postgres:
        assert set(checked) == set(reads) and all(checked.values()), checked
