"""Unit tests for the pure rollout decision path: rows -> LookBuilder -> look() (rollout.lookdata,
rollout.decision). Each test feeds rows the way the controller does and checks what an operator would
see: the action, its reason and the statistics stored with it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from rollout.decision import SequentialState, look
from rollout.lookdata import LookBuilder
from rollout.policy import RolloutPolicy
from rollout.stats import check_outcome

POLICY = RolloutPolicy(metric="success_rate")


def _binary(n: int, p: float, seed: int) -> np.ndarray:
    """Exactly round(n * p) successes in a shuffled order, so tests do not hinge on sampling luck."""
    k = round(n * p)
    x = np.r_[np.ones(k), np.zeros(n - k)]
    np.random.default_rng(seed).shuffle(x)
    return x


class Feed:
    """Rows for one builder: every call is one batch of one period, units numbered in log order."""

    def __init__(self, policy: RolloutPolicy = POLICY, state: SequentialState | None = None) -> None:
        st = state or SequentialState()
        self.b = LookBuilder(policy.metric, winsor=st.winsor, latency_thresholds=st.latency_thresholds,
                             **policy.builder_options())
        self.next_unit = 0

    def rows(self, revision: int, weight: int, base: np.ndarray, can: np.ndarray, *,
             lat_b: np.ndarray | None = None, lat_c: np.ndarray | None = None,
             fail_c: int = 0, keys: np.ndarray | None = None, scores: np.ndarray | None = None) -> None:
        nb, nc = base.size, can.size
        arm = np.r_[np.zeros(nb, dtype=np.int64), np.ones(nc + fail_c, dtype=np.int64)]
        units = keys if keys is not None else np.arange(self.next_unit, self.next_unit + arm.size)
        self.next_unit += arm.size
        failed = np.r_[np.zeros(nb + nc, dtype=bool), np.ones(fail_c, dtype=bool)]
        lat = np.r_[lat_b if lat_b is not None else np.full(nb, 5.0),
                    lat_c if lat_c is not None else np.full(nc, 5.0), np.full(fail_c, np.nan)]
        self.b.add_requests(revision, weight, arm, units, failed, lat)
        ok = ~failed
        values = np.r_[base, can, np.full(fail_c, np.nan)]
        self.b.add_outcomes(revision, weight, arm[ok], units[ok], values[ok],
                            None if scores is None else scores[: ok.sum()])

    def data(self, weight: int):  # noqa: ANN201
        return self.b.data(weight)


def _decide(base: np.ndarray, can: np.ndarray, weight: int = 10, policy: RolloutPolicy = POLICY,
            state: SequentialState | None = None):  # noqa: ANN202
    f = Feed(policy, state)
    f.rows(1, weight, base, can)
    return look(policy, f.data(weight), state)


def test_hold_below_min_samples():
    d, st = _decide(_binary(5000, 0.6, 1), _binary(150, 0.3, 2), weight=3)
    assert d.action == "hold" and d.next_weight == 3
    assert d.n_canary == 150 < d.min_samples_per_arm
    assert "need 200" in d.reason
    assert st.looks == 0 and st.p_worse == 1.0  # looks below the minimum do not count


def test_clear_worse_rolls_back_with_its_statistics():
    d, st = _decide(_binary(18_000, 0.60, 1), _binary(2_000, 0.50, 2))
    assert d.action == "rollback" and d.next_weight == 0
    assert d.direction == "worse" and d.guardrail is None
    assert d.p_value == d.p_value_worse == st.p_worse <= d.primary_alpha
    assert d.test == "msprt_stratified" and d.statistic > 0
    assert tuple(d.periods[0]["outcomes"]) == (18_000, 2_000)
    assert d.primary_alpha == pytest.approx(d.alpha - 2 * POLICY.resolved_guardrail_alpha)
    json.dumps(d.to_dict(), allow_nan=False)


def test_clear_better_steps_up_then_waits_then_promotes():
    f = Feed()
    f.rows(1, 10, _binary(18_000, 0.60, 1), _binary(2_000, 0.70, 2))
    d, st = look(POLICY, f.data(10))
    assert d.action == "step_up" and d.next_weight == 25
    assert st.canary_n_at_last_step == 2_000
    # the next period at 25 %: not enough fresh canary outcomes since the step yet
    f.rows(2, 25, _binary(300, 0.60, 3), _binary(100, 0.70, 4))
    d2, st = look(POLICY, f.data(25), st)
    assert d2.action == "hold" and "waiting for 200 new canary outcomes" in d2.reason
    assert [p["weight"] for p in d2.periods] == [10, 25]
    f.rows(2, 25, _binary(600, 0.60, 5), _binary(200, 0.70, 6))
    d3, _ = look(POLICY, f.data(25), st)
    assert d3.action == "step_up" and d3.next_weight == 50
    d4, _ = _decide(_binary(18_000, 0.60, 1), _binary(18_000, 0.70, 2), weight=50)
    assert d4.action == "promote" and d4.next_weight == 100


def test_no_difference_holds():
    d, _ = _decide(_binary(18_000, 0.6, 1), _binary(2_000, 0.6, 2))
    assert d.action == "hold" and "no significant difference" in d.reason


def test_split_periods_are_not_pooled():
    """The issue's Simpson case: 10 % canary while the rate is 0.60, then 50 % while it is 0.50 for
    everyone. Pooled, the canary looks 3 points worse; within each period the arms are equal."""
    f = Feed()
    f.rows(1, 10, _binary(9_000, 0.60, 1), _binary(1_000, 0.60, 2))
    f.rows(2, 50, _binary(5_000, 0.50, 3), _binary(5_000, 0.50, 4))
    data = f.data(50)
    assert data.mean[1] < data.mean[0] - 0.03  # what pooling would compare
    assert abs(data.effect) < 1e-12
    d, _ = look(POLICY, data)
    assert d.action == "hold" and [p["revision"] for p in d.periods] == [1, 2]


def test_sticky_keys_widen_the_variance():
    """Outcomes correlated within a routing key: the variance is over keys, larger than per request."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 300, 6_000)
    p_key = rng.beta(2, 2, 300)[keys]
    y = (rng.random(6_000) < p_key).astype(float)
    canary = rng.random(300)[keys] < 0.3
    f_keys, f_iid = Feed(), Feed()
    f_keys.rows(1, 30, y[~canary], y[canary], keys=np.r_[keys[~canary], keys[canary]])
    f_iid.rows(1, 30, y[~canary], y[canary])
    assert f_keys.data(30).variance > 3 * f_iid.data(30).variance


def test_canary_failing_every_request_is_rolled_back_without_outcomes():
    f = Feed()
    f.rows(1, 10, _binary(300, 0.5, 1), np.zeros(0), fail_c=20)
    d, _ = look(POLICY, f.data(10))
    assert d.action == "rollback" and d.guardrail == "error_rate"
    assert d.n_canary == 0 and "error rate" in d.reason
    # a few failures in both arms at the same rate never trip it
    g = Feed()
    g.rows(1, 10, _binary(900, 0.5, 1), _binary(98, 0.5, 2), fail_c=2)
    assert look(POLICY, g.data(10))[0].guardrail is None


def test_latency_guardrail_tests_the_share_slower_than_the_baseline_p99():
    """Arms interleaved in log order (90 + 10 requests per batch, 30 batches) as live traffic is: the
    first 500 baseline requests calibrate, the rest fall into 22 time windows of 50 baseline requests."""
    rng = np.random.default_rng(3)

    def feed(factor: float) -> Feed:
        f = Feed()
        for i in range(30):
            f.rows(1, 10, _binary(90, 0.5, i), _binary(10, 0.5, 100 + i),
                   lat_b=np.exp(rng.normal(1.6, 0.35, 90)), lat_c=factor * np.exp(rng.normal(1.6, 0.35, 10)))
        return f

    d, _ = look(POLICY, feed(2.0).data(10))
    assert d.action == "rollback" and d.guardrail == "latency"
    assert d.periods[0]["latency_threshold_ms"] > 0 and d.p_latency <= POLICY.resolved_guardrail_alpha
    assert d.periods[0]["latency_windows"] >= POLICY.latency_min_windows
    assert look(POLICY, feed(1.0).data(10))[0].guardrail is None


def test_sample_ratio_mismatch_holds_and_never_promotes():
    """A 10 % canary that receives 7 %, even with a clearly better metric: hold, with the statistic."""
    d, _ = _decide(_binary(18_600, 0.50, 1), _binary(1_400, 0.70, 2))
    assert d.srm and d.action == "hold" and "sample-ratio mismatch" in d.reason
    assert d.p_srm <= POLICY.srm_alpha and d.p_value_better <= POLICY.primary_alpha


def test_outcome_coverage_difference_is_treated_like_srm():
    f = Feed()
    base = _binary(9_000, 0.5, 1)
    can = _binary(1_000, 0.5, 2)
    can[:300] = np.nan  # the canary's outcomes go missing
    f.rows(1, 10, base, can)
    d, _ = look(POLICY, f.data(10))
    assert d.srm and d.action == "hold" and d.coverage[1] == pytest.approx(0.7)


def test_out_of_domain_outcomes_are_skipped_not_fatal():
    with pytest.raises(ValueError, match="^value: "):
        check_outcome("success_rate", 0.5)
    with pytest.raises(ValueError, match="^value: "):
        check_outcome("mean_outcome", math.inf)
    check_outcome("mean_outcome", -3.5)
    check_outcome("log_loss", 1.0)
    base = _binary(5_000, 0.6, 1)
    base[:3] = [2.0, -1.0, 0.5]
    d, _ = _decide(base, _binary(1_000, 0.6, 2), weight=17)
    assert d.skipped_outcomes == 3 and d.n_baseline == 4_997 and d.action == "hold"


def test_heavy_tails_are_winsorised_at_limits_fixed_from_the_baseline():
    policy = RolloutPolicy(metric="mean_outcome", tau=0.5)
    rng = np.random.default_rng(5)
    f = Feed(policy)
    f.rows(1, 10, np.exp(1.5 * rng.standard_normal(500)) - 1, np.exp(1.5 * rng.standard_normal(60)) - 1)
    d, st = look(policy, f.data(10))
    assert d.action == "hold" and d.winsor is None  # limits not fixed yet: no test
    more_b = np.exp(1.5 * rng.standard_normal(1_500)) - 1
    f.rows(1, 10, more_b, np.r_[1e9, np.exp(1.5 * rng.standard_normal(166)) - 1])
    d, st = look(policy, f.data(10), st)
    lo, hi = d.winsor
    assert lo < 0 < hi < 200 and d.mean_canary < hi  # the 1e9 outlier is clipped
    assert st.winsor == d.winsor  # stored, so later looks (and analyze) use the same limits
    g = Feed(policy, st)
    assert g.b.winsor == st.winsor


def test_loss_metrics_lower_is_better():
    rng = np.random.default_rng(7)
    y_b, y_c = _binary(5_000, 0.5, 1), _binary(1_000, 0.5, 2)
    good = np.where(y_b == 1, 0.8, 0.2)
    bad = np.clip(np.where(y_c == 1, 0.55, 0.45) + rng.normal(0, 0.01, 1_000), 0.01, 0.99)
    policy = RolloutPolicy(metric="brier")
    f = Feed(policy)
    f.rows(1, 17, y_b, y_c, scores=np.r_[good, bad])
    d, _ = look(policy, f.data(17))
    assert d.action == "rollback" and d.mean_canary > d.mean_baseline and d.direction == "worse"


def test_state_round_trips_through_json():
    d, st = _decide(_binary(18_000, 0.6, 1), _binary(2_000, 0.58, 2))
    back = SequentialState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back == st


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"steps": (10, 50)}, {"metric": "nope"},
                                    {"guardrail_alpha": 0.03}, {"point_mass": 1.5},
                                    {"metric": "mean_outcome"}, {"outcome_delay_s": -1}])
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        RolloutPolicy(**kwargs)


def test_the_non_inferiority_bound_spends_the_promotion_alpha():
    """With a margin, the lower side of the always-valid interval can step a canary up, so it is taken at
    2·promote_alpha: the primary alpha by default (the reported interval), a stricter level when the
    operator sets promote_alpha lower. A canary as good as production with a margin between the two
    bounds steps up under the default and holds under promote_alpha = 0.001."""
    base, can = _binary(18_000, 0.60, 1), _binary(2_000, 0.60, 2)
    loose = RolloutPolicy(metric="success_rate", non_inferiority_margin=1.0)
    strict = RolloutPolicy(metric="success_rate", non_inferiority_margin=1.0, promote_alpha=0.001)
    d_loose, _ = _decide(base, can, policy=loose)
    d_strict, _ = _decide(base, can, policy=strict)
    assert d_loose.improvement_lower_bound == pytest.approx(d_loose.ci_low)  # default: the reported one
    assert d_strict.improvement_lower_bound < d_loose.improvement_lower_bound
    margin = -(d_loose.improvement_lower_bound + d_strict.improvement_lower_bound) / 2
    d_loose, _ = _decide(base, can, policy=dataclasses.replace(loose, non_inferiority_margin=margin))
    d_strict, _ = _decide(base, can, policy=dataclasses.replace(strict, non_inferiority_margin=margin))
    assert d_loose.action == "step_up" and "non-inferior" in d_loose.reason, d_loose.reason
    assert d_strict.action == "hold", d_strict.reason


def _sticky_aa(seed: int, n_keys: int = 2000, n: int = 80_000, reporting: float = 0.5):
    """An A/A canary with sticky keys (10 % of keys), where only `reporting` of the clients ever send
    outcomes back: coverage is a property of the key, the same in both arms."""
    rng = np.random.default_rng(seed)
    key_canary = rng.random(n_keys) < 0.1
    reports = rng.random(n_keys) < reporting
    row_key = rng.integers(0, n_keys, n)
    arm = key_canary[row_key]
    y = np.where(reports[row_key], (rng.random(n) < 0.5).astype(float), np.nan)
    return y[~arm], y[arm], np.r_[row_key[~arm], row_key[arm]]


def test_coverage_counts_keys_that_never_report_as_keys():
    """Half the clients never report outcomes. Per row, coverage then looks wildly different between arms
    by chance alone (the binomial variance held 9 of 20 such A/A canaries as "not comparable"); per key,
    as the check now weighs it, it holds at most one at its srm_alpha of 0.001, and the canary is judged
    on its outcomes."""
    held = 0
    for seed in range(20):
        base, can, keys = _sticky_aa(seed)
        f = Feed()
        f.rows(1, 10, base, can, keys=keys)
        d, st = look(POLICY, f.data(10), None)
        held += st.p_coverage <= POLICY.srm_alpha
    assert held <= 1, held
    # A real coverage fault still holds: where 90 % of clients report, the canary's outcomes stop coming
    # back for a third of its rows.
    base, can, keys = _sticky_aa(0, reporting=0.9)
    can = np.where(np.random.default_rng(1).random(can.size) < 1 / 3, np.nan, can)
    f = Feed()
    f.rows(1, 10, base, can, keys=keys)
    d, st = look(POLICY, f.data(10), None)
    assert d.srm and d.action == "hold" and st.p_coverage <= POLICY.srm_alpha, d.reason


def test_a_canary_of_a_few_clients_is_not_judged_as_many_rows():
    """Sticky routing at 10 % sent the canary five of fifty clients, 400 outcomes each, all doing worse.
    With five keys there is no telling the canary from those clients (a client's own rate varies), and
    the pooled variance would take the 2,000 rows as independent evidence. A period needs outcomes from
    ten keys in each arm to enter the estimate; below that the canary is collecting, and the reason says
    so. With forty of four hundred clients the same rates decide."""
    base, few = _binary(18_000, 0.6, 1), _binary(2_000, 0.3, 2)
    d, _ = look(POLICY, _keyed(base, few, 5), None)
    assert d.action == "hold" and "10 keys" in d.reason and not d.periods[0]["included"], d.reason
    d, _ = look(POLICY, _keyed(base, few, 40), None)
    assert d.action == "rollback", d.reason


def _keyed(base: np.ndarray, can: np.ndarray, canary_keys: int):  # noqa: ANN202
    """One period at 10 %: the canary's rows spread evenly over `canary_keys` keys, the baseline's over
    nine times as many (the assignment of keys matches the split)."""
    f = Feed()
    base_keys = np.arange(base.size) % (9 * canary_keys)
    can_keys = 9 * canary_keys + np.arange(can.size) % canary_keys
    f.rows(1, 10, base, can, keys=np.r_[base_keys, can_keys])
    return f.data(10)


def test_the_minimum_counts_only_outcomes_the_estimate_is_made_of():
    """A period with 25 canary outcomes is reported but does not enter the estimate (30 needed); its
    outcomes do not count toward the 200 either: 25 + 190 is still collecting, 25 + 210 decides."""
    f = Feed()
    f.rows(1, 10, _binary(225, 0.6, 1), _binary(25, 0.3, 2))
    f.rows(2, 10, _binary(1710, 0.6, 3), _binary(190, 0.3, 4))
    d, _ = look(POLICY, f.data(10), None)
    assert [p["included"] for p in d.periods] == [False, True]
    assert d.n_canary == 215 and d.action == "hold" and "collecting" in d.reason, d.reason
    f.rows(2, 10, _binary(180, 0.6, 5), _binary(20, 0.3, 6))
    d, _ = look(POLICY, f.data(10), None)
    assert d.action == "rollback", d.reason


def test_coverage_variance_without_keys_is_the_binomial_one_even_for_a_small_full_canary():
    """Every request its own unit: the coverage check's variance is the binomial variance under equal
    coverage (up to K/(K−1)), including early, when the canary's 8 matured rows all have outcomes. A
    per-arm variance gave 0.21 of it there and held 4.6 % of 1,000 delayed-outcome A/A runs."""
    f = Feed()
    base = np.r_[np.ones(41), np.nan]
    f.rows(1, 10, base, np.ones(8))
    p = f.data(10).periods[0]
    pooled = 49 / 50
    binomial = pooled * (1 - pooled) * (1 / 42 + 1 / 8)
    assert sum(p.coverage_var) == pytest.approx(binomial * 50 / 49)
