"""shadow_predictions.day and request_errors.day, and on PostgreSQL both tables partitioned by it, one table
a UTC day, as migration 0009 did for predictions.

Why (issue 17): a shadow version mirrors all of its model's traffic, so while one runs shadow_predictions
grows as fast as predictions (hundreds of millions of rows a day at thousands of requests a second); and
while every version of a model fails (an outage), so does request_errors. `chimera log prune` could only
delete their rows in batches. With one table a day it drops whole days (registry.partitions handles all
three tables), which costs the same for a million rows as for ten.

- `day` is the UTC date of the row's created_at (when the mirror score was written, when the request
  failed), filled by every writer (gateway.records.pg_copy, gateway.records.inserter, the ORM default in
  registry.models), with CHECK (day = created_at's UTC date) on every partition, so a partition whose
  days are all before the cutoff's holds only rows created before the cutoff.
- The keys become PRIMARY KEY (id, day), and shadow_predictions' UNIQUE (request_id, version) becomes
  UNIQUE (request_id, version, day) (PostgreSQL refuses a unique index without the partition key).
  Unlike predictions, no writer looks a (request id, version) up on the neighbouring day: the readers
  pair a mirror score with its request's prediction on the same day only (registry.models.mirrored_with),
  so a second score that a retry across midnight leaves on the other day pairs with nothing.
  request_errors has no other key: each failed attempt is its own row.
- Each existing table becomes its first partition, `<table>_upto_<day after the migration>`, FOR VALUES
  FROM (MINVALUE), its rows given their day by one rewrite of the table (ALTER COLUMN ... TYPE ... USING,
  as 0009: plan it, prune first); rows dated after the migration's day (a skewed clock) move to the
  parent. Its indexes are attached to the parent's; the keys are built on it by the ALTER TABLE.
- A DEFAULT partition takes any day without a table, and the next two days are made here; afterwards the
  prediction log's writer makes every table's days ahead (registry.partitions.ensure_days).
- The id sequence is handed to the new parent (its name, like the primary key's, is read, not assumed:
  0007 built shadow_predictions under another name).

SQLite: `day` is added and filled the same way (one table each; (request id, version) stays unique).

Downgrade (PostgreSQL) copies every row back into one plain table (the first row of a shadow_predictions
(request id, version) kept), then drops the column; SQLite drops the column.

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

Named = tuple[str, list[str]]  # a constraint's or an index's name and columns
# table -> (its unique key or None, its plain indexes)
TABLES: dict[str, tuple[Named | None, list[Named]]] = {
    "shadow_predictions": (("uq_shadow_predictions_request_version", ["request_id", "version"]),
                           [("ix_shadow_predictions_model_version", ["model", "version"]),
                            ("ix_shadow_predictions_model_created", ["model", "created_at"])]),
    "request_errors": (None, [("ix_request_errors_model_created", ["model", "created_at"])]),
}


def upgrade() -> None:
    for table, (unique, indexes) in TABLES.items():
        if op.get_bind().dialect.name != "postgresql":
            op.add_column(table, sa.Column("day", sa.Date(), nullable=True))
            _ddl("UPDATE {} SET day = substr(created_at, 1, 10)", table)
            with op.batch_alter_table(table) as batch:
                batch.alter_column("day", existing_type=sa.Date(), nullable=False)
        else:
            _partition(table, unique, indexes)


def _partition(table: str, unique: Named | None, indexes: list[Named]) -> None:
    """PostgreSQL: `table` partitioned by day, its rows in the first partition (the module docstring)."""
    today = datetime.now(UTC).date()
    upper = today + timedelta(days=1)
    first, skewed = f"{table}_upto_{upper:%Y%m%d}", f"{table}_skewed"
    sequence, primary = _sequence(table), _primary_key(table)
    # The keys go first: the rewrite below then rebuilds only the plain indexes.
    _ddl("ALTER TABLE {} DROP CONSTRAINT {}", table, primary)
    if unique is not None:
        _ddl("ALTER TABLE {} DROP CONSTRAINT {}", table, unique[0])
    _ddl("ALTER TABLE {} ADD COLUMN day date", table)
    _ddl("ALTER TABLE {} ALTER COLUMN day TYPE date USING (created_at AT TIME ZONE 'UTC')::date", table)
    _ddl("ALTER TABLE {} ALTER COLUMN day SET NOT NULL", table)
    _ddl("ALTER TABLE {} ADD CONSTRAINT {} CHECK (day = (created_at AT TIME ZONE 'UTC')::date)", table,
         f"ck_{table}_day")
    _ddl("CREATE TABLE {} AS SELECT * FROM {} WHERE day > %(today)s", skewed, table, today=today)
    _ddl("DELETE FROM {} WHERE day > %(today)s", table, today=today)
    _ddl("ALTER TABLE {} RENAME TO {}", table, first)
    for name, _columns in indexes:
        _ddl("ALTER INDEX {} RENAME TO {}", name, f"{first}{name.removeprefix('ix_' + table)}")
    _ddl("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (day)",
         table, first)
    if sequence:
        _ddl("ALTER SEQUENCE {} OWNED BY {}.id", sequence, table)
    _ddl("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO (%(upper)s)", table, first,
         upper=upper)
    _ddl("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (id, day)", table, f"{table}_pkey")
    if unique is not None:
        op.create_unique_constraint(f"{unique[0]}_day", table, [*unique[1], "day"])
    for name, columns in indexes:  # the first partition's own are attached to these, not built again
        op.create_index(name, table, columns)
    _ddl("CREATE TABLE {} PARTITION OF {} DEFAULT", f"{table}_default", table)
    for day in (upper, upper + timedelta(days=1)):
        _ddl("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (%(lo)s) TO (%(hi)s)", f"{table}_{day:%Y%m%d}",
             table, lo=day, hi=day + timedelta(days=1))
    _ddl("INSERT INTO {} SELECT * FROM {}", table, skewed)
    _ddl("DROP TABLE {}", skewed)


def _sequence(table: str) -> str | None:
    """The bare name of the sequence behind `table`.id."""
    return op.get_bind().scalar(sa.text(
        "SELECT s.relname FROM pg_class s WHERE s.oid = pg_get_serial_sequence(:t, 'id')::regclass"),
        {"t": table})


def _primary_key(table: str) -> str:
    return op.get_bind().scalar(sa.text(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'p'"), {"t": table})


def _ddl(query: str, *names: str, **values: date) -> None:
    """Run `query` with `{}` standing for each of `names`, quoted as identifiers by psycopg2.sql on
    PostgreSQL (by SQLAlchemy's identifier preparer on SQLite), and `%(x)s` for the dates in `values`,
    bound client-side by psycopg2 (as in 0009: a migration keeps its own copy rather than import the
    application's)."""
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
    for table, (unique, indexes) in TABLES.items():
        if op.get_bind().dialect.name != "postgresql":
            with op.batch_alter_table(table) as batch:
                batch.drop_column("day")
            continue
        sequence, plain = _sequence(table), f"{table}_plain"
        _ddl("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)", plain, table)
        if unique is not None:  # the first row of each (request id, version): the one the key allowed before
            key = unique[1]
            _ddl("INSERT INTO {} SELECT DISTINCT ON ({}, {}) * FROM {} ORDER BY {}, {}, id",
                 plain, *key, table, *key)
        else:
            _ddl("INSERT INTO {} SELECT * FROM {}", plain, table)
        if sequence:
            _ddl("ALTER SEQUENCE {} OWNED BY NONE", sequence)
        _ddl("DROP TABLE {}", table)  # the partitioned parent and every partition
        _ddl("ALTER TABLE {} RENAME TO {}", plain, table)
        if sequence:
            _ddl("ALTER SEQUENCE {} OWNED BY {}.id", sequence, table)
        _ddl("ALTER TABLE {} DROP COLUMN day", table)
        _ddl("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (id)", table, f"{table}_pkey")
        if unique is not None:
            op.create_unique_constraint(unique[0], table, unique[1])
        for name, columns in indexes:
            op.create_index(name, table, columns)
