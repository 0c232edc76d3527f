"""Feature projection: turn a request's named or dense features into a row in one version's schema.

Index maps are built once per version, so a request costs one map lookup per feature and no
database or Ray round trip. Messages name the offending field because callers fix their requests
from them. The common cases have fast paths (measured: these run once per request at thousands of
requests per second): a named row is read in schema order with one lookup per name, a dense row is
copied through a list, and a batch of dense rows becomes one matrix in one numpy call; the slow,
precise checks run only to word an error."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol, overload

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
MAX_BATCH_ROWS = 10_000  # rows of one PredictBatch, as rows or as a packed matrix


class FeatureError(ValueError):
    """Client mistake in the features (gRPC INVALID_ARGUMENT)."""


class RowLike(Protocol):
    """What projection reads from a row: chimera.v1.PredictRequest, or a PackedRows row (DenseRow)."""

    @property
    def features(self) -> Mapping[str, float]: ...

    @property
    def dense(self) -> Sequence[float]: ...


class DenseRow(NamedTuple):
    """One row of a PackedRows, as the slow paths (failover, shadow re-projection) read rows."""

    routing_key: str
    request_id: str
    features: Mapping[str, float]
    dense: Sequence[float]


class PackedRows(Sequence[DenseRow]):
    """The rows of a packed PredictBatch (chimera.v1.DenseMatrix): an [n, cols] float32 matrix read
    straight from the request's bytes, plus its routing keys and request ids (one per row, "" where
    none was given). No object per row exists unless a slow path asks for one."""

    __slots__ = ("matrix", "routing_keys", "request_ids")

    def __init__(self, matrix: np.ndarray, routing_keys: list[str], request_ids: list[str]) -> None:
        self.matrix = matrix
        self.routing_keys = routing_keys
        self.request_ids = request_ids

    @classmethod
    def from_f32(cls, data: bytes, cols: int, routing_keys: list[str], request_ids: list[str]) -> PackedRows:
        """The rows of little-endian float32 `data`, `cols` values each, without copying the values (the
        matrix is a read-only view of the bytes). Keys and ids: one per row, or none."""
        if cols <= 0:
            raise FeatureError(f"matrix.cols: must be positive, got {cols}")
        size = len(data)
        if size == 0 or size % (4 * cols):
            raise FeatureError(f"matrix.f32: {size} bytes is not a whole number of rows of {cols} float32 "
                               f"values ({4 * cols} bytes each)")
        n = size // (4 * cols)
        if n > MAX_BATCH_ROWS:
            raise FeatureError(f"matrix: {n} rows, limit {MAX_BATCH_ROWS}")
        for name, values in (("routing_keys", routing_keys), ("request_ids", request_ids)):
            if values and len(values) != n:
                raise FeatureError(f"matrix.{name}: {len(values)} given for {n} rows "
                                   "(give one per row, or none)")
        x = np.frombuffer(data, dtype="<f4").reshape(n, cols)
        return cls(x, routing_keys or [""] * n, request_ids or [""] * n)

    def __len__(self) -> int:
        return len(self.matrix)

    @overload
    def __getitem__(self, i: int) -> DenseRow: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[DenseRow]: ...
    def __getitem__(self, i: int | slice) -> DenseRow | Sequence[DenseRow]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return DenseRow(self.routing_keys[i], self.request_ids[i], {}, self.matrix[i])


class Schema:
    """Ordered feature names of one version with a precomputed name -> column map."""

    __slots__ = ("names", "index", "width", "known")

    def __init__(self, names: Sequence[str], known: Iterable[str] = ()) -> None:
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.width = len(self.names)
        # Every feature name some version of the model uses: a request may carry the union, so a
        # canary with a different feature set works; a name no version knows is a client mistake.
        self.known = frozenset(known) | frozenset(self.names)

    # ------------------------------------------------------------------ one row
    def project_one(self, named: Mapping[str, float], dense: Sequence[float]) -> np.ndarray:
        """A [1, width] float32 row (the micro-batcher's unit)."""
        w = self.width
        if dense:
            if named or len(dense) != w:
                return self.project(named, dense).reshape(1, w)  # raises with the precise message
            vals = list(dense)
        elif named:
            if len(named) < w:
                return self.project(named, dense).reshape(1, w)
            try:
                vals = [named[n] for n in self.names]
            except KeyError:  # a schema name is missing
                return self.project(named, dense).reshape(1, w)
            if len(named) > w and not all(k in self.known for k in named):  # the union of versions' names
                return self.project(named, dense).reshape(1, w)
        else:
            return self.project(named, dense).reshape(1, w)
        # nan and inf survive a sum; a finite double beyond float32's range would overflow the cast.
        if not math.isfinite(sum(vals)) or max(map(abs, vals)) > F32_MAX:
            return self.project(named, dense).reshape(1, w)
        return np.array(vals, dtype=np.float32).reshape(1, w)

    def project(self, named: Mapping[str, float], dense: Sequence[float], prefix: str = "",
                out: np.ndarray | None = None) -> np.ndarray:
        """One float32 row with every check spelled out; `out` fills a preallocated matrix row.
        `prefix` (e.g. "rows[3].") makes messages point at the row inside a batch."""
        row = out if out is not None else np.empty(self.width, dtype=np.float32)
        if named and dense:
            raise FeatureError(f"{prefix}features: set either features (by name) or dense, not both")
        if dense:
            if len(dense) != self.width:
                raise FeatureError(f"{prefix}dense: expected {self.width} values in schema order "
                                   f"({', '.join(self.names)}), got {len(dense)}")
            with np.errstate(over="ignore", invalid="ignore"):
                row[:] = list(dense)
            if not np.isfinite(row).all():
                i = int(np.argmin(np.isfinite(row)))
                raise FeatureError(f"{prefix}dense[{i}] ({self.names[i]}): value must be a finite float32, "
                                   f"got {dense[i]}")
            return row
        if not named:
            raise FeatureError(f"{prefix}features: no features given; expected {', '.join(self.names)}")
        index = self.index
        with np.errstate(over="ignore", invalid="ignore"):
            if len(named) == self.width and all(k in index for k in named):
                for name, value in named.items():
                    row[index[name]] = value
            else:
                unknown = sorted(k for k in named if k not in self.known)
                if unknown:
                    raise FeatureError(f"{prefix}features[{unknown[0]!r}]: unknown feature; expected "
                                       f"{', '.join(self.names)}")
                missing = [n for n in self.names if n not in named]
                if missing:
                    raise FeatureError(f"{prefix}features[{missing[0]!r}]: missing feature")
                for i, name in enumerate(self.names):
                    row[i] = named[name]
        if not np.isfinite(row).all():
            name = self.names[int(np.argmin(np.isfinite(row)))]  # only the version's own columns count
            raise FeatureError(f"{prefix}features[{name!r}]: value must be a finite float32, "
                               f"got {named[name]}")
        return row

    # ------------------------------------------------------------------ many rows
    def project_rows(self, rows: Sequence[RowLike], positions: Sequence[int] | None = None) -> np.ndarray:
        """A [len(rows), width] float32 matrix. `positions` are the rows' indexes in the caller's
        request, for error messages (default 0..n-1). An all-dense batch is one numpy call."""
        if isinstance(rows, PackedRows):
            return self._check_packed(rows.matrix)
        n, w = len(rows), self.width
        pos = positions if positions is not None else range(n)
        dense = [r.dense for r in rows]
        lengths = list(map(len, dense))
        if n and min(lengths) == w == max(lengths) and not any(map(len, (r.features for r in rows))):
            with np.errstate(over="ignore", invalid="ignore"):
                m = np.fromiter(itertools.chain.from_iterable([d[:] for d in dense]), dtype=np.float32,
                                count=n * w).reshape(n, w)
        else:
            m = np.empty((n, w), dtype=np.float32)
            for j, r in enumerate(rows):
                self.project(r.features, r.dense, prefix=f"rows[{pos[j]}].", out=m[j])
        finite = np.isfinite(m).all(axis=1)
        if not finite.all():
            j = int(np.argmin(finite))
            self.project(rows[j].features, rows[j].dense, prefix=f"rows[{pos[j]}].")  # raises
        return m

    def _check_packed(self, m: np.ndarray) -> np.ndarray:
        if m.shape[1] != self.width:
            raise FeatureError(f"matrix.cols: expected {self.width} values per row in schema order "
                               f"({', '.join(self.names)}), got {m.shape[1]}")
        finite = np.isfinite(m)
        if not finite.all():
            j, i = map(int, np.argwhere(~finite)[0])
            raise FeatureError(f"matrix.f32: row {j}, column {i} ({self.names[i]}): value must be a finite "
                               f"float32, got {m[j, i]}")
        return m
