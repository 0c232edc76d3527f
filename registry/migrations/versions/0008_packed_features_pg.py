"""predictions.features on PostgreSQL: bytea holding packed little-endian float32, instead of json.

Why (issue 17): the prediction log's ingest rate on PostgreSQL. A row's JSON feature text (32 features:
~300 characters) is most of what the server parses and stores per row; measured with COPY into a fresh
table, the server's own cost was ~17 us a row with JSON features against ~9.4 us with packed float32.
SQLite has stored packed vectors since before this revision without a schema change (it keeps any value
in any column); registry.models.FeatureVector reads both forms back as the same list of floats, so
on SQLite this revision changes nothing.

Upgrade converts every stored JSON array in SQL (no round trip through Python: the table can be big),
each element to the float32 PostgreSQL's real type rounds it to, packed little-endian: what
gateway.records.feature_rows.matrix_f32 writes. JSON null elements (FiniteJSON's NaN/inf) become NaN, which
reads back as null again; values beyond float32's range become +-Infinity, as numpy's cast would; a
JSON null document (an old writer's None) becomes SQL NULL. The ALTER rewrites the table (an exclusive
lock for its duration: plan it like any rewrite of a big table; prune first).
Downgrade decodes the bits in SQL back into JSON arrays of the shortest decimal of each float32 (PG's
float4 output, like the writer's orjson), NaN/inf as null.

The helper functions live in pg_temp: they vanish with the migration's session.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# One JSON element (text) to 4 little-endian bytes. float4send gives the IEEE bits big-endian; doubles
# beyond float32's range become +-Infinity first (PostgreSQL's float8 -> float4 cast raises instead).
_PACK = r"""
CREATE FUNCTION pg_temp.chimera_f32le(v json) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN json_typeof(v) <> 'number' THEN '\x0000c07f'::bytea
    ELSE (SELECT substr(b, 4, 1) || substr(b, 3, 1) || substr(b, 2, 1) || substr(b, 1, 1)
          FROM (SELECT float4send(CASE WHEN abs(d) >= 3.4028235677973366e38
                                       THEN CASE WHEN d > 0 THEN 'Infinity'::real ELSE '-Infinity'::real END
                                       ELSE d::real END) AS b
                FROM (SELECT v::text::float8 AS d) AS n) AS s)
  END
$$;
CREATE FUNCTION pg_temp.chimera_pack(j json) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN j IS NULL OR json_typeof(j) = 'null' THEN NULL
    ELSE coalesce((SELECT string_agg(pg_temp.chimera_f32le(e), ''::bytea ORDER BY i)
                   FROM json_array_elements(j) WITH ORDINALITY AS a(e, i)), '\x'::bytea)
  END
$$;
"""

# 4 little-endian bytes to a JSON number (text), or 'null' for NaN/inf (what FiniteJSON stores).
_UNPACK = r"""
CREATE FUNCTION pg_temp.chimera_f32_text(bits bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN e = 255 THEN 'null'
    WHEN e = 0 THEN ((CASE WHEN s = 1 THEN -1 ELSE 1 END) * m * 2.0::float8 ^ -149)::real::text
    ELSE ((CASE WHEN s = 1 THEN -1 ELSE 1 END) * (8388608 + m) * 2.0::float8 ^ (e - 150))::real::text
  END
  FROM (SELECT (bits >> 31) & 1 AS s, ((bits >> 23) & 255)::int AS e, (bits & 8388607)::float8 AS m) AS f
$$;
CREATE FUNCTION pg_temp.chimera_unpack(b bytea) RETURNS json LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN b IS NULL THEN NULL
    ELSE ('[' || coalesce((SELECT string_agg(pg_temp.chimera_f32_text(
                 get_byte(b, k)::bigint | (get_byte(b, k + 1)::bigint << 8)
                 | (get_byte(b, k + 2)::bigint << 16) | (get_byte(b, k + 3)::bigint << 24)), ',' ORDER BY k)
               FROM generate_series(0, length(b) - 4, 4) AS g(k)), '') || ']')::json
  END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite: no schema change (see the module docstring)
    op.execute(_PACK)
    op.execute("ALTER TABLE predictions ALTER COLUMN features TYPE bytea "
               "USING pg_temp.chimera_pack(features)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_UNPACK)
    op.execute("ALTER TABLE predictions ALTER COLUMN features TYPE json "
               "USING pg_temp.chimera_unpack(features)")
