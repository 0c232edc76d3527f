"""The shadow diff report: how a shadow version's scores differ from the served ones on the same
requests (issue 18), as numbers an operator reads before giving the shadow traffic.

The sequential shadow test (rollout.paired) answers one question, "is the shadow's loss worse?", and
needs outcomes. This report answers the questions that come before and beside it, most of them without
any outcome: would the shadow have decided differently (agreement of ``score ≥ threshold``, with the
2×2 table), by how much do the scores move (the distribution of d = shadow − served), and *where*
(per-feature quantile slices ranked by how unevenly |d| spreads over them: a feature whose top bin
carries most of the change is where the two versions disagree). Where outcomes exist, each version's
Brier and log-loss on the same rows, computed by rollout.paired's own loss function (same clipping),
so the report and the shadow test never disagree about what a loss is.

Pure computation over arrays: no database, no gRPC (the registry read is registry.shadow_rows, the
command chimera/cli/shadow.py). Rows whose served or shadow score is not finite are dropped and
counted; missing outcomes (NaN) and missing feature values (NaN: feature logging sampled the row out)
only leave those rows out of the parts that need them. Zero rows gives a report that says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from chimera.jsonsafe import nan_to_none
from rollout.paired import PairedPolicy, pair_losses
from rollout.policy import PAIRED_METRICS
from rollout.stats import outcome_in_domain

QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_BINS = 5
NO_ROWS = "no paired rows yet"
NAN = float("nan")


@dataclass(frozen=True)
class Agreement:
    """Decisions ``score ≥ threshold`` of both versions on the same rows: the share where they match
    and the 2×2 counts (served decision × shadow decision)."""

    threshold: float
    n: int
    share: float  # NaN when n == 0
    both_positive: int
    both_negative: int
    served_only: int  # served ≥ t, shadow < t
    shadow_only: int  # shadow ≥ t, served < t


@dataclass(frozen=True)
class Difference:
    """Distribution of d = shadow − served (positive: the shadow scores higher)."""

    mean: float
    sd: float  # sample sd (ddof 1); NaN below two rows
    quantiles: dict[str, float]  # "p1", "p5", ... "p99"
    max_abs: float


@dataclass(frozen=True)
class Losses:
    """Each version's mean loss on the rows with a 0/1 outcome, and shadow − served (positive: worse)."""

    n: int
    served: dict[str, float]
    shadow: dict[str, float]
    difference: dict[str, float]


@dataclass(frozen=True)
class SliceBin:
    lo: float
    hi: float
    n: int
    mean_abs_diff: float
    agreement: float


@dataclass(frozen=True)
class FeatureSlice:
    """One feature cut into quantile bins (or one bin per value when it has few distinct values);
    ``spread`` = max − min of the bins' mean |d|, the ranking key. None when it cannot be ranked
    (``note`` says why: no logged values, or a constant)."""

    feature: str
    n: int
    spread: float | None
    bins: list[SliceBin] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class ShadowReport:
    n_pairs: int
    n_dropped: int  # rows without a finite served or shadow score
    agreement: Agreement
    difference: Difference
    losses: Losses | None  # None: no row has a usable outcome
    slices: list[FeatureSlice]  # most different first; unrankable ones last
    n_with_features: int
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and inf become None (chimera.jsonsafe)."""
        return nan_to_none(asdict(self))


def _agreement(served: np.ndarray, shadow: np.ndarray, threshold: float) -> Agreement:
    a, b = served >= threshold, shadow >= threshold
    n = int(a.size)
    agree = int((a == b).sum())
    return Agreement(threshold=threshold, n=n, share=agree / n if n else NAN,
                     both_positive=int((a & b).sum()), both_negative=int((~a & ~b).sum()),
                     served_only=int((a & ~b).sum()), shadow_only=int((~a & b).sum()))


def _difference(d: np.ndarray) -> Difference:
    if d.size == 0:
        return Difference(NAN, NAN, {_qname(q): NAN for q in QUANTILES}, NAN)
    qs = np.quantile(d, QUANTILES)
    return Difference(mean=float(d.mean()), sd=float(d.std(ddof=1)) if d.size >= 2 else NAN,
                      quantiles={_qname(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
                      max_abs=float(np.abs(d).max()))


def _qname(q: float) -> str:
    return f"p{round(q * 100):d}"


def _losses_of(served: np.ndarray, shadow: np.ndarray, outcomes: np.ndarray | None) -> Losses | None:
    if outcomes is None:
        return None
    y = np.asarray(outcomes, dtype=np.float64)
    ok = outcome_in_domain("brier", y)  # 0/1 outcomes only, as the shadow test takes them
    if not ok.any():
        return None
    eps = PairedPolicy().log_loss_eps
    out: dict[str, dict[str, float]] = {"served": {}, "shadow": {}, "difference": {}}
    for metric in PAIRED_METRICS:
        served_loss, shadow_loss = pair_losses(metric, y[ok], served[ok], shadow[ok], eps)
        out["served"][metric] = float(served_loss.mean())
        out["shadow"][metric] = float(shadow_loss.mean())
        out["difference"][metric] = float((shadow_loss - served_loss).mean())
    return Losses(n=int(ok.sum()), **out)


def _bin_index(x: np.ndarray, bins: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Bin of each value and the bins' [lo, hi]: one bin per distinct value when there are at most
    `bins` of them (a 0/1 feature gets its two bins), else quantile bins (ties may merge bins)."""
    values = np.unique(x)
    if values.size <= bins:
        return np.searchsorted(values, x), [(float(v), float(v)) for v in values]
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)))
    idx = np.searchsorted(edges[1:-1], x, side="right")
    return idx, [(float(edges[i]), float(edges[i + 1])) for i in range(edges.size - 1)]


def _feature_slice(name: str, x: np.ndarray, abs_d: np.ndarray, agree: np.ndarray, bins: int) -> FeatureSlice:
    ok = np.isfinite(x)
    n = int(ok.sum())
    if n == 0:
        return FeatureSlice(name, 0, None, note="no logged values")
    x, abs_d, agree = x[ok], abs_d[ok], agree[ok]
    idx, ranges = _bin_index(x, bins)
    out: list[SliceBin] = []
    for i, (lo, hi) in enumerate(ranges):
        sel = idx == i
        k = int(sel.sum())
        if k:
            out.append(SliceBin(lo, hi, k, float(abs_d[sel].mean()), float(agree[sel].mean())))
    if len(out) < 2:
        return FeatureSlice(name, n, None, out, note="constant")
    means = [b.mean_abs_diff for b in out]
    return FeatureSlice(name, n, float(max(means) - min(means)), out)


def _slices(features: np.ndarray | None, names: list[str], d: np.ndarray, agree: np.ndarray,
            bins: int) -> tuple[list[FeatureSlice], int]:
    if features is None or not names:
        return [], 0
    abs_d = np.abs(d)
    result = [_feature_slice(name, features[:, j], abs_d, agree, bins) for j, name in enumerate(names)]
    # Rankable first, largest spread first; ties and unrankable ones keep the schema's order.
    result.sort(key=lambda s: (s.spread is None, -(s.spread or 0.0)))
    n_with = int(np.isfinite(features).any(axis=1).sum()) if features.size else 0
    return result, n_with


def shadow_report(served: np.ndarray, shadow: np.ndarray, *, threshold: float = 0.5,
                  outcomes: np.ndarray | None = None, features: np.ndarray | None = None,
                  feature_names: list[str] | tuple[str, ...] = (), bins: int = DEFAULT_BINS) -> ShadowReport:
    """The report over paired rows: `served[i]` and `shadow[i]` scored the same request; `outcomes`
    (NaN: none yet) and `features` ([n, len(feature_names)], NaN: not logged) are optional."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if bins < 2:
        raise ValueError("bins must be at least 2")
    s = np.asarray(served, dtype=np.float64)
    h = np.asarray(shadow, dtype=np.float64)
    if s.shape != h.shape or s.ndim != 1:
        raise ValueError(f"served and shadow must be 1-D of one length, got {s.shape} and {h.shape}")
    names = list(feature_names)
    x = None if features is None else np.asarray(features, dtype=np.float64).reshape(s.size, len(names))
    y = None if outcomes is None else np.asarray(outcomes, dtype=np.float64)
    keep = np.isfinite(s) & np.isfinite(h)
    s, h = s[keep], h[keep]
    y = None if y is None else y[keep]
    x = None if x is None else x[keep]
    d = h - s
    agree = (s >= threshold) == (h >= threshold)
    slices, n_with = _slices(x, names, d, agree, bins)
    return ShadowReport(n_pairs=int(s.size), n_dropped=int((~keep).sum()),
                        agreement=_agreement(s, h, threshold), difference=_difference(d),
                        losses=_losses_of(s, h, y), slices=slices, n_with_features=n_with,
                        message="" if s.size else NO_ROWS)
