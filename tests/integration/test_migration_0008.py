"""Migration 0008 (predictions.features as packed float32 bytea on PostgreSQL) on both backends: rows a
0007 database stored as JSON read back as the same floats after the upgrade, ORM and log writes store
one packed form on PostgreSQL, and the downgrade gives JSON arrays back (SQLite: no schema change)."""

from __future__ import annotations

import time

import numpy as np
from sqlalchemy import select, text

from gateway.records.inserter import Inserter
from registry import Registry
from registry.migrate import upgrade
from registry.models import Prediction
from registry.repository import PredictionRow
from tests.harness import alembic_downgrade

# What a 0007 database held: JSON arrays (FiniteJSON wrote NaN as null), a JSON null document (an old
# writer's None), an empty row, values at and beyond float32's range, and SQL NULL.
OLD_ROWS = {
    "j-plain": "[1, 2.5, 0.1]",
    "j-null-doc": "null",
    "j-empty": "[]",
    "j-edges": "[3.40282347e38, -0.0, 1e-45, 1e39, null, 123456789]",
    "j-none": None,
}
# How each reads back after the upgrade (the float32 values, as their shortest decimals; NaN/inf as None).
AFTER = {
    "j-plain": [1.0, 2.5, 0.1],
    "j-null-doc": None,
    "j-empty": [],
    "j-edges": [3.4028235e38, -0.0, 1e-45, None, None, 123456790.0],
    "j-none": None,
}


def _features(reg: Registry) -> dict[str, object]:
    with reg.session() as s:
        return dict(s.execute(select(Prediction.request_id, Prediction.features)).tuples().all())


def test_json_rows_become_packed_and_come_back(registry_url: str) -> None:
    reg = Registry(registry_url)
    pg = reg.engine.dialect.name == "postgresql"
    try:
        upgrade(registry_url, reg.engine, revision="0007")
        insert = ("INSERT INTO predictions (request_id, model, version, routing_key, score, latency_ms, "
                  "created_at, features) VALUES (:r, 'm', 1, '', 0.5, 1.0, CURRENT_TIMESTAMP, "
                  + ("CAST(:f AS json))" if pg else ":f)"))
        with reg.engine.begin() as c:
            c.execute(text(insert), [{"r": r, "f": f} for r, f in OLD_ROWS.items()])
        upgrade(registry_url, reg.engine)
        got = _features(reg)
        if pg:
            assert got == AFTER
            with reg.engine.connect() as c:
                stored = dict(c.execute(text("SELECT request_id, features FROM predictions")).tuples().all())
            assert bytes(stored["j-plain"]) == np.array([1, 2.5, 0.1], dtype="<f4").tobytes()
            assert bytes(stored["j-empty"]) == b"" and stored["j-null-doc"] is None
        else:  # SQLite: nothing converted; JSON text reads as it always did
            assert got["j-plain"] == [1, 2.5, 0.1] and got["j-empty"] == [] and got["j-none"] is None

        # New rows: through the ORM (a list) and through the log writer (packed), one form on PostgreSQL.
        reg.insert_predictions([PredictionRow("orm", "m", 1, 0.5, 1.0, features=[0.1, float("nan"), 3.0])])
        ins = Inserter(reg)
        packed = ins.encode_matrix(np.array([[0.1, -1.5]], dtype=np.float32))
        ins.insert([("log", "m", 1, "", 0.5, 1.0, ins.timestamp(time.time()), packed[0], None, False, None)])
        got = _features(reg)
        assert got["orm"] == [0.1, None, 3.0] and got["log"] == [0.1, -1.5]
        if pg:
            with reg.engine.connect() as c:
                q = "SELECT DISTINCT pg_typeof(features)::text FROM predictions"
                assert set(c.execute(text(q)).scalars()) == {"bytea"}

        alembic_downgrade(reg, "0007")
        if pg:  # back to json: the shortest decimal of each float32, NaN/inf as null
            with reg.engine.connect() as c:
                q = "SELECT request_id, features::text FROM predictions"
                back = dict(c.execute(text(q)).tuples().all())
            assert back["j-plain"] == "[1,2.5,0.1]" and back["j-empty"] == "[]"
            assert back["j-edges"] == "[3.4028235e+38,-0,1e-45,null,null,1.2345679e+08]"
            assert back["orm"] == "[0.1,null,3]" and back["log"] == "[0.1,-1.5]"
            assert back["j-null-doc"] is None and back["j-none"] is None
        got = _features(reg)  # the 0007 column type reads them (json on PG, either form on SQLite)
        assert got["log"] == [0.1, -1.5] and got["j-plain"] in ([1, 2.5, 0.1], [1.0, 2.5, 0.1])
    finally:
        reg.dispose()
