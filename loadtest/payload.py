"""Request payloads: feature rows drawn from a data file, or generated from the version's feature
schema so a load test needs nothing but a model name.

Rows are sent by name (the gateway projects named features onto each version's schema), so the same
rows work for any version with the same feature names. A generated row looks like real traffic where
we can: names that match the synthetic trading-signal generator (training.datasets) take its values
(realistic scales, e.g. spread_bp ~ 1.5, funding_rate ~ 1e-4); any other name gets N(0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROWS = 1024  # distinct rows cycled through; enough variety, cheap to pickle to workers
NON_FEATURE_COLUMNS = frozenset({"timestamp", "net_roi", "label"})


class PayloadError(ValueError):
    """No usable payload: the message says what to pass instead."""


@dataclass(frozen=True)
class Payload:
    """Rows of named features, and where they came from (for the report)."""

    rows: tuple[dict[str, float], ...]
    source: str
    feature_names: tuple[str, ...]


def from_file(path: str | Path, feature_names: Sequence[str] | None = None, *,
              max_rows: int = DEFAULT_ROWS, seed: int = 0) -> Payload:
    """Rows from a CSV or Parquet file. With a known schema the schema's columns are taken (all must
    be present); without one, every numeric column except timestamp/net_roi/label is a feature.
    Rows with a missing or non-finite value are skipped; at most max_rows are sampled."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise PayloadError(f"--data: {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif suffix in (".csv", ".txt", ".gz"):
        df = pd.read_csv(p)
    else:
        raise PayloadError(f"--data: {p.name}: expected a .csv or .parquet file")
    if feature_names:
        missing = [n for n in feature_names if n not in df.columns]
        if missing:
            raise PayloadError(f"--data: {p.name} lacks feature column(s) {', '.join(missing[:5])} "
                               f"of the version's schema")
        cols = list(feature_names)
    else:
        cols = [c for c in df.columns if str(c) not in NON_FEATURE_COLUMNS
                and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        if not cols:
            raise PayloadError(f"--data: {p.name} has no numeric feature columns")
    values = df[cols].astype("float64").to_numpy()
    values = values[np.isfinite(values).all(axis=1)]
    if len(values) == 0:
        raise PayloadError(f"--data: {p.name} has no row with finite values in "
                           f"{', '.join(map(str, cols[:5]))}")
    if len(values) > max_rows:
        idx = np.random.default_rng(seed).choice(len(values), size=max_rows, replace=False)
        values = values[np.sort(idx)]
    names = tuple(str(c) for c in cols)
    return Payload(rows=_rows(names, values), source=f"file:{p}", feature_names=names)


def from_schema(feature_names: Sequence[str], *, n_rows: int = DEFAULT_ROWS, seed: int = 0) -> Payload:
    """Generated rows for a feature schema (see the module docstring for how values are chosen)."""
    names = tuple(feature_names)
    if not names:
        raise PayloadError("feature schema is empty")
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1.0, size=(n_rows, len(names)))
    synthetic = _synthetic_columns(names, n_rows, seed)
    for j, name in enumerate(names):
        if name in synthetic:
            values[:, j] = synthetic[name]
    matched = sum(1 for n in names if n in synthetic)
    if matched == len(names):
        source = "synthetic_signals"
    elif matched:
        source = f"synthetic_signals ({matched} of {len(names)} features) + N(0,1)"
    else:
        source = "N(0,1)"
    return Payload(rows=_rows(names, values), source=source, feature_names=names)


def _synthetic_columns(names: Sequence[str], n_rows: int, seed: int) -> Mapping[str, np.ndarray]:
    """Columns of the synthetic trading-signal generator whose names appear in the schema. Imported
    lazily: the training package is optional at load-test time and then we fall back to N(0, 1)."""
    try:
        from training.datasets import DOMAIN_FEATURES, synthetic_signals
    except Exception:  # training (or its dependencies) not installed
        return {}
    wanted = set(names)
    n_noise = 0
    for n in names:
        if n.startswith("noise_") and n[6:].isdigit():
            n_noise = max(n_noise, int(n[6:]) + 1)
    if not (wanted & set(DOMAIN_FEATURES)) and not n_noise:
        return {}
    df = synthetic_signals(n_rows, seed=seed, n_noise=min(n_noise, 1000))
    return {c: df[c].to_numpy(dtype=np.float64) for c in df.columns if c in wanted}


def _rows(names: Sequence[str], values: np.ndarray) -> tuple[dict[str, float], ...]:
    return tuple({n: float(v) for n, v in zip(names, row, strict=True) if math.isfinite(v)}
                 for row in values)
