"""Drift statistics against direct computations, drift on a stream whose world shifts halfway
(SQLite and PostgreSQL), and the Prometheus gauges."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from registry import Registry
from tests.integration.test_feedback import (
    FEATURES,
    log_served,
    new_model_name,
    publish_production,
    shifted_stream,
)
from training.datasets import TIMESTAMP
from training.drift import (
    DriftReport,
    DriftThresholds,
    bin_shares,
    compare,
    drift_report,
    export_drift_metrics,
    ks,
    psi,
    quantile_edges,
)

SHIFTED = {"realized_vol", "funding_rate", "spread_bp", "regime"}  # distributions the generator moves
UNSHIFTED = set(FEATURES) - SHIFTED


def _psi_direct(ref: np.ndarray, cur: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """PSI written out the long way: decile cut points of the reference, count by loop."""
    cuts = sorted(set(np.quantile(ref, [k / bins for k in range(1, bins)]).tolist()))
    def shares(x: np.ndarray) -> list[float]:
        counts = [0] * (len(cuts) + 1)
        for v in x:
            i = 0
            while i < len(cuts) and v > cuts[i]:
                i += 1
            counts[i] += 1
        return [max(c / len(x), eps) for c in counts]
    r, c = shares(ref), shares(cur)
    return sum((ci - ri) * math.log(ci / ri) for ri, ci in zip(r, c, strict=True))


def _ks_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Largest gap between the two empirical CDFs, evaluated at every observed value."""
    points = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), points, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def test_psi_and_ks_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0.0, 1.0, 3000)
    for cur in (rng.normal(0.0, 1.0, 2000), rng.normal(0.5, 1.3, 2000), rng.exponential(1.0, 500)):
        assert psi(ref, cur) == pytest.approx(_psi_direct(ref, cur), rel=1e-12, abs=1e-12)
        stat, p = ks(ref, cur)
        assert stat == pytest.approx(_ks_direct(ref, cur), abs=1e-12)
        assert 0.0 <= p <= 1.0
    # A discrete feature: tied quantiles merge into one bin per value.
    regimes_ref = rng.choice(3, size=4000, p=[0.45, 0.40, 0.15]).astype(float)
    regimes_cur = rng.choice(3, size=4000, p=[0.25, 0.25, 0.50]).astype(float)
    edges = quantile_edges(regimes_ref)
    assert edges.tolist() == [0.0, 1.0, 2.0]
    shares_cur = bin_shares(regimes_cur, edges)
    assert shares_cur[:3].tolist() == pytest.approx([(regimes_cur == k).mean() for k in range(3)])
    assert shares_cur[3] == 0.0
    assert psi(regimes_ref, regimes_cur) == pytest.approx(_psi_direct(regimes_ref, regimes_cur), rel=1e-12)
    # Same distribution: PSI near zero, KS not flagged; identical samples: exactly zero.
    assert psi(ref, ref) == 0.0 and ks(ref, ref)[0] == 0.0
    assert psi(ref, rng.normal(0.0, 1.0, 3000)) < 0.02


def test_flag_rule_needs_an_effect_not_just_evidence() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(0.0, 1.0, 200_000)
    tiny = rng.normal(0.03, 1.0, 200_000)  # "significant" with this many rows, but harmless
    f = compare("x", ref, tiny)
    assert f.ks_pvalue < 0.01 and not f.flagged
    big = compare("x", ref, rng.normal(0.6, 1.0, 2000))
    assert big.flagged and "PSI" in big.reason and "KS" in big.reason
    nan_side = compare("x", ref, np.array([np.nan, np.inf]))
    assert not nan_side.flagged and math.isnan(nan_side.psi)
    strict = compare("x", ref, rng.normal(0.2, 1.0, 5000), DriftThresholds(psi=0.01, ks_min_statistic=1.0))
    assert strict.flagged and strict.reason.startswith("PSI")


def test_drift_detected_on_shifted_features(registry: Registry) -> None:
    stream = shifted_stream(6000, seed=5)
    half = len(stream) // 2
    model = new_model_name("drift")
    v1, _ = publish_production(registry, model, stream.iloc[:1500], native=False)
    served = stream.iloc[1500:]
    log_served(registry, model, v1.version, served, outcomes=False)
    end = stream[TIMESTAMP].iloc[-1].to_pydatetime() + timedelta(seconds=1)
    shift = stream[TIMESTAMP].iloc[half].to_pydatetime()
    recent = end - shift

    # Reference = the data v1 was trained on; current = the served requests after the shift.
    report = drift_report(registry, model, window=recent, now=end, reference=stream.iloc[:1500])
    flagged = set(report.flagged)
    assert report.reference_kind == "frame" and report.version == v1.version
    assert SHIFTED <= flagged, report.to_dict()
    assert len(flagged & UNSHIFTED) <= 1, report.to_dict()
    for name in ("realized_vol", "funding_rate", "spread_bp"):
        assert report.feature(name).psi > 0.2 and report.feature(name).ks_statistic > 0.3
    assert report.score is not None and report.score.flagged  # v1's scores move with its inputs
    assert report.drifted

    # Reference = a served window before the shift, read from the logged features.
    pre = (stream[TIMESTAMP].iloc[1500].to_pydatetime(), shift)
    by_window = drift_report(registry, model, window=recent, now=end, reference=pre)
    assert by_window.reference_kind == "window" and SHIFTED <= set(by_window.flagged)
    assert by_window.features[0].n_reference == half - 1500

    # Before the shift the features whose distribution the generator keeps fixed stay quiet, and so do
    # v1's scores. (funding_rate is a slow AR(1) and regime a persistent Markov chain: a few days'
    # window may legitimately sit away from the training days' level even without the shift.)
    calm = drift_report(registry, model, window=shift - pre[0] - timedelta(days=2), now=shift,
                        reference=stream.iloc[:1500])
    assert not set(calm.flagged) & UNSHIFTED, calm.to_dict()
    assert calm.score is not None and not calm.score.flagged

    # Default reference: the window just before the current one.
    auto = drift_report(registry, model, window=recent / 2, now=end)
    assert auto.reference_kind == "previous_window"

    with pytest.raises(ValueError, match="logged rows"):
        drift_report(registry, model, window=timedelta(minutes=1), now=end)


def test_export_drift_metrics() -> None:
    rng = np.random.default_rng(2)
    model = "gauges"
    features = tuple(compare(name, rng.normal(0, 1, 2000), rng.normal(shift, 1, 1000))
                     for name, shift in (("a", 0.0), ("b", 0.5), ("c", 1.0)))
    now = datetime.now(UTC)
    report = DriftReport(model=model, version=3, reference_kind="frame", reference_window=(None, None),
                         current_window=(now - timedelta(days=1), now), features=features,
                         score=compare("score", rng.beta(2, 5, 2000), rng.beta(2, 4, 1000)))
    prom = CollectorRegistry()
    export_drift_metrics(report, prom)
    for f in report.features:
        labels = {"model": model, "feature": f.feature}
        assert prom.get_sample_value("chimera_feature_psi", labels) == pytest.approx(f.psi)
        assert prom.get_sample_value("chimera_feature_ks_statistic", labels) == pytest.approx(f.ks_statistic)
        assert prom.get_sample_value("chimera_feature_drift_flagged", labels) == float(f.flagged)
    assert report.score is not None
    assert prom.get_sample_value("chimera_score_psi", {"model": model}) == pytest.approx(report.score.psi)
    assert prom.get_sample_value("chimera_drift_flagged_features", {"model": model}) == len(report.flagged)
    # A feature that leaves the schema leaves the exposition too.
    fewer = dataclasses.replace(report, features=report.features[1:])
    export_drift_metrics(fewer, prom)
    gone = {"model": model, "feature": report.features[0].feature}
    assert prom.get_sample_value("chimera_feature_psi", gone) is None
