"""Unit tests for the pure rollout decision policy (rollout.decision)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rollout.decision import ArmData, Decision, RolloutPolicy, SequentialState, decide
from rollout.stats import msprt_test, per_request_values

POLICY = RolloutPolicy(metric="success_rate")


def _binary(n: int, p: float, seed: int) -> np.ndarray:
    """Exactly round(n * p) successes in a shuffled order, so tests do not hinge on sampling luck."""
    k = round(n * p)
    x = np.r_[np.ones(k), np.zeros(n - k)]
    np.random.default_rng(seed).shuffle(x)
    return x


def test_hold_below_min_samples():
    d, st = decide(POLICY, ArmData(_binary(5000, 0.6, 1)), ArmData(_binary(150, 0.3, 2)), 10)
    assert d.action == "hold"
    assert d.next_weight == 10
    assert d.n_canary == 150 < d.min_samples_per_arm
    assert "need 200" in d.reason
    # looks below the minimum are not counted in the running minimum
    assert st.looks == 0 and st.p_worse == 1.0


def test_error_guardrail_rolls_back_below_min_samples():
    base = ArmData(_binary(5000, 0.6, 1), requests=10_000, errors=5)
    can = ArmData(_binary(10, 0.6, 2), requests=20, errors=12)
    d, _ = decide(POLICY, base, can, 5)
    assert d.action == "rollback"
    assert d.next_weight == 0
    assert d.guardrail == "error_rate"
    assert "guardrail" in d.reason


def test_latency_guardrail_rolls_back():
    base = ArmData(_binary(5000, 0.6, 1), requests=10_000, p99_latency_s=0.010)
    can = ArmData(_binary(50, 0.6, 2), requests=500, p99_latency_s=0.030)
    d, _ = decide(POLICY, base, can, 5)
    assert d.action == "rollback" and d.guardrail == "p99_latency"
    # same ratio but too few canary requests to trust a p99: collecting
    can_few = ArmData(_binary(50, 0.6, 2), requests=30, p99_latency_s=0.030)
    assert decide(POLICY, base, can_few, 5)[0].action == "hold"


def test_clear_worse_rolls_back_with_p_value_recorded():
    d, st = decide(POLICY, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.50, 2)), 10)
    assert d.action == "rollback"
    assert d.next_weight == 0
    assert d.direction == "worse"
    assert d.p_value <= d.alpha == 0.05
    assert d.p_value == d.p_value_worse == st.p_worse
    assert d.test == "msprt"
    assert d.naive_test == "two_proportion_z" and d.naive_p_value < 1e-6
    assert d.guardrail is None


def test_clear_better_steps_up_to_next_step():
    d, st = decide(POLICY, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.70, 2)), 10)
    assert d.action == "step_up"
    assert d.next_weight == 25
    assert d.direction == "better" and d.p_value_better <= 0.05
    assert st.canary_n_at_last_step == 2_000
    # from a weight between steps, the next step above it
    assert (
        decide(POLICY, ArmData(_binary(20_000, 0.6, 1)), ArmData(_binary(2_000, 0.7, 2)), 7)[0].next_weight
        == 10
    )


def test_last_step_promotes():
    d, _ = decide(POLICY, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.70, 2)), 50)
    assert d.action == "promote"
    assert d.next_weight == 100
    assert d.terminal


def test_step_up_waits_for_fresh_canary_samples_at_new_weight():
    base, can = _binary(20_000, 0.60, 1), _binary(3_000, 0.70, 2)
    d1, st = decide(POLICY, ArmData(base[:10_000]), ArmData(can[:1_000]), 10)
    assert d1.action == "step_up" and d1.next_weight == 25
    d2, st = decide(POLICY, ArmData(base[:11_000]), ArmData(can[:1_100]), 25, st)
    assert d2.action == "hold" and "new canary outcomes" in d2.reason
    d3, _ = decide(POLICY, ArmData(base[:12_000]), ArmData(can[:1_300]), 25, st)
    assert d3.action == "step_up" and d3.next_weight == 50


def test_no_difference_holds():
    d, _ = decide(POLICY, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.60, 2)), 10)
    assert d.action == "hold"
    assert d.p_value > 0.05
    assert "no significant difference" in d.reason


def test_non_inferiority_margin_steps_up_a_tie():
    base, can = ArmData(_binary(200_000, 0.60, 1)), ArmData(_binary(50_000, 0.60, 2))
    assert decide(POLICY, base, can, 10)[0].action == "hold"
    pol = RolloutPolicy(metric="success_rate", non_inferiority_margin=0.02)
    d, _ = decide(pol, base, can, 10)
    assert d.action == "step_up" and "non-inferior" in d.reason
    assert d.improvement_lower_bound >= -0.02
    # a canary 5 points worse is never "non-inferior" within 2 points
    worse = ArmData(_binary(50_000, 0.55, 2))
    assert decide(pol, base, worse, 10)[0].action == "rollback"


def _scored(n: int, sharp: float, seed: int) -> ArmData:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(float)
    # sharp=0 -> score ~0.5 (uninformative); sharp=0.4 -> score ~0.1/0.9
    scores = np.clip(0.5 + sharp * (2 * y - 1) + rng.normal(0, 0.05, n), 0.001, 0.999)
    return ArmData(y, scores=scores)


@pytest.mark.parametrize("metric", ["brier", "log_loss"])
def test_loss_metrics_lower_is_better(metric):
    pol = RolloutPolicy(metric=metric)
    assert not pol.higher_is_better
    good, bad = _scored(5_000, 0.4, 1), _scored(1_000, 0.0, 2)
    # canary has the higher loss -> worse -> rollback
    d, _ = decide(pol, good, bad, 10)
    assert d.effect > 0 and d.direction == "worse" and d.action == "rollback"
    # canary has the lower loss -> better -> step up
    d, _ = decide(pol, bad, _scored(1_000, 0.4, 3), 10)
    assert d.effect < 0 and d.direction == "better" and d.action == "step_up"
    assert d.improvement_lower_bound > 0  # improvement is sign-flipped for losses


def test_mean_outcome_needs_tau():
    with pytest.raises(ValueError, match="tau"):
        RolloutPolicy(metric="mean_outcome")
    pol = RolloutPolicy(metric="mean_outcome", tau=0.5)
    rng = np.random.default_rng(9)
    d, _ = decide(pol, ArmData(rng.normal(10, 2, 5000)), ArmData(rng.normal(9, 2, 800)), 10)
    assert d.action == "rollback" and d.naive_test == "welch_t" and d.tau == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": (5, 10, 50)}, {"steps": (10, 5, 100)}, {"alpha": 1.5}, {"metric": "auc"}, {"tau": -1.0}],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        RolloutPolicy(**kwargs)


def test_decision_is_recomputable_from_logged_rows():
    rng = np.random.default_rng(11)
    base = (rng.random(8_000) < 0.6).astype(float)
    can = (rng.random(900) < 0.57).astype(float)
    d, _ = decide(POLICY, ArmData(base), ArmData(can), 10)
    logged_b, logged_c = json.loads(json.dumps(base.tolist())), json.loads(json.dumps(can.tolist()))
    r = msprt_test(
        per_request_values(d.metric, np.array(logged_b)),
        per_request_values(d.metric, np.array(logged_c)),
        tau=d.tau,
    )
    assert abs(r.statistic - d.statistic) <= 1e-9
    assert abs(r.p_value - d.p_value_look) <= 1e-9
    assert (r.n_baseline, r.n_canary) == (d.n_baseline, d.n_canary)


def test_running_minimum_and_state_round_trips():
    rng = np.random.default_rng(12)
    base = (rng.random(30_000) < 0.60).astype(float)
    can = (rng.random(3_000) < 0.57).astype(float)
    st: SequentialState | None = None
    decisions: list[Decision] = []
    for k in range(2_000, 30_001, 2_000):
        d, st = decide(POLICY, ArmData(base[:k]), ArmData(can[: k // 10]), 10, st)
        decisions.append(d)
        # the state survives JSON and can be rebuilt from the stored decision alone
        assert SequentialState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
        assert SequentialState.from_decision(d) == st
        if d.terminal:
            break
    ps = [d.p_value for d in decisions]
    assert all(b <= a for a, b in zip(ps, ps[1:], strict=False))
    # recompute the running minimum per direction from the stored per-look values
    worse = [d.p_value_look for d in decisions if d.direction == "worse"]
    assert decisions[-1].p_value_worse == pytest.approx(min([1.0, *worse]), abs=1e-12)
    json.dumps(decisions[-1].to_dict(), allow_nan=False)


def test_naive_procedure_uses_the_look_p_value_without_memory():
    pol = RolloutPolicy(metric="success_rate", procedure="naive_fixed_horizon")
    d, st = decide(pol, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.58, 2)), 10)
    assert d.test == "two_proportion_z"
    assert d.p_value == d.naive_p_value
    assert d.action == ("rollback" if d.naive_p_value <= 0.05 else "hold")
    assert math.isfinite(d.p_value_look)


def test_rollback_after_step_up_quotes_the_worse_direction_p_value():
    # state as if the canary had earlier been found better (p_better tiny) and stepped up
    st = SequentialState(looks=5, p_worse=1.0, p_better=1e-6, canary_n_at_last_step=1_000)
    d, _ = decide(POLICY, ArmData(_binary(20_000, 0.60, 1)), ArmData(_binary(2_000, 0.50, 2)), 25, st)
    assert d.action == "rollback"
    assert d.p_value == d.p_value_worse <= 0.05
    assert d.p_value_better == 1e-6
