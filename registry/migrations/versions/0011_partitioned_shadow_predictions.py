"""shadow_predictions.day, and on PostgreSQL the mirror scores partitioned by it, one table a UTC day, as
migration 0009 did for predictions.

Why (issue 17): a shadow version mirrors all of its model's traffic, so while one runs shadow_predictions
grows as fast as predictions (hundreds of millions of rows a day at thousands of requests a second), and
`chimera log prune` could only delete those rows in batches. With one table a day it drops whole days
(registry.partitions handles both tables), which costs the same for a million rows as for ten.

- `day` is the UTC date of the row's created_at (when the mirror score was written), filled by every
  writer (gateway.records.pg_copy, gateway.records.inserter, the ORM default in registry.models), with
  CHECK (day = created_at's UTC date) on every partition, so a partition whose days are all before the
  cutoff's holds only rows created before the cutoff.
- The keys become PRIMARY KEY (id, day) and UNIQUE (request_id, version, day) (PostgreSQL refuses a unique
  index without the partition key). Unlike predictions, no writer looks a (request id, version) up on the
  neighbouring day: the readers pair a mirror score with its request's prediction on the same day only
  (registry.models.mirrored_with), so a second score that a retry across midnight leaves on the other day
  pairs with nothing.
- The existing table becomes the first partition, `shadow_predictions_upto_<day after the migration>`,
  FOR VALUES FROM (MINVALUE), its rows given their day by one rewrite of the table (ALTER COLUMN ... TYPE
  ... USING, as 0009: plan it, prune first); rows dated after the migration's day (a skewed clock) move to
  the parent. Its two indexes are attached to the parent's; the keys are built on it by the ALTER TABLE.
- A DEFAULT partition takes any day without a table, and the next two days are made here; afterwards the
  prediction log's writer makes both tables' days ahead (registry.partitions.ensure_days).
- The id sequence is handed to the new parent (its name, like the primary key's, is read, not assumed:
  0007 built the table under another name).

SQLite: `day` is added and filled the same way (one table; (request id, version) stays unique).

Downgrade (PostgreSQL) copies every row back into one plain table (the first row of a (request id,
version) kept), then drops the column; SQLite drops the column.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLE = "shadow_predictions"
INDEXES = (("ix_shadow_predictions_model_version", ["model", "version"]),
           ("ix_shadow_predictions_model_created", ["model", "created_at"]))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column(TABLE, sa.Column("day", sa.Date(), nullable=True))
        op.execute("UPDATE shadow_predictions SET day = substr(created_at, 1, 10)")
        with op.batch_alter_table(TABLE) as batch:
            batch.alter_column("day", existing_type=sa.Date(), nullable=False)
        return
    today = datetime.now(UTC).date()
    upper = today + timedelta(days=1)
    first = f"{TABLE}_upto_{upper:%Y%m%d}"
    sequence = op.get_bind().scalar(sa.text(
        "SELECT s.relname FROM pg_class s WHERE s.oid = pg_get_serial_sequence(:t, 'id')::regclass"),
        {"t": TABLE})
    primary = op.get_bind().scalar(sa.text(  # named after the table 0007 built it as
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'p'"), {"t": TABLE})
    # The keys go first: the rewrite below then rebuilds only the two plain indexes.
    _ddl("ALTER TABLE shadow_predictions DROP CONSTRAINT {}", primary)
    op.execute("ALTER TABLE shadow_predictions DROP CONSTRAINT uq_shadow_predictions_request_version")
    op.execute("ALTER TABLE shadow_predictions ADD COLUMN day date")
    op.execute("ALTER TABLE shadow_predictions ALTER COLUMN day TYPE date "
               "USING (created_at AT TIME ZONE 'UTC')::date")
    op.execute("ALTER TABLE shadow_predictions ALTER COLUMN day SET NOT NULL")
    op.execute("ALTER TABLE shadow_predictions ADD CONSTRAINT ck_shadow_predictions_day "
               "CHECK (day = (created_at AT TIME ZONE 'UTC')::date)")
    _ddl("CREATE TABLE shadow_skewed AS SELECT * FROM shadow_predictions WHERE day > %(today)s", today=today)
    _ddl("DELETE FROM shadow_predictions WHERE day > %(today)s", today=today)
    _ddl("ALTER TABLE shadow_predictions RENAME TO {}", first)
    for name, _columns in INDEXES:
        _ddl("ALTER INDEX {} RENAME TO {}", name, f"{first}{name.removeprefix('ix_shadow_predictions')}")
    _ddl("CREATE TABLE shadow_predictions (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
         "PARTITION BY RANGE (day)", first)
    if sequence:
        _ddl("ALTER SEQUENCE {} OWNED BY shadow_predictions.id", sequence)
    _ddl("ALTER TABLE shadow_predictions ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO (%(upper)s)",
         first, upper=upper)
    op.execute("ALTER TABLE shadow_predictions ADD CONSTRAINT shadow_predictions_pkey PRIMARY KEY (id, day)")
    op.execute("ALTER TABLE shadow_predictions ADD CONSTRAINT uq_shadow_predictions_request_version_day "
               "UNIQUE (request_id, version, day)")
    for name, columns in INDEXES:  # the first partition's own are attached to these, not built again
        op.create_index(name, TABLE, columns)
    op.execute("CREATE TABLE shadow_predictions_default PARTITION OF shadow_predictions DEFAULT")
    for day in (upper, upper + timedelta(days=1)):
        _ddl("CREATE TABLE {} PARTITION OF shadow_predictions FOR VALUES FROM (%(lo)s) TO (%(hi)s)",
             f"{TABLE}_{day:%Y%m%d}", lo=day, hi=day + timedelta(days=1))
    op.execute("INSERT INTO shadow_predictions SELECT * FROM shadow_skewed")
    op.execute("DROP TABLE shadow_skewed")


def _ddl(query: str, *names: str, **values: date) -> None:
    """Run `query` with `{}` standing for each of `names`, quoted as identifiers by psycopg2.sql, and
    `%(x)s` for the dates in `values`, bound client-side by psycopg2 (as in 0009: a migration keeps its
    own copy rather than import the application's)."""
    from psycopg2 import sql

    conn = op.get_bind()
    raw = conn.connection.driver_connection
    statement = sql.SQL(query).format(*map(sql.Identifier, names)).as_string(raw)
    conn.exec_driver_sql(statement, values or None)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table(TABLE) as batch:
            batch.drop_column("day")
        return
    sequence = op.get_bind().scalar(sa.text(
        "SELECT s.relname FROM pg_class s WHERE s.oid = pg_get_serial_sequence(:t, 'id')::regclass"),
        {"t": TABLE})
    op.execute("CREATE TABLE shadow_plain (LIKE shadow_predictions INCLUDING DEFAULTS)")
    op.execute("INSERT INTO shadow_plain SELECT DISTINCT ON (request_id, version) * FROM shadow_predictions "
               "ORDER BY request_id, version, id")
    if sequence:
        _ddl("ALTER SEQUENCE {} OWNED BY NONE", sequence)
    op.execute("DROP TABLE shadow_predictions")  # the partitioned parent and every partition
    op.execute("ALTER TABLE shadow_plain RENAME TO shadow_predictions")
    if sequence:
        _ddl("ALTER SEQUENCE {} OWNED BY shadow_predictions.id", sequence)
    op.execute("ALTER TABLE shadow_predictions DROP COLUMN day")
    op.execute("ALTER TABLE shadow_predictions ADD CONSTRAINT shadow_predictions_pkey PRIMARY KEY (id)")
    op.execute("ALTER TABLE shadow_predictions ADD CONSTRAINT uq_shadow_predictions_request_version "
               "UNIQUE (request_id, version)")
    for name, columns in INDEXES:
        op.create_index(name, TABLE, columns)
