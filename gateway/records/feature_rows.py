"""A logged row's features in the two forms the prediction log writes: packed little-endian float32
vectors (`matrix_f32`: what both databases store, registry.models.FeatureVector reads them back) and
JSON arrays of float32-exact numbers (`matrix_json`, `features_json`: spill and dead-letter lines, which
are JSON and may be replayed into the other database). Split from gateway.records.inserter, which
writes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_FORMATS: dict[int, str] = {}

try:  # optional speed-up: orjson encodes a float32 matrix in C with the shortest exact digits
    import orjson

    _ORJSON_NUMPY: int | None = orjson.OPT_SERIALIZE_NUMPY
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]
    _ORJSON_NUMPY = None


def features_json(values: Sequence[float]) -> str:
    """A JSON array of float32-exact numbers (9 significant digits)."""
    n = len(values)
    fmt = _FORMATS.get(n)
    if fmt is None:
        fmt = _FORMATS[n] = "[" + ",".join(["%.9g"] * n) + "]"
    return fmt % tuple(values)


def matrix_json(m: np.ndarray) -> list[str]:
    """One JSON array per row of a float32 matrix [n, w] (float32-exact numbers)."""
    n = len(m)
    if n == 0:
        return []
    if _ORJSON_NUMPY is not None and m.shape[1] > 0:
        text = orjson.dumps(np.ascontiguousarray(m, dtype=np.float32), option=_ORJSON_NUMPY).decode()
        return text[1:-1].replace("],[", "]\n[").split("\n")  # "[[a,b],[c,d]]" -> ["[a,b]", "[c,d]"]
    return [features_json(row) for row in m.tolist()]


def matrix_f32(m: np.ndarray) -> list[bytes]:
    """One packed little-endian float32 vector per row of a matrix [n, w] (SQLite's feature rows:
    registry.models.FeatureVector reads them back as lists of floats)."""
    n = len(m)
    if n == 0:
        return []
    data = np.ascontiguousarray(m, dtype="<f4").tobytes()
    step = len(data) // n
    return [data[i:i + step] for i in range(0, len(data), step)] if step else [b""] * n
