"""predictions.day, and on PostgreSQL the prediction log partitioned by it, one table a UTC day.

Why (issue 17): at thousands of requests a second the log gains hundreds of millions of rows a day, and
retention by batched DELETE cannot keep up with that (each deleted row is an index update and dead tuple
to vacuum). With one table a day, `chimera log prune` drops whole days (registry.partitions), which
costs the same for a million rows as for ten. docs/performance.md ("Time partitioning") measured the cost
to the writer (2-10 % of the COPY rate) and gives the design; the points that shape this revision:

- `day` is the UTC date of the row's created_at (the gateway's answer time), written by every writer
  (gateway.records.pg_copy, gateway.records.inserter, the ORM default in registry.models). PostgreSQL
  partitions by a column, not an expression, and refuses a unique index without the partition key, so
  the keys become PRIMARY KEY (id, day) and UNIQUE (request_id, day): a request id is unique per day
  (plus a 15-minute window across midnight, kept by the writer; see gateway.records.pg_ids).
- The existing table becomes the first partition, `predictions_upto_<day after the migration>`, FOR
  VALUES FROM (MINVALUE): no copy of its rows into a new table. Its rows get their own day (one
  rewrite of the table, ALTER COLUMN ... TYPE ... USING, like 0008's: plan it, prune first), so a
  spilled row answered before the migration and replayed after it hits the same (request_id, day) key
  and is not stored twice. Rows whose created_at lies after the migration's day (a skewed clock) are
  moved out of it into the parent, where they land in their day's table or the DEFAULT one.
- CHECK (day = created_at's UTC date), on every partition: what lets `chimera log prune` drop a whole
  partition whose upper bound is at or before the cutoff's day without looking at its rows (every row in
  it was created before that day's midnight), whatever wrote the row.
- Its (model, created_at) index is kept and attached; the (id, day) and (request_id, day) indexes are
  built on it by the ALTER TABLE (one index build each).
- A DEFAULT partition takes any day without a table (a clock far ahead, a replay older than the first
  partition once that is dropped), so no row is ever refused for its day. The next two days are made
  here; afterwards the prediction log's writer makes them ahead (registry.partitions.ensure_days).
- The id sequence is handed to the new parent, so dropping the first partition keeps it.

SQLite: `day` is added and filled the same way (one table; ids stay unique while the row is kept).

Downgrade (PostgreSQL) copies every row back into one plain table (the first row of a request id kept
where an id was reused on another day), then drops the column; SQLite drops the column.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column("predictions", sa.Column("day", sa.Date(), nullable=True))
        op.execute("UPDATE predictions SET day = substr(created_at, 1, 10)")
        with op.batch_alter_table("predictions") as batch:
            batch.alter_column("day", existing_type=sa.Date(), nullable=False)
        return
    today = datetime.now(UTC).date()
    upper = today + timedelta(days=1)
    first = f"predictions_upto_{upper:%Y%m%d}"
    # The keys go first: the rewrite below then rebuilds only the (model, created_at) index.
    op.execute("ALTER TABLE predictions DROP CONSTRAINT predictions_pkey")
    op.execute("ALTER TABLE predictions DROP CONSTRAINT predictions_request_id_key")
    op.execute("ALTER TABLE predictions ADD COLUMN day date")
    # ALTER ... TYPE ... USING rewrites the table into new files (as 0008 did) where an UPDATE would leave
    # a dead version of every row behind for VACUUM.
    op.execute("ALTER TABLE predictions ALTER COLUMN day TYPE date "
               "USING (created_at AT TIME ZONE 'UTC')::date")
    op.execute("ALTER TABLE predictions ALTER COLUMN day SET NOT NULL")
    op.execute("ALTER TABLE predictions ADD CONSTRAINT ck_predictions_day "
               "CHECK (day = (created_at AT TIME ZONE 'UTC')::date)")
    _ddl("CREATE TABLE predictions_skewed AS SELECT * FROM predictions WHERE day > %(today)s", today=today)
    _ddl("DELETE FROM predictions WHERE day > %(today)s", today=today)
    _ddl("ALTER TABLE predictions RENAME TO {}", first)
    _ddl("ALTER INDEX ix_predictions_model_created RENAME TO {}", f"{first}_model_created")
    _ddl("CREATE TABLE predictions (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
         "PARTITION BY RANGE (day)", first)
    op.execute("ALTER SEQUENCE predictions_id_seq OWNED BY predictions.id")
    _ddl("ALTER TABLE predictions ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO (%(upper)s)", first,
         upper=upper)
    op.execute("ALTER TABLE predictions ADD CONSTRAINT predictions_pkey PRIMARY KEY (id, day)")
    op.execute("ALTER TABLE predictions ADD CONSTRAINT uq_predictions_request_day UNIQUE (request_id, day)")
    op.execute("CREATE INDEX ix_predictions_model_created ON predictions (model, created_at)")
    op.execute("CREATE TABLE predictions_default PARTITION OF predictions DEFAULT")
    for day in (upper, upper + timedelta(days=1)):
        _ddl("CREATE TABLE {} PARTITION OF predictions FOR VALUES FROM (%(lo)s) TO (%(hi)s)",
             f"predictions_{day:%Y%m%d}", lo=day, hi=day + timedelta(days=1))
    op.execute("INSERT INTO predictions SELECT * FROM predictions_skewed")
    op.execute("DROP TABLE predictions_skewed")


def _ddl(query: str, *names: str, **values: date) -> None:
    """Run `query` with `{}` standing for each of `names`, quoted as identifiers by psycopg2.sql, and
    `%(x)s` for the dates in `values`, which psycopg2 binds client-side (PostgreSQL takes no server-side
    parameters in DDL). Kept here rather than imported (registry.partitions has the same): a migration
    does not change when the application's code does."""
    from psycopg2 import sql

    conn = op.get_bind()
    raw = conn.connection.driver_connection
    statement = sql.SQL(query).format(*map(sql.Identifier, names)).as_string(raw)
    conn.exec_driver_sql(statement, values or None)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("predictions") as batch:
            batch.drop_column("day")
        return
    op.execute("CREATE TABLE predictions_plain (LIKE predictions INCLUDING DEFAULTS)")
    op.execute("INSERT INTO predictions_plain SELECT DISTINCT ON (request_id) * FROM predictions "
               "ORDER BY request_id, id")
    op.execute("ALTER SEQUENCE predictions_id_seq OWNED BY NONE")
    op.execute("DROP TABLE predictions")  # the partitioned parent and every partition
    op.execute("ALTER TABLE predictions_plain RENAME TO predictions")
    op.execute("ALTER SEQUENCE predictions_id_seq OWNED BY predictions.id")
    op.execute("ALTER TABLE predictions DROP COLUMN day")  # (its CHECK was not copied: LIKE without it)
    op.execute("ALTER TABLE predictions ADD CONSTRAINT predictions_pkey PRIMARY KEY (id)")
    op.execute("ALTER TABLE predictions ADD CONSTRAINT predictions_request_id_key UNIQUE (request_id)")
    op.execute("CREATE INDEX ix_predictions_model_created ON predictions (model, created_at)")
