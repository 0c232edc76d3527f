"""The feedback data set: what the gateway scored (the logged feature rows of a sample of requests)
joined with what happened (outcomes, by request id), as a time-ordered frame a training run reads.

Frame columns, in this order:

- `request_id`  the gateway's request id (text)
- `timestamp`   when the prediction was made (the prediction's created_at, tz-aware UTC)
- `version`     the version that scored the request
- `score`       the score it returned
- one float64 column per feature, named by the scoring version's feature schema (the gateway logs
  the row in that version's schema order); a feature the scoring version did not have is NaN
- `outcome`     the recorded outcome value (NaN in `served_frame` when none arrived yet)
- `label`       1/0: the outcome itself when outcomes are binary, else outcome > `threshold`

`version`, `score` and `outcome` are numeric but are not features: pass the feature list explicitly
to `training.pipeline.train` (`feature_names(frame)` gives it). The frame's `attrs` carry
`feature_names`, `since`, `until` and `skipped` (logged rows whose length did not match the schema).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from registry import Registry, VersionInfo
from registry.training_runs import ServedRow, served_rows
from training.datasets import LABEL, TIMESTAMP

REQUEST_ID = "request_id"
VERSION = "version"
SCORE = "score"
OUTCOME = "outcome"
META_COLUMNS = (REQUEST_ID, TIMESTAMP, VERSION, SCORE, OUTCOME, LABEL)

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_window(text: str) -> timedelta:
    """'90d', '12h', '30m', '2w', '45s' -> timedelta (positive)."""
    m = _WINDOW.match(text or "")
    if not m:
        raise ValueError(f"window: expected a number and a unit (s, m, h, d, w), e.g. 90d; got {text!r}")
    value = float(m.group(1))
    if value <= 0:
        raise ValueError(f"window: must be positive, got {text!r}")
    return timedelta(**{_UNITS[m.group(2)]: value})


def is_binary(values: np.ndarray) -> bool:
    """True when every (non-NaN) value is 0 or 1."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return bool(np.isin(v, (0.0, 1.0)).all())


def feature_names(frame: pd.DataFrame) -> list[str]:
    """The feature columns of a feedback frame, in frame order."""
    names = frame.attrs.get("feature_names")
    if names is not None:
        return list(names)
    return [str(c) for c in frame.columns if c not in META_COLUMNS]


def production_version(registry: Registry, model: str) -> VersionInfo | None:
    """The version with status production, else the one with the most traffic (lowest number on a
    tie), else None."""
    info = registry.get_model(model)
    prod = [v for v in info.versions if v.status == "production"]
    if prod:
        return prod[-1]
    weights = dict(info.split.weights)
    if not weights:
        return None
    best = max(weights, key=lambda v: (weights[v], -v))
    return next(v for v in info.versions if v.version == best)


def _schemas(registry: Registry, model: str) -> dict[int, tuple[str, ...]]:
    return {v.version: v.feature_names for v in registry.list_versions(model)}


def _frame(rows: Sequence[ServedRow], schemas: dict[int, tuple[str, ...]],
           names: Sequence[str] | None, threshold: float) -> pd.DataFrame:
    if names is None:
        seen: dict[str, None] = {}
        for version in sorted({r.version for r in rows} or schemas):
            for n in schemas.get(version, ()):
                seen.setdefault(n, None)
        names = list(seen)
    names = list(names)
    col = {n: i for i, n in enumerate(names)}
    n = len(rows)
    X = np.full((n, len(names)), np.nan, dtype=np.float64)
    keep = np.ones(n, dtype=bool)
    positions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for version, schema in schemas.items():
        pairs = [(i, col[f]) for i, f in enumerate(schema) if f in col]
        src = np.array([p[0] for p in pairs], dtype=np.int64)
        dst = np.array([p[1] for p in pairs], dtype=np.int64)
        positions[version] = (src, dst)
    for i, r in enumerate(rows):
        schema = schemas.get(r.version)
        if schema is None or len(r.features) != len(schema):
            keep[i] = False
            continue
        src, dst = positions[r.version]
        values = np.asarray(r.features, dtype=np.float64)
        X[i, dst] = values[src]
    outcome = np.array([np.nan if r.outcome is None else r.outcome for r in rows], dtype=np.float64)
    columns: dict[str, object] = {
        REQUEST_ID: [r.request_id for r in rows],
        TIMESTAMP: pd.to_datetime([r.created_at for r in rows], utc=True),
        VERSION: np.array([r.version for r in rows], dtype=np.int64),
        SCORE: np.array([r.score for r in rows], dtype=np.float64),
    }
    for j, name in enumerate(names):
        columns[name] = X[:, j]
    columns[OUTCOME] = outcome
    df = pd.DataFrame(columns)
    if not df.empty:
        df = df.loc[keep]
    binary = is_binary(df[OUTCOME].to_numpy())
    known = ~df[OUTCOME].isna()
    labels = df[OUTCOME] if binary else (df[OUTCOME] > threshold).astype(np.float64)
    df[LABEL] = labels.where(known)
    df = df.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True)
    df.attrs.update(feature_names=names, skipped=int((~keep).sum()), binary_outcome=binary)
    return df


def served_frame(
    registry: Registry,
    model: str,
    *,
    since: datetime,
    until: datetime,
    versions: Sequence[int] | None = None,
    features: Sequence[str] | None = None,
    threshold: float = 0.0,
) -> pd.DataFrame:
    """Every logged prediction with features in [since, until), outcome or not (drift reads this).
    `features` fixes the feature columns (e.g. one version's schema); default: the union of the
    scoring versions' schemas (of all versions when the window is empty). `label` is float here:
    NaN where no outcome arrived."""
    rows = served_rows(registry, model, since=since, until=until, versions=versions, with_outcome=False)
    df = _frame(rows, _schemas(registry, model), features, threshold)
    df.attrs.update(since=since, until=until)
    return df


def feedback_frame(
    registry: Registry,
    model: str,
    *,
    since: datetime,
    until: datetime,
    versions: Sequence[int] | None = None,
    features: Sequence[str] | None = None,
    threshold: float = 0.0,
) -> pd.DataFrame:
    """Logged predictions with features AND an outcome in [since, until), joined by request id,
    oldest first, with an int64 `label` (see the module docstring for the columns)."""
    rows = served_rows(registry, model, since=since, until=until, versions=versions, with_outcome=True)
    df = _frame(rows, _schemas(registry, model), features, threshold)
    df[LABEL] = df[LABEL].astype(np.int64)
    df.attrs.update(since=since, until=until)
    return df
