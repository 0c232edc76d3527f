"""Textbook tests on raw per-arm arrays that the rollout controller does NOT act on: the fixed-horizon
two-proportion z / Fisher exact, Welch t and Mann-Whitney U tests (valid only when looked at once, at a
size fixed in advance: what repeated peeking at them costs is why the controller uses mixture SPRTs),
and the two-sided mSPRT computed straight from arrays with plug-in per-arm variances.

Kept apart from ``rollout.stats`` so nobody mistakes them for the decision path: an auditor can run them
on the rows `chimera analyze` reads as an independent cross-check, and tests/unit/test_stats.py pins their
behaviour (Fisher below FISHER_MIN_CELL, SciPy agreement, determinism to 1e-9)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as sps
from scipy.special import ndtr

from rollout.stats import (
    Direction,
    direction_of,
    higher_is_better,
    msprt_confidence_interval,
    msprt_log_lr,
    msprt_p_value,
)

ContinuousTest = Literal["welch", "mann_whitney"]

# Below this many observed successes or failures in any arm the normal approximation of the z-test is
# poor, so the exact test is used instead.
FISHER_MIN_CELL = 5


def _mean(x: np.ndarray) -> float:
    return float(np.sum(x)) / x.size if x.size else math.nan


@dataclass(frozen=True)
class ArmMoments:
    """Sufficient statistics of one arm; the normal-approximation tests need nothing else.

    ``var`` is the unbiased sample variance (ddof=1), NaN when n < 2.
    """

    n: int
    total: float
    mean: float
    var: float

    @classmethod
    def from_values(cls, values: np.ndarray, *, binary: bool = False) -> ArmMoments:
        """One fixed recipe so a recompute from the same rows is bit-for-bit equal.

        ``binary=True`` (0/1 values, i.e. success_rate) uses the closed form k(n−k)/(n(n−1)), which is
        the same unbiased variance without a second pass over the data; the controller calls this after
        every batch on all rows so far.
        """
        x = np.asarray(values, dtype=np.float64)
        n = int(x.size)
        if n == 0:
            return cls(0, 0.0, math.nan, math.nan)
        total = float(np.sum(x))
        mean = total / n
        if n < 2:
            var = math.nan
        elif binary:
            var = total * (n - total) / (n * (n - 1.0))
        else:
            var = float(np.var(x, ddof=1))
        return cls(n, total, mean, var)


@dataclass(frozen=True)
class TestResult:
    """Outcome of one fixed-horizon test, canary versus baseline.

    ``direction`` is the sign of ``effect`` in goodness terms (see ``direction_of``), independent of
    significance: compare ``p_value`` with your alpha.
    """

    __test__ = False  # not a pytest test class despite the name

    test: str
    statistic: float
    p_value: float
    n_baseline: int
    n_canary: int
    mean_baseline: float
    mean_canary: float
    effect: float
    direction: Direction


def two_proportion_z(
    successes_b: np.ndarray | int,
    n_b: np.ndarray | int,
    successes_c: np.ndarray | int,
    n_c: np.ndarray | int,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled two-sided z-test, vectorised so the simulator can score every look of every run at once.

    Returns (z, p) with z > 0 when the canary's rate is higher. Where the pooled rate is 0 or 1 the
    test has no information and p = 1.
    """
    xb = np.asarray(successes_b, dtype=np.float64)
    nb = np.asarray(n_b, dtype=np.float64)
    xc = np.asarray(successes_c, dtype=np.float64)
    nc = np.asarray(n_c, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (xb + xc) / (nb + nc)
        se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / nb + 1.0 / nc))
        z = (xc / nc - xb / nb) / se
    z = np.where(se > 0.0, z, 0.0)
    p = 2.0 * ndtr(-np.abs(z))
    return z, p


def two_proportion_test(
    successes_b: int, n_b: int, successes_c: int, n_c: int, *, higher_is_better: bool = True
) -> TestResult:
    """Compare two success rates; Fisher exact when any success/failure count is below 5.

    The z-test's normal approximation breaks down with sparse cells, while Fisher's exact test is valid
    at any size; the switch keeps the reference p-value honest on small canaries.
    """
    xb, nb, xc, nc = int(successes_b), int(n_b), int(successes_c), int(n_c)
    if not (0 <= xb <= nb and 0 <= xc <= nc):
        raise ValueError("successes must lie between 0 and n")
    mb = xb / nb if nb else math.nan
    mc = xc / nc if nc else math.nan
    effect = mc - mb
    direction = direction_of(effect, higher_is_better)
    if nb == 0 or nc == 0:
        return TestResult("two_proportion_z", math.nan, 1.0, nb, nc, mb, mc, effect, direction)
    if min(xb, nb - xb, xc, nc - xc) < FISHER_MIN_CELL:
        # Canary row first: odds ratio > 1 means the canary succeeds more often.
        res = sps.fisher_exact([[xc, nc - xc], [xb, nb - xb]], alternative="two-sided")
        return TestResult(
            "fisher_exact", float(res.statistic), float(res.pvalue), nb, nc, mb, mc, effect, direction
        )
    pooled = (xb + xc) / (nb + nc)
    z = (mc - mb) / math.sqrt(pooled * (1.0 - pooled) * (1.0 / nb + 1.0 / nc))
    p = 2.0 * float(ndtr(-abs(z)))
    return TestResult("two_proportion_z", z, p, nb, nc, mb, mc, effect, direction)


def welch_t_test(baseline: np.ndarray, canary: np.ndarray, *, higher_is_better: bool = True) -> TestResult:
    """Welch's t-test, because canary and baseline arms differ in size and usually in variance."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(canary, dtype=np.float64)
    mb, mc = _mean(b), _mean(c)
    effect = mc - mb
    stat, p = math.nan, 1.0
    if b.size >= 2 and c.size >= 2:
        res = sps.ttest_ind(c, b, equal_var=False)
        stat = float(res.statistic)
        p = float(res.pvalue) if math.isfinite(float(res.pvalue)) else 1.0
    return TestResult(
        "welch_t", stat, p, int(b.size), int(c.size), mb, mc, effect, direction_of(effect, higher_is_better)
    )


def mann_whitney_test(
    baseline: np.ndarray, canary: np.ndarray, *, higher_is_better: bool = True
) -> TestResult:
    """Rank test for heavy-tailed outcomes where a few extreme values would dominate Welch's t.

    Note it tests stochastic ordering, not the difference of means reported as ``effect``.
    """
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(canary, dtype=np.float64)
    mb, mc = _mean(b), _mean(c)
    effect = mc - mb
    stat, p = math.nan, 1.0
    if b.size >= 1 and c.size >= 1:
        res = sps.mannwhitneyu(c, b, alternative="two-sided")
        stat = float(res.statistic)
        p = float(res.pvalue) if math.isfinite(float(res.pvalue)) else 1.0
    return TestResult(
        "mann_whitney_u",
        stat,
        p,
        int(b.size),
        int(c.size),
        mb,
        mc,
        effect,
        direction_of(effect, higher_is_better),
    )


def classical_test(
    metric: str,
    baseline_values: np.ndarray,
    canary_values: np.ndarray,
    *,
    continuous: ContinuousTest = "welch",
    moments: tuple[ArmMoments, ArmMoments] | None = None,
) -> TestResult:
    """Pick the textbook fixed-horizon test for a metric, on values from ``per_request_values``.

    Loss metrics use Welch's t on per-request losses: the loss is a per-request mean like any other.
    For success_rate, ``moments`` (baseline, canary) may be passed to skip re-summing the arrays.
    """
    hib = higher_is_better(metric)
    if metric == "success_rate":
        if moments is None:
            moments = (ArmMoments.from_values(baseline_values), ArmMoments.from_values(canary_values))
        b, c = moments
        return two_proportion_test(round(b.total), b.n, round(c.total), c.n, higher_is_better=hib)
    if metric == "mean_outcome" and continuous == "mann_whitney":
        return mann_whitney_test(baseline_values, canary_values, higher_is_better=hib)
    if continuous not in ("welch", "mann_whitney"):
        raise ValueError(f"unknown continuous test {continuous!r}")
    return welch_t_test(baseline_values, canary_values, higher_is_better=hib)


@dataclass(frozen=True)
class MsprtResult:
    """One look of the mixture SPRT; ``statistic`` is log Λ_n and ``p_value`` = min(1, 1/Λ_n).

    ``p_value`` is this look's value only. The always-valid p-value of the whole sequence is the running
    minimum over looks (``always_valid_p_values``), which the caller carries between batches.
    """

    statistic: float
    p_value: float
    tau: float
    variance: float
    effect: float
    direction: Direction
    n_baseline: int
    n_canary: int
    mean_baseline: float
    mean_canary: float
    var_baseline: float
    var_canary: float

    def confidence_interval(self, alpha: float) -> tuple[float, float]:
        """Always-valid (1 - alpha) interval for the effect at this look (``msprt_confidence_interval``)."""
        return msprt_confidence_interval(self.effect, self.variance, self.tau, alpha)


def msprt_from_moments(
    baseline: ArmMoments, canary: ArmMoments, *, tau: float, higher_is_better: bool = True
) -> MsprtResult:
    """Two-sided mSPRT for mean_canary − mean_baseline with plug-in variances.

    θ̂ = mean_c − mean_b and V = var_b/n_b + var_c/n_c (unbiased per-arm sample variances), then
    log Λ from ``msprt_log_lr``. With fewer than two observations in an arm there is no variance
    estimate and the look carries no evidence (Λ = 1, p = 1). The guarantee is asymptotic (normal
    approximation, estimated variances), which is why the policy ignores looks below a minimum
    sample size; looking only after batches, not after every outcome, makes it slightly conservative.
    """
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError("tau must be a positive finite number")
    effect = canary.mean - baseline.mean
    if baseline.n >= 2 and canary.n >= 2:
        variance = baseline.var / baseline.n + canary.var / canary.n
        log_lr = msprt_log_lr(effect, variance, tau)
    else:
        variance, log_lr = math.nan, 0.0
    return MsprtResult(
        statistic=log_lr,
        p_value=msprt_p_value(log_lr),
        tau=float(tau),
        variance=variance,
        effect=effect,
        direction=direction_of(effect, higher_is_better),
        n_baseline=baseline.n,
        n_canary=canary.n,
        mean_baseline=baseline.mean,
        mean_canary=canary.mean,
        var_baseline=baseline.var,
        var_canary=canary.var,
    )


def msprt_test(
    baseline_values: np.ndarray, canary_values: np.ndarray, *, tau: float, higher_is_better: bool = True
) -> MsprtResult:
    """mSPRT straight from per-request values; identical arrays give identical results."""
    return msprt_from_moments(
        ArmMoments.from_values(baseline_values),
        ArmMoments.from_values(canary_values),
        tau=tau,
        higher_is_better=higher_is_better,
    )


def always_valid_p_values(look_p_values: np.ndarray) -> np.ndarray:
    """Running minimum of per-look mSPRT p-values: the always-valid p-value sequence (non-increasing)."""
    return np.minimum.accumulate(np.asarray(look_p_values, dtype=np.float64))
