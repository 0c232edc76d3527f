"""Unit tests for rollout.stats: classical tests, the mSPRT and guardrails."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps

from rollout import reference as R
from rollout import stats as S

# --------------------------------------------------------------------------------------------------
# metrics


def test_per_request_values_brier_and_log_loss():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.9, 0.2, 0.5, 0.0])
    np.testing.assert_allclose(S.per_request_values("brier", y, p), [0.01, 0.04, 0.25, 0.0])
    ll = S.per_request_values("log_loss", y, p)
    np.testing.assert_allclose(ll[:3], [-math.log(0.9), -math.log(0.8), -math.log(0.5)])
    # p = 0 for y = 0 is clipped, so the loss is tiny but finite
    assert 0.0 <= ll[3] < 1e-12
    # a confident wrong answer is capped by the clipping, not infinite
    assert S.per_request_values("log_loss", np.array([1.0]), np.array([0.0]))[0] == pytest.approx(
        -math.log(S.LOG_LOSS_EPS)
    )


def test_per_request_values_validation():
    with pytest.raises(ValueError, match="binary"):
        S.per_request_values("success_rate", np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="scores"):
        S.per_request_values("brier", np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown metric"):
        S.per_request_values("accuracy", np.array([0.0]))


def test_higher_is_better_by_metric():
    assert S.higher_is_better("success_rate") and S.higher_is_better("mean_outcome")
    assert not S.higher_is_better("brier") and not S.higher_is_better("log_loss")


def test_binary_moments_match_numpy_variance():
    x = (np.random.default_rng(3).random(1001) < 0.3).astype(float)
    fast = R.ArmMoments.from_values(x, binary=True)
    slow = R.ArmMoments.from_values(x)
    assert fast.n == slow.n == 1001
    assert fast.mean == pytest.approx(slow.mean, abs=1e-15)
    assert fast.var == pytest.approx(np.var(x, ddof=1), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# classical tests


def test_two_proportion_uses_z_with_enough_cells():
    r = R.two_proportion_test(600, 1000, 50, 100)
    assert r.test == "two_proportion_z"
    pooled = 650 / 1100
    z = (0.5 - 0.6) / math.sqrt(pooled * (1 - pooled) * (1 / 1000 + 1 / 100))
    assert r.statistic == pytest.approx(z, rel=1e-12)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    assert r.effect == pytest.approx(-0.1)
    assert r.direction == "worse"
    assert (r.n_baseline, r.n_canary) == (1000, 100)


@pytest.mark.parametrize(
    ("xb", "nb", "xc", "nc"),
    [(600, 1000, 3, 10), (600, 1000, 98, 100), (2, 1000, 0, 100), (4, 20, 10, 20)],
)
def test_two_proportion_switches_to_fisher_when_a_cell_is_below_5(xb, nb, xc, nc):
    r = R.two_proportion_test(xb, nb, xc, nc)
    assert r.test == "fisher_exact"
    ref = sps.fisher_exact([[xc, nc - xc], [xb, nb - xb]])
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_vectorised_z_matches_scalar_test():
    xb = np.array([600, 300, 450])
    nb = np.array([1000, 500, 900])
    xc = np.array([50, 40, 60])
    nc = np.array([100, 80, 100])
    z, p = R.two_proportion_z(xb, nb, xc, nc)
    for i in range(3):
        r = R.two_proportion_test(int(xb[i]), int(nb[i]), int(xc[i]), int(nc[i]))
        assert z[i] == pytest.approx(r.statistic, rel=1e-12)
        assert p[i] == pytest.approx(r.p_value, rel=1e-12)


def test_welch_matches_scipy_and_reports_direction():
    rng = np.random.default_rng(1)
    b = rng.normal(10.0, 1.0, 500)
    c = rng.normal(10.3, 3.0, 80)
    r = R.welch_t_test(b, c)
    ref = sps.ttest_ind(c, b, equal_var=False)
    assert r.test == "welch_t"
    assert r.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert r.effect == pytest.approx(c.mean() - b.mean())
    assert r.direction == ("better" if r.effect > 0 else "worse")


def test_classical_test_dispatch():
    rng = np.random.default_rng(2)
    b = rng.normal(0.0, 1.0, 300)
    c = rng.normal(0.0, 1.0, 300)
    assert R.classical_test("mean_outcome", b, c).test == "welch_t"
    mw = R.classical_test("mean_outcome", b, c, continuous="mann_whitney")
    assert mw.test == "mann_whitney_u"
    assert mw.p_value == pytest.approx(sps.mannwhitneyu(c, b, alternative="two-sided").pvalue, rel=1e-12)
    assert R.classical_test("success_rate", (b > 0).astype(float), (c > 0).astype(float)).test in (
        "two_proportion_z",
        "fisher_exact",
    )


def test_loss_metric_direction_lower_is_better():
    rng = np.random.default_rng(4)
    y = (rng.random(2000) < 0.5).astype(float)
    good = np.clip(y * 0.8 + 0.1 + rng.normal(0, 0.05, y.size), 0, 1)  # sharp, calibrated-ish
    bad = np.clip(0.5 + rng.normal(0, 0.05, y.size), 0, 1)  # uninformative
    lb = S.per_request_values("brier", y, bad)
    lc = S.per_request_values("brier", y, good)
    r = R.classical_test("brier", lb, lc)
    assert r.test == "welch_t"
    assert r.effect < 0  # canary has lower loss ...
    assert r.direction == "better"  # ... which is better
    assert R.classical_test("log_loss", lc, lb).direction == "worse"


def test_direction_of_zero_is_none():
    assert S.direction_of(0.0) == "none"
    assert S.direction_of(math.nan) == "none"
    assert S.direction_of(0.1, higher_is_better=False) == "worse"


# --------------------------------------------------------------------------------------------------
# mSPRT


def _independent_lambda(theta_hat: float, v: float, tau: float) -> float:
    """Mixture likelihood ratio by numerical integration over the prior: no closed form used."""

    def integrand(theta: float) -> float:
        return sps.norm.pdf(theta_hat, loc=theta, scale=math.sqrt(v)) * sps.norm.pdf(theta, 0.0, tau)

    num, _ = integrate.quad(integrand, -20 * tau, 20 * tau, points=[0.0, theta_hat], limit=200)
    return num / sps.norm.pdf(theta_hat, 0.0, math.sqrt(v))


@pytest.mark.parametrize(
    ("theta_hat", "v", "tau"),
    [(0.0, 1e-3, 0.05), (-0.03, 2e-4, 0.05), (0.02, 1e-4, 0.02), (0.1, 5e-3, 0.1), (-0.05, 3e-4, 0.08)],
)
def test_msprt_closed_form_matches_numerical_mixture(theta_hat, v, tau):
    lam = _independent_lambda(theta_hat, v, tau)
    assert math.exp(S.msprt_log_lr(theta_hat, v, tau)) == pytest.approx(lam, rel=1e-7)


def test_msprt_test_matches_straightforward_computation_on_arrays():
    rng = np.random.default_rng(5)
    b = (rng.random(5000) < 0.60).astype(float)
    c = (rng.random(600) < 0.54).astype(float)
    tau = 0.05
    r = R.msprt_test(b, c, tau=tau)
    # straightforward: textbook formula with numpy's unbiased variances
    theta = c.mean() - b.mean()
    v = np.var(b, ddof=1) / b.size + np.var(c, ddof=1) / c.size
    lam = math.sqrt(v / (v + tau**2)) * math.exp(tau**2 * theta**2 / (2 * v * (v + tau**2)))
    assert r.variance == pytest.approx(v, rel=1e-12)
    assert r.effect == pytest.approx(theta, rel=1e-12)
    assert r.statistic == pytest.approx(math.log(lam), rel=1e-9)
    assert r.p_value == pytest.approx(min(1.0, 1.0 / lam), rel=1e-9)
    assert r.direction == "worse"


def test_msprt_p_value_bounds_and_edge_cases():
    assert S.msprt_p_value(-3.0) == 1.0
    assert S.msprt_p_value(0.0) == 1.0
    assert 0.0 < S.msprt_p_value(5.0) < 1.0
    assert S.msprt_p_value(math.inf) == 0.0
    # fewer than 2 per arm: no evidence
    r = R.msprt_test(np.array([1.0]), np.array([0.0, 1.0]), tau=0.05)
    assert r.p_value == 1.0
    # zero variance with a difference is the V -> 0 limit: conclusive
    assert R.msprt_test(np.ones(50), np.zeros(50), tau=0.05).p_value == 0.0
    assert R.msprt_test(np.ones(50), np.ones(50), tau=0.05).p_value == 1.0
    with pytest.raises(ValueError):
        R.msprt_test(np.ones(5), np.ones(5), tau=0.0)


def test_always_valid_p_in_unit_interval_and_decreases_with_real_effect():
    rng = np.random.default_rng(6)
    n = 40_000
    b = (rng.random(n) < 0.60).astype(float)
    c = (rng.random(n) < 0.50).astype(float)
    looks = np.arange(200, n + 1, 400)
    per_look = np.array([R.msprt_test(b[: k * 9 // 10], c[: k // 10], tau=0.05).p_value for k in looks])
    assert np.all((per_look >= 0.0) & (per_look <= 1.0))
    av = R.always_valid_p_values(per_look)
    assert np.all(np.diff(av) <= 0.0)  # monotone non-increasing
    assert av[-1] < 1e-6  # a 10-point effect is overwhelming by the end
    # the evidence itself (not only the running minimum) grows with the data
    assert per_look[-1] < per_look[len(per_look) // 4] < per_look[0]


def test_msprt_recompute_is_deterministic_to_1e9():
    rng = np.random.default_rng(7)
    b = rng.normal(1.0, 2.0, 12345)
    c = rng.normal(1.1, 2.5, 1234)
    r1 = R.msprt_test(b, c, tau=0.1)
    # the "logged rows" come back as plain Python lists, in the same order
    r2 = R.msprt_test(np.array(b.tolist()), np.array(c.tolist()), tau=0.1)
    assert abs(r1.p_value - r2.p_value) <= 1e-9
    assert abs(r1.statistic - r2.statistic) <= 1e-9
    assert r1 == r2


def test_msprt_confidence_interval_boundary_is_where_lambda_hits_one_over_alpha():
    theta, v, tau, alpha = -0.04, 2e-4, 0.05, 0.05
    lo, hi = S.msprt_confidence_interval(theta, v, tau, alpha)
    assert lo < theta < hi
    for edge in (lo, hi):
        assert S.msprt_log_lr(theta - edge, v, tau) == pytest.approx(math.log(1 / alpha), rel=1e-9)
    # 0 outside the interval  <=>  single-look p <= alpha
    p = S.msprt_p_value(S.msprt_log_lr(theta, v, tau))
    assert (hi < 0.0) == (p <= alpha)


# --------------------------------------------------------------------------------------------------
# one-sided and point-mixture SPRTs (the guardrail tests that were here moved to tests/unit/test_decision.py,
# where the guardrails now live as sequential tests inside look())


@pytest.mark.parametrize("theta_hat", [-0.08, -0.02, 0.0, 0.03])
def test_one_sided_mixture_matches_numerical_integral(theta_hat):
    v, tau = 4e-4, 0.05
    grid = np.linspace(-8 * tau, 0.0, 40_001)
    prior = 2 * sps.norm.pdf(grid, 0.0, tau)
    lik = sps.norm.pdf(theta_hat, grid, math.sqrt(v)) / sps.norm.pdf(theta_hat, 0.0, math.sqrt(v))
    numeric = np.trapezoid(prior * lik, grid)
    assert S.msprt_one_sided_log_lr(theta_hat, v, tau, "less") == pytest.approx(math.log(numeric), rel=1e-4)


def test_point_mixture_is_wald_sprt_at_full_weight_and_favours_its_side():
    v, tau = 4e-4, 0.04
    assert S.msprt_point_mixture_log_lr(-0.05, v, tau, "less", 1.0) == pytest.approx(
        (-tau * -0.05 - 0.5 * tau * tau) / v)
    assert S.msprt_point_mixture_log_lr(-0.05, v, tau, "less", 0.8) > 2.5
    assert S.msprt_point_mixture_log_lr(-0.05, v, tau, "greater", 0.8) < 0.0
    assert S.msprt_point_mixture_log_lr(0.01, math.nan, tau, "less", 0.8) == 0.0


def test_outcome_domain():
    assert S.outcome_in_domain("success_rate", np.array([0.0, 1.0, 0.5, np.nan])).tolist() == [
        True, True, False, False]
    assert S.outcome_in_domain("mean_outcome", np.array([-3.0, np.inf])).tolist() == [True, False]
    with pytest.raises(ValueError, match="value: metric 'brier' takes binary outcomes"):
        S.check_outcome("brier", 2.0)
