"""Feature projection: turn a request's named or dense features into a row in one version's schema.

Index maps are built once per version, so a request costs one dict lookup per feature and no
database or Ray round trip. Messages name the offending field because callers fix their requests
from them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


class FeatureError(ValueError):
    """Client mistake in the features (gRPC INVALID_ARGUMENT)."""


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

    def project(self, named: Mapping[str, float], dense: Sequence[float], prefix: str = "",
                out: np.ndarray | None = None) -> np.ndarray:
        """One float32 row; `out` lets PredictBatch fill a preallocated matrix in place. `prefix`
        (e.g. "rows[3].") makes messages point at the row inside a batch."""
        row = out if out is not None else np.empty(self.width, dtype=np.float32)
        if named and dense:
            raise FeatureError(f"{prefix}features: set either features (by name) or dense, not both")
        if dense:
            if len(dense) != self.width:
                raise FeatureError(f"{prefix}dense: expected {self.width} values in schema order "
                                   f"({', '.join(self.names)}), got {len(dense)}")
            row[:] = dense
            if not np.isfinite(row).all():
                i = int(np.argmin(np.isfinite(row)))
                raise FeatureError(f"{prefix}dense[{i}] ({self.names[i]}): value must be a finite float32, "
                                   f"got {dense[i]}")
            return row
        if not named:
            raise FeatureError(f"{prefix}features: no features given; expected {', '.join(self.names)}")
        index = self.index
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

    def project_many(self, rows: Iterable[tuple[Mapping[str, float], Sequence[float]]], n: int) -> np.ndarray:
        out = np.empty((n, self.width), dtype=np.float32)
        for i, (named, dense) in enumerate(rows):
            self.project(named, dense, prefix=f"rows[{i}].", out=out[i])
        return out
