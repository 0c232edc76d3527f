"""Drift between the data a version was trained on and the requests it serves now.

Per feature, two complementary statistics:

- PSI (population stability index) over bins cut at the reference's quantiles (deciles by default;
  tied quantiles merge, so a discrete feature such as `regime` gets one bin per value):
  PSI = sum_b (cur_b - ref_b) * ln(cur_b / ref_b), shares floored at `eps` so an empty bin is finite.
  Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant (the alert threshold).
- Two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp): the statistic is the largest gap between the
  two empirical CDFs and comes with a p-value. With many rows tiny, harmless shifts become
  "significant", so a feature is flagged by KS only when p < `ks_alpha` AND the statistic is at least
  `ks_min_statistic` (an effect size, not just evidence).

A feature is flagged when PSI > `psi_threshold` or KS flags it. Score drift applies the same statistics
to the production version's scores, computed with its ONNX bytes on both windows' feature rows (so
the comparison is of inputs through one fixed model, not of whichever versions happened to serve).

The reference is, in order of preference: a frame or a time window given by the caller (e.g. the
training data), the data window of the training run that produced the production version, or the
window of the same length just before the current one (`reference_kind` in the report says which).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from scipy import stats as sps

from chimera.jsonsafe import nan_to_none
from registry import Registry, VersionInfo
from registry.training_runs import list_runs
from replicas.scorer import OnnxScorer
from training.datasets import TIMESTAMP
from training.feedback import production_version, served_frame

PSI_THRESHOLD = 0.2
KS_ALPHA = 0.01
KS_MIN_STATISTIC = 0.1
DEFAULT_BINS = 10
PSI_EPS = 1e-4
MIN_ROWS = 50


# ------------------------------------------------------------------------------------ statistics
def quantile_edges(reference: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Interior bin edges at the reference's 1/bins .. (bins-1)/bins quantiles, duplicates merged."""
    ref = _clean(reference)
    if ref.size == 0:
        raise ValueError("psi: the reference sample is empty")
    if bins < 2:
        raise ValueError(f"bins: must be >= 2, got {bins}")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of values in each bin (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    v = _clean(values)
    idx = np.searchsorted(edges, v, side="left")  # x <= e_i lands in bin i
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(1, v.size)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = DEFAULT_BINS, eps: float = PSI_EPS) -> float:
    """Population stability index of `current` against `reference` (see the module docstring)."""
    edges = quantile_edges(reference, bins)
    if _clean(current).size == 0:
        raise ValueError("psi: the current sample is empty")
    ref = np.maximum(bin_shares(reference, edges), eps)
    cur = np.maximum(bin_shares(current, edges), eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and p-value (scipy.stats.ks_2samp, two-sided)."""
    res = sps.ks_2samp(_clean(reference), _clean(current))
    return float(res.statistic), float(res.pvalue)


def _clean(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


# ------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class DriftThresholds:
    psi: float = PSI_THRESHOLD
    ks_alpha: float = KS_ALPHA
    ks_min_statistic: float = KS_MIN_STATISTIC
    bins: int = DEFAULT_BINS


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    n_reference: int
    n_current: int
    flagged: bool
    reason: str = ""


def compare(name: str, reference: np.ndarray, current: np.ndarray,
            thresholds: DriftThresholds = DriftThresholds()) -> FeatureDrift:
    """PSI and KS of one column, and whether it is flagged (NaN statistics when a side is empty)."""
    ref, cur = _clean(reference), _clean(current)
    if ref.size == 0 or cur.size == 0:
        return FeatureDrift(name, math.nan, math.nan, math.nan, int(ref.size), int(cur.size), False,
                            "no data on one side")
    p = psi(ref, cur, thresholds.bins)
    stat, pvalue = ks(ref, cur)
    reasons = []
    if p > thresholds.psi:
        reasons.append(f"PSI {p:.3f} > {thresholds.psi}")
    if pvalue < thresholds.ks_alpha and stat >= thresholds.ks_min_statistic:
        reasons.append(f"KS {stat:.3f} (p={pvalue:.2g})")
    return FeatureDrift(name, p, stat, pvalue, int(ref.size), int(cur.size), bool(reasons),
                        "; ".join(reasons))


@dataclass(frozen=True)
class DriftReport:
    model: str
    version: int | None
    reference_kind: str  # frame | window (given) | training_window | previous_window
    reference_window: tuple[datetime | None, datetime | None]
    current_window: tuple[datetime, datetime]
    features: tuple[FeatureDrift, ...]
    score: FeatureDrift | None
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def flagged(self) -> list[str]:
        return [f.feature for f in self.features if f.flagged]

    @property
    def drifted(self) -> bool:
        return bool(self.flagged) or bool(self.score is not None and self.score.flagged)

    def feature(self, name: str) -> FeatureDrift:
        for f in self.features:
            if f.feature == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        def iso(d: datetime | None) -> str | None:
            return d.isoformat() if d is not None else None

        return {
            "model": self.model,
            "version": self.version,
            "reference_kind": self.reference_kind,
            "reference_window": [iso(d) for d in self.reference_window],
            "current_window": [iso(d) for d in self.current_window],
            "drifted": self.drifted,
            "flagged": self.flagged,
            "features": [nan_to_none(asdict(f)) for f in self.features],
            "score": nan_to_none(asdict(self.score)) if self.score else None,
            "thresholds": asdict(self.thresholds),
        }


def compare_frames(reference: pd.DataFrame, current: pd.DataFrame, features: Sequence[str],
                   thresholds: DriftThresholds = DriftThresholds()) -> list[FeatureDrift]:
    """Per-feature drift between two frames (features missing from a frame count as empty)."""
    out = []
    for name in features:
        ref = reference[name].to_numpy(dtype=np.float64) if name in reference else np.empty(0)
        cur = current[name].to_numpy(dtype=np.float64) if name in current else np.empty(0)
        out.append(compare(name, ref, cur, thresholds))
    return out


def training_window(registry: Registry, model: str, version: VersionInfo) -> tuple[datetime, datetime] | None:
    """The feedback window a version was trained on: its training run's window, else the
    `training_window` recorded in its params; None for versions trained outside the feedback loop."""
    for run in list_runs(registry, model, published_version=version.version, limit=1):
        if run.window_start is not None and run.window_end is not None:
            return run.window_start, run.window_end
    recorded = version.params.get("training_window")
    if isinstance(recorded, list | tuple) and len(recorded) == 2:
        return pd.Timestamp(recorded[0]).to_pydatetime(), pd.Timestamp(recorded[1]).to_pydatetime()
    return None


def _scores(registry: Registry, model: str, version: VersionInfo, frame: pd.DataFrame) -> np.ndarray:
    names = list(version.feature_names)
    if frame.empty or any(n not in frame for n in names):
        return np.empty(0)
    rows = frame[names].dropna()
    if rows.empty:
        return np.empty(0)
    onnx_bytes, sha = registry.get_onnx(model, version.version)
    # Scored the way the replicas score (any input name, the probabilities output), not through the
    # training exporter's fixed names: a version published from another ONNX file must drift-check too.
    return OnnxScorer(onnx_bytes, sha).score(rows.to_numpy(dtype=np.float32))


def drift_report(
    registry: Registry,
    model: str,
    *,
    window: timedelta = timedelta(days=1),
    now: datetime | None = None,
    reference: pd.DataFrame | tuple[datetime, datetime] | None = None,
    version: int | None = None,
    thresholds: DriftThresholds = DriftThresholds(),
    min_rows: int = MIN_ROWS,
) -> DriftReport:
    """Drift of the requests served in [now - window, now) against the reference (module docstring).

    `version` picks the schema and the model whose scores are compared (default: production).
    Raises ValueError when either side has fewer than `min_rows` logged rows with features."""
    until = now or datetime.now(UTC)
    since = until - window
    v = registry.get_version(model, version) if version is not None else production_version(registry, model)
    if v is None:
        raise ValueError(f"model {model!r} has no production version and no traffic")
    names = list(v.feature_names)
    current = served_frame(registry, model, since=since, until=until, features=names)

    ref_window: tuple[datetime | None, datetime | None]
    if isinstance(reference, pd.DataFrame):
        kind, ref_frame = "frame", reference
        ts = reference[TIMESTAMP] if TIMESTAMP in reference else None
        ref_window = ((ts.min().to_pydatetime(), ts.max().to_pydatetime()) if ts is not None and len(ts)
                      else (None, None))
    else:
        if reference is not None:
            kind, (r0, r1) = "window", reference
        else:
            found = training_window(registry, model, v)
            if found is not None:
                kind, (r0, r1) = "training_window", found
            else:
                kind, (r0, r1) = "previous_window", (since - window, since)
        ref_frame = served_frame(registry, model, since=r0, until=r1, features=names)
        ref_window = (r0, r1)
    for side, frame in (("reference", ref_frame), ("current", current)):
        if len(frame) < min_rows:
            raise ValueError(f"drift: the {side} window has {len(frame)} logged rows with features, "
                             f"need at least {min_rows} (is the gateway logging features?)")

    features = compare_frames(ref_frame, current, names, thresholds)
    score = None
    ref_scores, cur_scores = _scores(registry, model, v, ref_frame), _scores(registry, model, v, current)
    if ref_scores.size and cur_scores.size:
        score = compare("score", ref_scores, cur_scores, thresholds)
    return DriftReport(model=model, version=v.version, reference_kind=kind, reference_window=ref_window,
                       current_window=(since, until), features=tuple(features), score=score,
                       thresholds=thresholds)


# ------------------------------------------------------------------------------------ Prometheus
class DriftGauges:
    """The drift gauges of one CollectorRegistry (labels bounded: model names and each model's schema)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        mf = ["model", "feature"]
        vs = "recent served requests vs the training window"
        self.feature_psi = Gauge("chimera_feature_psi", f"population stability index of a feature, {vs}",
                                 mf, registry=r)
        self.feature_ks = Gauge("chimera_feature_ks_statistic",
                                f"two-sample Kolmogorov-Smirnov statistic of a feature, {vs}", mf, registry=r)
        self.feature_ks_p = Gauge("chimera_feature_ks_pvalue",
                                  "p-value of the two-sample KS test of a feature", mf, registry=r)
        self.feature_flagged = Gauge("chimera_feature_drift_flagged",
                                     "1 when the feature is flagged as drifted", mf, registry=r)
        self.score_psi = Gauge("chimera_score_psi", f"PSI of the production version's scores, {vs}",
                               ["model"], registry=r)
        self.score_ks = Gauge("chimera_score_ks_statistic",
                              f"KS statistic of the production version's scores, {vs}", ["model"], registry=r)
        self.flagged = Gauge("chimera_drift_flagged_features", "number of features flagged as drifted",
                             ["model"], registry=r)
        self.last_run = Gauge("chimera_drift_last_run_timestamp_seconds", "when drift was last computed",
                              ["model"], registry=r)
        self.exported: dict[str, set[str]] = {}


_GAUGES: dict[int, tuple[CollectorRegistry, DriftGauges]] = {}


def drift_gauges(registry: CollectorRegistry = REGISTRY) -> DriftGauges:
    """The gauges registered in `registry` (created on first use, then reused)."""
    entry = _GAUGES.get(id(registry))
    if entry is None or entry[0] is not registry:
        entry = (registry, DriftGauges(registry))
        _GAUGES[id(registry)] = entry
    return entry[1]


def export_drift_metrics(report: DriftReport, registry: CollectorRegistry = REGISTRY) -> None:
    """Set chimera_feature_psi{model,feature}, chimera_feature_ks_statistic{model,feature},
    chimera_feature_ks_pvalue, chimera_feature_drift_flagged, chimera_score_psi{model},
    chimera_score_ks_statistic{model}, chimera_drift_flagged_features{model} and
    chimera_drift_last_run_timestamp_seconds{model} from a report. Features that left the schema
    since the last export are removed, so no stale series linger."""
    g = drift_gauges(registry)
    model = report.model
    current = {f.feature for f in report.features}
    for stale in g.exported.get(model, set()) - current:
        for gauge in (g.feature_psi, g.feature_ks, g.feature_ks_p, g.feature_flagged):
            try:
                gauge.remove(model, stale)
            except KeyError:
                pass
    for f in report.features:
        g.feature_psi.labels(model, f.feature).set(f.psi)
        g.feature_ks.labels(model, f.feature).set(f.ks_statistic)
        g.feature_ks_p.labels(model, f.feature).set(f.ks_pvalue)
        g.feature_flagged.labels(model, f.feature).set(1.0 if f.flagged else 0.0)
    g.exported[model] = current
    if report.score is not None:
        g.score_psi.labels(model).set(report.score.psi)
        g.score_ks.labels(model).set(report.score.ks_statistic)
    g.flagged.labels(model).set(len(report.flagged))
    g.last_run.labels(model).set(report.created_at.timestamp())


def summary(report: DriftReport) -> Mapping[str, float]:
    """Max PSI / max KS over features, and the score PSI (for logs and run records)."""
    psis = [f.psi for f in report.features if math.isfinite(f.psi)]
    kss = [f.ks_statistic for f in report.features if math.isfinite(f.ks_statistic)]
    return {
        "max_feature_psi": max(psis) if psis else math.nan,
        "max_feature_ks": max(kss) if kss else math.nan,
        "score_psi": report.score.psi if report.score else math.nan,
        "flagged": float(len(report.flagged)),
    }
