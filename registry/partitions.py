"""The prediction log's day partitions on PostgreSQL: which exist, making the next days before their rows
arrive, and dropping whole old days for retention. Four tables are partitioned alike (PARENTS):
`predictions` (migration 0009), `shadow_predictions` (the mirror scores), `request_errors` (migration
0011) and `outcomes` (0012, by the day of the prediction each reports on); every function takes the
parents it works on and defaults to all four, except `partitions_of`, which lists one. SQLite keeps them
as plain tables: there every function here does nothing and returns an empty list (or dict).

Layout (migration 0009; 0011 and 0012 the same for the other three): `predictions` is PARTITION BY
RANGE (day); the table from before the migration is the first partition, `predictions_upto_YYYYMMDD`,
FROM (MINVALUE) TO its day; one table a day, `predictions_YYYYMMDD`; and `predictions_default`, the
DEFAULT partition, which takes any day without a table, so no row is ever refused for its day.

Why days are made ahead (`ensure_days`, called by the prediction log's writer about hourly): once the
DEFAULT partition holds rows of a day, PostgreSQL refuses to make that day's table (the rows would have
to move first, which nothing here does), and every row of that day then stays in DEFAULT, where only
row-by-row deletes can prune it.

How a day's table is made, and why not by CREATE TABLE ... PARTITION OF: that statement takes an ACCESS
EXCLUSIVE lock on `predictions`, so while it waited for any reader of the log (a rollout look, an export:
measured, a 2 s wait for a reader of today's table), every insert of the log queued behind it, for the
whole wait. A day is made instead as a plain table (LIKE `predictions`: its columns, defaults, CHECK,
storage) then ATTACHed, which takes only SHARE UPDATE EXCLUSIVE on `predictions`: inserts and reads go on
beside it, and a reader of some days does not delay it. It still takes ACCESS EXCLUSIVE on the new table
and on predictions_default, which it scans (an empty one, normally) to check that none of its rows belongs
to the new day: a session reading predictions_default (a read of days with no table of their own, a
whole-log export) makes it wait, and only such sessions queue behind it. The ATTACH builds the
partition's indexes and keys as CREATE ... PARTITION OF did (the same names, checked by
tests/integration/test_partitions.py).

DETACH (retention) still takes ACCESS EXCLUSIVE on `predictions`: DETACH ... CONCURRENTLY is refused while
a DEFAULT partition exists. So every CREATE+ATTACH and every DETACH is its own short transaction under
`SET LOCAL lock_timeout` (and an equal statement_timeout): giving up after `lock_timeout_s` bounds the
stall, and the days made ahead make a missed attempt harmless. A give-up raises PartitionError, which says
what was done before it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from psycopg2 import sql as psql
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from registry.errors import PartitionError
from registry.repository import Registry

log = logging.getLogger(__name__)

PARENT = "predictions"
SHADOW_PARENT = "shadow_predictions"
ERRORS_PARENT = "request_errors"
OUTCOMES_PARENT = "outcomes"
# Outcomes last: drop_partitions_before drops in this order and stops at the first table it cannot drop,
# so a day's outcomes never go while that day's predictions stay.
PARENTS = (PARENT, SHADOW_PARENT, ERRORS_PARENT, OUTCOMES_PARENT)
# SQLSTATEs: lock_not_available, query_canceled (the statement_timeout), check_violation (DEFAULT holds
# rows of the day), duplicate_table (the name is taken), invalid_object_definition (the range overlaps).
_TIMED_OUT = {"55P03", "57014"}
_DEFAULT_HAS_ROWS = "23514"
_TAKEN = {"42P07", "42P17"}
_BOUND = re.compile(r"FOR VALUES FROM \((?P<lower>[^)]*)\) TO \((?P<upper>[^)]*)\)")


def default_partition(parent: str = PARENT) -> str:
    """The name of `parent`'s DEFAULT partition."""
    return f"{parent}_default"


@dataclass(frozen=True)
class Partition:
    """One partition of a parent in PARENTS: it holds the days lower <= day < upper (None: MINVALUE /
    MAXVALUE); the DEFAULT partition has no bounds and holds every day no other partition covers."""

    name: str
    lower: date | None
    upper: date | None
    is_default: bool

    def covers(self, day: date) -> bool:
        """True when rows of `day` land here by its bounds (never for the DEFAULT partition)."""
        return (not self.is_default and (self.lower is None or self.lower <= day)
                and (self.upper is None or day < self.upper))


def day_table(day: date, parent: str = PARENT) -> str:
    """The name of `day`'s own partition of `parent`."""
    return f"{parent}_{day:%Y%m%d}"


def partitions_of(registry: Registry, parent: str = PARENT) -> list[Partition]:
    """Every partition of `parent`, the bounded ones by lower bound (MINVALUE first), the DEFAULT one
    last; [] on SQLite and on a PostgreSQL database before the migration that partitioned it."""
    if not registry.is_postgres:
        return []
    with registry.engine.begin() as conn:
        return _partitions(conn, parent) or []


def ensure_days(registry: Registry, first: date, days: int = 3, lock_timeout_s: float = 2.0,
                parents: Sequence[str] = PARENTS) -> list[str]:
    """Make `<parent>_YYYYMMDD` for each of `parents` and each day in [first, first + days) that no
    partition of it covers yet (the first partition covers every day below its upper bound), each in its
    own transaction bounded by `lock_timeout_s`. Returns the names made, parent by parent in day order; []
    on SQLite.

    Raises PartitionError (its `done`: the tables made before) when a CREATE timed out (the remaining days
    and parents are not tried: they would wait for the same kind of lock), or, after trying every other
    day, when PostgreSQL refused a day: the parent's DEFAULT partition holds rows of it, or its name is
    taken by a table that is not its partition. A day another session made meanwhile counts as covered.
    Other database errors (the server down) propagate as SQLAlchemy raises them."""
    if not registry.is_postgres or days <= 0:
        return []
    _check_timeout(lock_timeout_s)
    made: list[str] = []
    refused: list[str] = []
    for parent in parents:
        refused += _ensure_parent(registry, parent, first, days, lock_timeout_s, made)
    if refused:
        raise PartitionError("no partition made for " + "; ".join(refused), made)
    return made


def _ensure_parent(registry: Registry, parent: str, first: date, days: int, lock_timeout_s: float,
                   made: list[str]) -> list[str]:
    """ensure_days for one parent: appends the names made to `made`, returns why days were refused."""
    with registry.engine.begin() as conn:
        parts = _partitions(conn, parent)
    if parts is None:
        return []
    default = default_partition(parent)
    refused: list[str] = []
    for day in (first + timedelta(days=i) for i in range(days)):
        if any(p.covers(day) for p in parts):
            continue
        name = day_table(day, parent)
        try:
            with registry.engine.begin() as conn:
                _bound(conn, lock_timeout_s)
                _ddl(conn, "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                     "INCLUDING STORAGE INCLUDING COMPRESSION)", name, parent)
                _ddl(conn, "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM (%(lo)s) TO (%(hi)s)", parent,
                     name, lo=day, hi=day + timedelta(days=1))
        except DBAPIError as exc:
            code = _sqlstate(exc)
            if code in _TIMED_OUT:
                raise PartitionError(
                    f"{parent}: {name} not made: no lock on {parent} or {default} within "
                    f"{lock_timeout_s:g} s (another session holds it, e.g. a long read) or "
                    f"{default} took longer to check; "
                    f"days from {day} on are tried again later", made) from exc
            if code == _DEFAULT_HAS_ROWS:
                refused.append(f"{parent} {day}: {default} holds rows of that day, so PostgreSQL cannot "
                               f"make {name} (its rows stay in {default}; they are not moved)")
                continue
            if code in _TAKEN:
                with registry.engine.begin() as conn:
                    parts = _partitions(conn, parent) or []
                if any(p.covers(day) for p in parts):
                    continue  # another session (another gateway's writer) made it meanwhile
                refused.append(f"{parent} {day}: {_first_line(exc)}")
                continue
            raise
        made.append(name)
        parts.append(Partition(name, day, day + timedelta(days=1), False))
    return refused


def old_partitions(registry: Registry, cutoff: date,
                   parents: Sequence[str] = PARENTS) -> list[tuple[str, Partition, int | None]]:
    """The partitions `drop_partitions_before(registry, cutoff, parents=parents)` would drop now (every one
    but DEFAULT whose upper bound is <= `cutoff`), parent by parent in day order, as (parent, partition,
    the planner's estimate of its rows: `_estimate`, None when not estimated). Read-only, one read of the
    catalog: no row of any partition is looked at (`chimera log prune --dry-run`). [] on SQLite."""
    if not registry.is_postgres:
        return []
    with registry.engine.begin() as conn:
        return [(parent, p, _estimate(conn, p.name))
                for parent in parents for p in _before(conn, parent, cutoff)]


def drop_partitions_before(registry: Registry, cutoff: date, lock_timeout_s: float = 2.0,
                           parents: Sequence[str] = PARENTS) -> dict[str, int | None]:
    """Detach and drop every partition of `parents` but DEFAULT whose upper bound is <= `cutoff`: each
    holds only days before the cutoff day. Returns name -> the planner's estimate of the rows it held
    (None: not estimated), parent by parent in day order; {} on SQLite. `chimera log prune` reports the
    estimates, never as deleted rows.

    Why an estimate: an exact count(*) reads the whole partition, and a day of the log holds hundreds of
    millions of rows, so the count alone could outlast the client's statement timeout
    (CHIMERA_DB_QUERY_TIMEOUT_S) and stop the prune for a number only used in a report. The estimate is
    one catalog read (`_estimate`); no row is looked at, to count or to decide: the CHECK (day =
    created_at's UTC date) of migrations 0009 and 0011 means a partition whose days are all before the
    cutoff's holds only rows created before it; an outcome's day is its prediction's (0012), so a day of
    outcomes holds only outcomes of predictions created before the cutoff, which the prune deletes.

    Per partition, one transaction: read its estimate, then DETACH and DROP it under `lock_timeout_s`
    (the parent is locked only for the DETACH and DROP). A DETACH that times out raises PartitionError;
    its `done` lists the tables dropped before."""
    if not registry.is_postgres:
        return {}
    _check_timeout(lock_timeout_s)
    with registry.engine.begin() as conn:
        parts = [(parent, p) for parent in parents for p in _before(conn, parent, cutoff)]
    dropped: dict[str, int | None] = {}
    for parent, p in parts:
        bounded = False  # a timeout of the estimate's read (the engine's own timeout) is not ours to explain
        try:
            with registry.engine.begin() as conn:
                rows = _estimate(conn, p.name)
                _bound(conn, lock_timeout_s)
                bounded = True
                _ddl(conn, "ALTER TABLE {} DETACH PARTITION {}", parent, p.name)
                _ddl(conn, "DROP TABLE {}", p.name)
        except DBAPIError as exc:
            if bounded and _sqlstate(exc) in _TIMED_OUT:
                so_far = ", ".join(f"{n} ({_rows(c)})" for n, c in dropped.items()) or "none"
                raise PartitionError(
                    f"{parent}: {p.name} not dropped: no lock on {parent} within {lock_timeout_s:g} s "
                    f"(another session holds it, e.g. a long read); dropped before it: {so_far}",
                    list(dropped)) from exc
            raise
        dropped[p.name] = rows
    return dropped


def _before(conn: Connection, parent: str, cutoff: date) -> list[Partition]:
    """The partitions of `parent` holding only days before `cutoff`: not DEFAULT, upper bound <= `cutoff`."""
    return [p for p in _partitions(conn, parent) or []
            if not p.is_default and p.upper is not None and p.upper <= cutoff]


def _estimate(conn: Connection, name: str) -> int | None:
    """The planner's estimate of `name`'s rows: pg_class.reltuples, kept by VACUUM, ANALYZE (autovacuum
    runs both) and CREATE INDEX; exact right after ANALYZE of a table small enough to be read whole, an
    estimate otherwise. A catalog read: never a scan of the table. None when the table was never vacuumed
    or analyzed (reltuples is -1 then, PostgreSQL 14 and later): unknown is not 0 rows."""
    tuples = conn.scalar(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": name})
    return None if tuples is None or tuples < 0 else round(tuples)


def _rows(estimate: int | None) -> str:
    return "rows not estimated" if estimate is None else f"~{estimate} rows"


def _partitions(conn: Connection, parent: str) -> list[Partition] | None:
    """The partitions of `parent` (sorted as partitions_of says), or None when it is not a partitioned
    table. Bounds are read in ISO DateStyle (pg_get_expr prints dates in the session's)."""
    kind = conn.scalar(text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": parent})
    if kind != "p":
        return None
    conn.execute(text("SET LOCAL DateStyle = ISO"))
    rows = conn.execute(text(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"), {"t": parent}).all()
    return sorted((_partition(parent, name, bound) for name, bound in rows),
                  key=lambda p: (p.is_default, p.lower is not None, p.lower or date.min))


def _partition(parent: str, name: str, bound: str) -> Partition:
    if bound == "DEFAULT":
        return Partition(name, None, None, True)
    m = _BOUND.fullmatch(bound)
    if m is None:
        raise ValueError(f"{parent}: partition {name} has bounds {bound!r}, not a range of days")
    return Partition(name, _day(parent, m["lower"], name), _day(parent, m["upper"], name), False)


def _day(parent: str, value: str, name: str) -> date | None:
    if value in ("MINVALUE", "MAXVALUE"):
        return None
    m = re.fullmatch(r"'(\d{4}-\d{2}-\d{2})'", value)
    if m is None:
        raise ValueError(f"{parent}: partition {name} has bound {value}, not a day")
    return date.fromisoformat(m[1])


def _bound(conn: Connection, seconds: float) -> None:
    ms = max(1, round(seconds * 1000))
    conn.execute(text("SELECT set_config('lock_timeout', :ms, true), "
                      "set_config('statement_timeout', :ms, true)"), {"ms": str(ms)})


def _check_timeout(seconds: float) -> None:
    if not seconds > 0:  # 0 would mean "wait forever" to PostgreSQL
        raise ValueError(f"lock_timeout_s: must be positive, got {seconds}")


def _ddl(conn: Connection, query: str, *names: str, **values: date) -> None:
    """Run DDL on `conn`: `{}` in `query` stands for each of `names`, quoted as identifiers by psycopg2.sql;
    `%(x)s` for the dates in `values`, which psycopg2 binds client-side (PostgreSQL takes no server-side
    parameters in DDL). The statement is composed by the driver's own library, never by formatting."""
    raw = conn.connection.driver_connection
    statement = psql.SQL(query).format(*map(psql.Identifier, names)).as_string(raw)
    conn.exec_driver_sql(statement, values or None)


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "pgcode", None)


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
