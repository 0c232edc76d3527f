"""Walk-forward splits by time: the model is always evaluated on rows that come after everything it
was trained on, as it would be in production. Nothing here ever shuffles.

Cuts are made by row position on time-ordered data and then moved forward past equal timestamps,
so no timestamp ever appears in two windows (rows at the same instant cannot leak across a cut).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.datasets import TIMESTAMP


@dataclass(frozen=True)
class TimeSplit:
    """Three consecutive, non-overlapping windows in time order."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


@dataclass(frozen=True)
class Fold:
    """One expanding-window fold: train on everything before `test`, which follows it in time."""

    index: int
    train: pd.DataFrame
    test: pd.DataFrame


def _timestamps(df: pd.DataFrame) -> np.ndarray:
    if TIMESTAMP not in df.columns:
        raise ValueError(f"split: data has no {TIMESTAMP!r} column")
    ts = df[TIMESTAMP]
    if not ts.is_monotonic_increasing:
        raise ValueError(f"split: rows must be sorted by {TIMESTAMP!r} (load_dataset sorts them)")
    return pd.to_datetime(ts, utc=True).dt.as_unit("ns").astype("int64").to_numpy()


def _cut(ts: np.ndarray, pos: int) -> int:
    """First position >= pos that starts a new timestamp (so equal timestamps stay together)."""
    pos = min(max(pos, 0), len(ts))
    while 0 < pos < len(ts) and ts[pos] == ts[pos - 1]:
        pos += 1
    return pos


def time_split(
    df: pd.DataFrame, train: float = 0.6, validation: float = 0.2, test: float = 0.2
) -> TimeSplit:
    """Train / validation / test windows by time. The fractions are of the row count and are
    normalised to sum to one, so (3, 1, 1) works as well as (0.6, 0.2, 0.2). A window whose fraction is
    0 is empty (e.g. no validation window for an uncalibrated baseline); every other window must end
    up non-empty, otherwise ValueError (a model evaluated on nothing is worse than an error)."""
    fractions = (train, validation, test)
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split: fractions must be >= 0 with a positive sum, got {fractions}")
    ts = _timestamps(df)
    total = sum(fractions)
    n = len(df)
    a = _cut(ts, int(round(n * train / total)))
    b = _cut(ts, max(a, int(round(n * (train + validation) / total))))
    out = TimeSplit(df.iloc[:a], df.iloc[a:b], df.iloc[b:])
    sizes = {"train": len(out.train), "validation": len(out.validation), "test": len(out.test)}
    if any(sizes[name] == 0 and frac > 0 for name, frac in zip(sizes, fractions, strict=True)):
        raise ValueError(f"split: {n} rows give an empty window ({sizes}); use more data")
    return out


def walk_forward_folds(df: pd.DataFrame, n_folds: int) -> Iterator[Fold]:
    """Expanding-window folds: the rows are cut into n_folds + 1 consecutive blocks; fold k trains on
    blocks 0..k and tests on block k+1. Use it to see how a model family holds up as time moves on
    (e.g. across a drift), which a single split cannot show."""
    if n_folds < 1:
        raise ValueError(f"walk_forward_folds: n_folds must be >= 1, got {n_folds}")
    ts = _timestamps(df)
    n = len(df)
    bounds = [0]
    for k in range(1, n_folds + 1):
        bounds.append(max(bounds[-1], _cut(ts, int(round(n * k / (n_folds + 1))))))
    bounds.append(n)
    if any(end <= start for start, end in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError(f"walk_forward_folds: {n} rows are too few for {n_folds} folds")
    # Checked eagerly above, so a bad call fails where it is made, not at the first next().
    return (Fold(index=k, train=df.iloc[: bounds[k + 1]], test=df.iloc[bounds[k + 1] : bounds[k + 2]])
            for k in range(n_folds))
