"""The shadow diff report's numbers (rollout.shadow_report) on inputs whose answers are known by
construction: agreement and its 2×2 table, the difference quantiles, the losses, and the feature slice
built to differ is the one ranked first. Zero rows, NaN and constant features never crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rollout.paired import loss_differences
from rollout.shadow_report import NO_ROWS, shadow_report


def test_agreement_counts_each_cell_of_the_decision_table() -> None:
    served = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.4])
    shadow = np.array([0.7, 0.3, 0.1, 0.6, 0.6, 0.5])
    r = shadow_report(served, shadow, threshold=0.5)
    a = r.agreement
    # rows: both ≥ (0, 4), served only (1), both < (2), shadow only (3, 5)
    assert (a.both_positive, a.served_only, a.both_negative, a.shadow_only) == (2, 1, 1, 2)
    assert a.share == pytest.approx(3 / 6)
    # the threshold is ≥: a score exactly at t acts
    assert shadow_report(np.array([0.5]), np.array([0.49]), threshold=0.5).agreement.served_only == 1


def test_difference_quantiles_are_those_of_shadow_minus_served() -> None:
    served = np.full(101, 0.5)
    d = np.linspace(-0.1, 0.1, 101)  # quantile q of d is -0.1 + 0.2 q exactly
    r = shadow_report(served, served + d)
    q = r.difference.quantiles
    assert list(q) == ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
    for name, p in (("p1", 0.01), ("p5", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95),
                    ("p99", 0.99)):
        assert q[name] == pytest.approx(-0.1 + 0.2 * p, abs=1e-12)
    assert r.difference.mean == pytest.approx(0.0, abs=1e-12)
    assert r.difference.sd == pytest.approx(float(np.std(d, ddof=1)))
    assert r.difference.max_abs == pytest.approx(0.1)


def test_losses_use_the_paired_tests_definitions_on_rows_with_outcomes() -> None:
    rng = np.random.default_rng(1)
    served = rng.uniform(0.05, 0.95, 400)
    shadow = np.clip(served + rng.normal(0, 0.1, 400), 0, 1)
    y = (rng.uniform(size=400) < served).astype(float)
    y[:50] = np.nan  # no outcome yet: left out of the losses only
    r = shadow_report(served, shadow, outcomes=y)
    assert r.n_pairs == 400 and r.losses is not None and r.losses.n == 350
    ok = ~np.isnan(y)
    assert r.losses.served["brier"] == pytest.approx(float(np.mean((served[ok] - y[ok]) ** 2)))
    for metric in ("brier", "log_loss"):
        want = float(loss_differences(metric, y[ok], served[ok], shadow[ok]).mean())
        assert r.losses.difference[metric] == pytest.approx(want)
        assert r.losses.shadow[metric] - r.losses.served[metric] == pytest.approx(want)
    assert shadow_report(served, shadow, outcomes=np.full(400, np.nan)).losses is None


def test_the_feature_built_to_differ_ranks_first() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    names = ["noise_a", "age", "flag", "constant", "noise_b", "unlogged"]
    x = np.column_stack([rng.normal(size=n), rng.uniform(18, 90, n), rng.integers(0, 2, n), np.full(n, 3.0),
                         rng.normal(size=n), np.full(n, np.nan)])
    served = rng.uniform(0.2, 0.8, n)
    # the shadow moves scores only for the oldest fifth (age > 76): the top age bin
    shadow = served + np.where(x[:, 1] > 76, 0.2, 0.0) + rng.normal(0, 0.005, n)
    r = shadow_report(served, shadow, features=x, feature_names=names)
    first = r.slices[0]
    assert first.feature == "age"
    assert len(first.bins) == 5 and sum(b.n for b in first.bins) == n
    top = first.bins[-1]
    assert top.mean_abs_diff > 0.15 and all(b.mean_abs_diff < 0.02 for b in first.bins[:-2])
    assert top.agreement < first.bins[0].agreement
    by_name = {s.feature: s for s in r.slices}
    assert [b.lo for b in by_name["flag"].bins] == [0.0, 1.0]  # a 0/1 feature: one bin per value
    assert by_name["constant"].spread is None and by_name["constant"].note == "constant"
    assert by_name["unlogged"].spread is None and by_name["unlogged"].n == 0
    assert [s.feature for s in r.slices][-2:] == ["constant", "unlogged"]  # unrankable last
    assert r.n_with_features == n


def test_rows_without_features_are_left_out_of_slices_only() -> None:
    served = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    shadow = served + np.array([0.0, 0.0, 0.0, 0.3, 0.3, 0.3])
    x = np.array([[1.0], [2.0], [np.nan], [4.0], [5.0], [np.nan]])
    r = shadow_report(served, shadow, features=x, feature_names=["f"], bins=2)
    assert r.n_pairs == 6 and r.n_with_features == 4
    assert r.slices[0].n == 4 and r.slices[0].spread == pytest.approx(0.3)


def test_zero_rows_say_so_and_serialise() -> None:
    empty = np.empty(0)
    r = shadow_report(empty, empty, outcomes=empty, features=np.empty((0, 2)), feature_names=["a", "b"])
    assert r.n_pairs == 0 and r.message == NO_ROWS
    assert r.losses is None and r.agreement.n == 0
    data = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # NaN became null
    assert data["agreement"]["share"] is None and data["difference"]["quantiles"]["p50"] is None
    assert [s["note"] for s in data["slices"]] == ["no logged values", "no logged values"]


def test_rows_without_a_finite_score_are_dropped_and_counted() -> None:
    r = shadow_report(np.array([0.2, np.nan, 0.7]), np.array([0.3, 0.4, np.inf]))
    assert (r.n_pairs, r.n_dropped) == (1, 2)
    assert r.difference.mean == pytest.approx(0.1)


@pytest.mark.parametrize("t", [0.0, 1.0, -0.1, float("nan")])
def test_threshold_outside_the_open_unit_interval_is_refused(t: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        shadow_report(np.array([0.5]), np.array([0.5]), threshold=t)


def test_decision_threshold_is_a_validated_policy_field() -> None:
    from rollout.splits import policy_from_dict

    assert policy_from_dict({}).decision_threshold == 0.5
    assert policy_from_dict({"decision_threshold": 0.3}).decision_threshold == 0.3
    with pytest.raises(ValueError, match="decision_threshold"):
        policy_from_dict({"decision_threshold": 1.0})
