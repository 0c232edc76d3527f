"""outcomes.day, the day of the prediction an outcome reports on, and on PostgreSQL outcomes partitioned by
it, one table a UTC day, like the prediction log (migrations 0009 and 0011).

Why (issue 17): every answered request can get an outcome, so outcomes grows as fast as predictions
(hundreds of millions of rows a day at thousands of requests a second). `chimera log prune` dropped whole
days of the log but could only delete outcomes in batches (those whose prediction was gone). With outcomes
partitioned by their prediction's day, a day of outcomes is dropped with the same day of predictions,
which costs the same for a million rows as for ten.

Why the prediction's day and not the outcome's own: an outcome comes hours or weeks after its
prediction, and is kept exactly as long as its prediction (what prune did before, row by row). Keyed by
its own created_at, a day's table of outcomes would hold outcomes of predictions from many days, and no
whole table could be dropped when one prediction day goes.

- `day` is the day of the newest prediction stored with the outcome's request id when the outcome is
  stored (registry.repository.Registry.record_outcomes; RecordOutcome refuses an outcome without one).
  Rows from before the migration get it the same way; an outcome whose prediction is already gone (left
  for the next prune) gets its own created_at's UTC date.
- PostgreSQL: the key becomes PRIMARY KEY (request_id, day) (it refuses a unique index without the
  partition key); the registry still looks a request id up on every day before it stores an outcome, so
  one is stored per request id, as before. No CHECK ties day to created_at (the two are different days).
- PostgreSQL: unlike 0011, the rows are copied, not the table rewritten in place: a day that comes from
  another table cannot be given by ALTER COLUMN ... USING (no subquery there). The old table is renamed,
  the partitioned one made, the rows copied in by one INSERT ... SELECT (joined with predictions grouped
  by request id: one read of predictions), then the key and the created_at index are built and the old
  table dropped. It takes a lock on outcomes for the whole copy: plan it, prune first.
- The first partition, `outcomes_upto_<day after the migration>`, FROM (MINVALUE), takes every older day;
  a DEFAULT partition any day without a table; the next two days, and every later day predictions has a
  table for, are made here (so no outcome of those days lands in DEFAULT, which would keep that day from
  ever getting its table), and afterwards by the prediction log's writer with the log's
  (registry.partitions.ensure_days).

SQLite: `day` is added and filled the same way (one table; request_id stays the key).

Downgrade (PostgreSQL) copies every row back into one plain table (the outcome of the newest day kept
for a request id, which the registry never stores twice anyway), then drops the column; SQLite drops the
column.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TABLE, INDEX, OLD = "outcomes", "ix_outcomes_created", "outcomes_before_0012"
# Each outcome of `o` with the newest day of its request id in predictions, or (its prediction gone) its
# own date. One hash join against predictions grouped by request id: the correlated max(day) per outcome
# probed every day's index for every outcome (600k outcomes, 1.2M predictions in 30 day tables: the
# migration took 21.5 s that way, 2.4 s this way; docs/performance.md, "Time partitioning", point 7).
_ROWS_PG = ("SELECT o.request_id, o.value, o.created_at, "
            "COALESCE(p.day, (o.created_at AT TIME ZONE 'UTC')::date) "
            "FROM {} o LEFT JOIN (SELECT request_id, max(day) AS day FROM predictions GROUP BY request_id) p "
            "ON p.request_id = o.request_id")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column(TABLE, sa.Column("day", sa.Date(), nullable=True))
        _ddl("UPDATE {} SET day = COALESCE((SELECT max(p.day) FROM predictions p WHERE p.request_id = "
             "outcomes.request_id), substr(created_at, 1, 10))", TABLE)
        with op.batch_alter_table(TABLE) as batch:
            batch.alter_column("day", existing_type=sa.Date(), nullable=False)
        return
    upper = datetime.now(UTC).date() + timedelta(days=1)
    _ddl("ALTER TABLE {} RENAME TO {}", TABLE, OLD)
    _ddl("ALTER TABLE {} RENAME CONSTRAINT {} TO {}", OLD, _primary_key(OLD), f"{OLD}_pkey")
    _ddl("ALTER INDEX {} RENAME TO {}", INDEX, f"{OLD}_created")
    _ddl("CREATE TABLE {} (request_id varchar(128) NOT NULL, value double precision NOT NULL, "
         "created_at timestamp with time zone NOT NULL, day date NOT NULL) PARTITION BY RANGE (day)", TABLE)
    _ddl("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (MINVALUE) TO (%(upper)s)",
         f"{TABLE}_upto_{upper:%Y%m%d}", TABLE, upper=upper)
    _ddl("CREATE TABLE {} PARTITION OF {} DEFAULT", f"{TABLE}_default", TABLE)
    for day in sorted({upper, upper + timedelta(days=1), *_prediction_days(upper)}):
        _ddl("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (%(lo)s) TO (%(hi)s)", f"{TABLE}_{day:%Y%m%d}",
             TABLE, lo=day, hi=day + timedelta(days=1))
    _ddl("INSERT INTO {} (request_id, value, created_at, day) " + _ROWS_PG, TABLE, OLD)
    _ddl("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (request_id, day)", TABLE, f"{TABLE}_pkey")
    op.create_index(INDEX, TABLE, ["created_at"])
    _ddl("DROP TABLE {}", OLD)


def _prediction_days(since: date) -> set[date]:
    """The days from `since` on that have a table of predictions (made ahead by the log's writer, or a
    clock ahead of this one): their outcomes get a table too, or they would land in DEFAULT, where
    PostgreSQL then refuses that day its own table (registry.partitions)."""
    names = op.get_bind().scalars(sa.text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('predictions')")).all()
    days = {datetime.strptime(n[len("predictions_"):], "%Y%m%d").date()
            for n in names if re.fullmatch(r"predictions_\d{8}", n)}
    return {d for d in days if d >= since}


def _primary_key(table: str) -> str:
    return op.get_bind().scalar(sa.text(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'p'"), {"t": table})


def _ddl(query: str, *names: str, **values: date) -> None:
    """Run `query` with `{}` standing for each of `names`, quoted as identifiers by psycopg2.sql on
    PostgreSQL (by SQLAlchemy's identifier preparer on SQLite), and `%(x)s` for the dates in `values`,
    bound client-side by psycopg2 (as in 0009 and 0011: a migration keeps its own copy rather than import
    the application's)."""
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        quote = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql(query.format(*map(quote, names)))
        return
    from psycopg2 import sql

    raw = conn.connection.driver_connection
    statement = sql.SQL(query).format(*map(sql.Identifier, names)).as_string(raw)
    conn.exec_driver_sql(statement, values or None)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table(TABLE) as batch:
            batch.drop_column("day")
        return
    plain = f"{TABLE}_plain"
    _ddl("CREATE TABLE {} (request_id varchar(128) NOT NULL, value double precision NOT NULL, "
         "created_at timestamp with time zone NOT NULL)", plain)
    _ddl("INSERT INTO {} SELECT DISTINCT ON (request_id) request_id, value, created_at FROM {} "
         "ORDER BY request_id, day DESC", plain, TABLE)
    _ddl("DROP TABLE {}", TABLE)  # the partitioned parent and every partition
    _ddl("ALTER TABLE {} RENAME TO {}", plain, TABLE)
    _ddl("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (request_id)", TABLE, f"{TABLE}_pkey")
    op.create_index(INDEX, TABLE, ["created_at"])
