"""Trading-signal data sets: a synthetic generator with a known signal, file loading, feature
discovery and a content hash for lineage.

Column conventions (shared by the generator and `load_dataset`):

- `timestamp`  tz-aware UTC datetimes, non-decreasing (rows are in time order; splits rely on it)
- `net_roi`    ROI of the trade after fees, spread and funding (a fraction, 0.001 = 10 bp); optional
               in loaded files
- `label`      1 when net_roi > threshold else 0 (what the classifiers predict)
- every other numeric column is a feature (`feature_columns`), always as float64
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

TIMESTAMP = "timestamp"
NET_ROI = "net_roi"
LABEL = "label"
NON_FEATURES = frozenset({TIMESTAMP, NET_ROI, LABEL})

DOMAIN_FEATURES: tuple[str, ...] = (
    "signal_strength",
    "momentum_1h",
    "ob_imbalance",
    "volume_zscore",
    "realized_vol",
    "atr_multiple",
    "funding_rate",
    "spread_bp",
    "regime",
    "hour_of_day",
)
"""Features the generator always emits, in column order. `noise_<i>` columns follow them."""

START = pd.Timestamp("2024-01-01", tz="UTC")
FEES_BP = 8.0  # round-trip taker fees, in basis points
# Noise of the trade outcome per unit of realized volatility (bp). Tuned so that a good model reaches
# a test AUC of roughly 0.75 and the task is neither trivial nor hopeless.
OUTCOME_NOISE_BP = 30.0


def synthetic_signals(
    n_rows: int,
    seed: int = 0,
    *,
    n_noise: int = 0,
    shift_at: float | None = None,
    quality: float = 1.0,
    threshold: float = 0.0,
) -> pd.DataFrame:
    """A reproducible, time-ordered data set of trade signals whose outcome depends on the features.

    Why synthetic: tests, demos and benchmarks need data with a *known* signal (so a model that does
    not beat chance is a bug, not bad luck) and a knob for concept drift, without shipping data.

    The gross edge of a trade (bp) is a mix of linear terms, a regime interaction (momentum pays in
    trending markets and reverses in ranging ones, which a linear baseline cannot fully express) and
    a sweet spot in `atr_multiple`; fees, spread and funding are subtracted; outcome noise grows
    with realized volatility. `label` = net_roi > `threshold`.

    - `n_noise`: extra pure-noise features `noise_0..` (e.g. 22 gives the 32-feature benchmark model).
    - `shift_at`: fraction of the time span (0..1) after which the world changes: the momentum
      effect flips sign, the order-book signal weakens, volatility, spreads and funding rise and the
      volatile regime becomes common. Rows before it are identical to the unshifted data set.
    - `quality`: multiplies the feature-driven edge (1 = default signal, 0 = only costs are
      informative); a way to make harder data sets.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows: must be >= 1, got {n_rows}")
    if n_noise < 0:
        raise ValueError(f"n_noise: must be >= 0, got {n_noise}")
    if shift_at is not None and not 0.0 <= shift_at <= 1.0:
        raise ValueError(f"shift_at: must be within 0..1, got {shift_at}")
    rng = np.random.default_rng(seed)
    n = n_rows

    # Strictly increasing timestamps: at least a minute apart, bursty (exponential gaps).
    gaps = 60 + np.floor(rng.exponential(240.0, size=n)).astype(np.int64)
    gaps[0] = 0
    timestamp = START + pd.to_timedelta(np.cumsum(gaps), unit="s")
    shifted = np.zeros(n, dtype=bool)
    if shift_at is not None:
        shifted = np.arange(n) >= int(round(shift_at * n))

    # Market regime: a persistent Markov chain (0 trending, 1 ranging, 2 volatile). After the
    # shift, the volatile regime becomes much more likely.
    regime = _regimes(rng, n, shifted)

    realized_vol = np.exp(rng.normal(np.log(0.5), 0.3, size=n)) * np.choose(regime, [1.0, 0.7, 1.8])
    realized_vol = realized_vol * np.where(shifted, 1.4, 1.0)
    signal_strength = rng.normal(0.0, 1.0, size=n)
    momentum_1h = 0.4 * signal_strength + np.sqrt(1 - 0.4**2) * rng.normal(0.0, 1.0, size=n)
    ob_imbalance = np.tanh(rng.normal(0.0, 0.8, size=n))
    volume_zscore = rng.standard_t(5, size=n)
    atr_multiple = rng.uniform(0.5, 3.0, size=n)
    funding_rate = _ar1(rng, n, phi=0.98, sigma=3e-5) + np.where(shifted, 3e-4, 1e-4)
    hour_of_day = (timestamp.hour + timestamp.minute / 60.0).to_numpy(dtype=np.float64)
    thin_hours = (hour_of_day < 6.0).astype(np.float64)  # Asian night: thinner books, wider spreads
    spread_bp = np.exp(rng.normal(np.log(1.5), 0.35, size=n)) * (1.0 + 0.5 * thin_hours)
    spread_bp = spread_bp * np.choose(regime, [1.0, 0.9, 1.6]) * np.where(shifted, 1.5, 1.0)

    momentum_sign = np.choose(regime, [1.0, -1.0, 0.3]) * np.where(shifted, -1.0, 1.0)
    edge_bp = (
        14.0 * signal_strength
        + 9.0 * momentum_sign * momentum_1h
        + np.where(shifted, 4.0, 12.0) * ob_imbalance
        + 3.0 * signal_strength * np.clip(volume_zscore, -1.0, 2.0)
        - 8.0 * (atr_multiple - 1.6) ** 2
    )
    cost_bp = FEES_BP + spread_bp + funding_rate * 1e4
    noise_bp = rng.normal(0.0, OUTCOME_NOISE_BP, size=n) * realized_vol / 0.5
    net_roi = (quality * edge_bp - cost_bp + noise_bp) / 1e4

    columns: dict[str, object] = {
        TIMESTAMP: timestamp,
        "signal_strength": signal_strength,
        "momentum_1h": momentum_1h,
        "ob_imbalance": ob_imbalance,
        "volume_zscore": volume_zscore,
        "realized_vol": realized_vol,
        "atr_multiple": atr_multiple,
        "funding_rate": funding_rate,
        "spread_bp": spread_bp,
        "regime": regime.astype(np.float64),
        "hour_of_day": hour_of_day,
    }
    if n_noise:
        noise = rng.normal(0.0, 1.0, size=(n, n_noise))
        for i in range(n_noise):
            columns[f"noise_{i}"] = noise[:, i]
    columns[NET_ROI] = net_roi
    columns[LABEL] = (net_roi > threshold).astype(np.int64)
    return pd.DataFrame(columns)


def _regimes(rng: np.random.Generator, n: int, shifted: np.ndarray) -> np.ndarray:
    """Persistent regime sequence: with probability 2% per row the regime is redrawn, so a regime
    lasts tens of rows (long enough to matter, short enough that every test window sees all three)."""
    normal_p = np.array([0.45, 0.40, 0.15])
    shifted_p = np.array([0.25, 0.25, 0.50])
    switch = rng.random(n) < 0.02
    draws_normal = rng.choice(3, size=n, p=normal_p)
    draws_shifted = rng.choice(3, size=n, p=shifted_p)
    out = np.empty(n, dtype=np.int64)
    current = int(draws_normal[0])
    for i in range(n):
        if shifted[i] and (i == 0 or not shifted[i - 1]):
            current = int(draws_shifted[i])  # the new world starts in a fresh regime
        elif switch[i]:
            current = int(draws_shifted[i] if shifted[i] else draws_normal[i])
        out[i] = current
    return out


def _ar1(rng: np.random.Generator, n: int, *, phi: float, sigma: float) -> np.ndarray:
    """Stationary AR(1) noise: funding rates move slowly, they do not jump row to row."""
    eps = rng.normal(0.0, sigma, size=n)
    out = np.empty(n)
    out[0] = eps[0] / np.sqrt(1 - phi**2)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + eps[i]
    return out


def load_dataset(path: str | Path, *, threshold: float = 0.0) -> pd.DataFrame:
    """Read a CSV or Parquet file that follows the column conventions of this module.

    Timestamps become tz-aware UTC (naive values are taken as UTC), rows are sorted by time
    (stable, so equal timestamps keep file order), integer/bool feature columns become float64 and,
    when the file has `net_roi` but no `label`, the label is derived with `threshold`. CSV floats
    are parsed with round-trip precision so a CSV copy hashes like the original (`data_hash`).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(p, float_precision="round_trip")
    elif suffix in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    else:
        raise ValueError(f"path: unsupported file type {suffix!r} (use .csv or .parquet)")
    if TIMESTAMP not in df.columns:
        raise ValueError(f"{p}: missing column {TIMESTAMP!r}")
    if LABEL not in df.columns:
        if NET_ROI not in df.columns:
            raise ValueError(f"{p}: needs a {LABEL!r} or a {NET_ROI!r} column")
        df[LABEL] = (df[NET_ROI] > threshold).astype(np.int64)
    ts = pd.to_datetime(df[TIMESTAMP], utc=True)
    if ts.isna().any():
        raise ValueError(f"{p}: column {TIMESTAMP!r} has missing or unparseable values")
    df[TIMESTAMP] = ts
    labels = df[LABEL]
    if labels.isna().any() or not labels.isin([0, 1]).all():
        raise ValueError(f"{p}: column {LABEL!r} must hold only 0 and 1")
    df[LABEL] = labels.astype(np.int64)
    for col in feature_columns(df):
        df[col] = df[col].astype(np.float64)
    if not df[TIMESTAMP].is_monotonic_increasing:
        df = df.sort_values(TIMESTAMP, kind="stable")
    return df.reset_index(drop=True)


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Every numeric column except timestamp, net_roi and label, in frame order.

    Discovery rather than a fixed list lets a data set with other features (or a subset) train a
    model whose feature schema is whatever the data had; non-numeric columns are ignored.
    """
    return [
        str(c)
        for c in df.columns
        if c not in NON_FEATURES and pd.api.types.is_numeric_dtype(df[c]) and not _is_datetime(df[c])
    ]


def _is_datetime(col: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(col) or isinstance(col.dtype, pd.DatetimeTZDtype)


def data_hash(df: pd.DataFrame) -> str:
    """sha256 hex of a canonical serialisation, recorded with each published version for lineage.

    Canonical means: columns in sorted name order; datetimes as int64 nanoseconds since the epoch
    in UTC; numbers and bools as little-endian float64; anything else as UTF-8 text. So the same
    rows hash alike whether they came from memory, CSV or Parquet, whatever the column order or
    integer/float storage; a changed value, row order or column name changes the hash.
    """
    h = hashlib.sha256()
    h.update(f"rows={len(df)};".encode())
    for name in sorted(df.columns, key=str):
        col = df[name]
        h.update(f"col={name}:".encode())
        if _is_datetime(col):
            ts = pd.to_datetime(col, utc=True).dt.as_unit("ns")
            if ts.isna().any():
                raise ValueError(f"data_hash: column {name!r} has missing timestamps")
            h.update(ts.astype("int64").to_numpy(dtype="<i8").tobytes())
        elif pd.api.types.is_numeric_dtype(col):
            h.update(col.to_numpy(dtype="<f8", na_value=np.nan).tobytes())
        else:
            h.update("\x1f".join(map(str, col.tolist())).encode("utf-8"))
        h.update(b";")
    return h.hexdigest()
