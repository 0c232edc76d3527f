"""Statistics for canary analysis: per-request metrics, outcome domains, classical tests and mixture SPRTs.

Everything here is a pure function of per-arm samples so that a stored decision can be recomputed
exactly from the logged prediction/outcome rows. The rollout policy lives in ``rollout.decision``.

Two families of tests are provided on purpose:

* classical fixed-horizon tests (two-proportion z / Fisher exact, Welch t, Mann-Whitney U). Their
  p-values are only valid when looked at once, at a sample size fixed in advance. The controller records
  them as a reference (``naive_p_value``) and the simulator uses them to show what repeated peeking
  does to the false rollback rate.
* the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis & Walsh (2017), whose
  "always-valid" p-value may be computed after every batch without inflating the type I error. This
  is what the controller acts on.

Conventions: ``effect = mean_canary - mean_baseline`` in the metric's own units. For the loss metrics
("brier", "log_loss") lower is better, so a positive effect means the canary is *worse*; ``direction``
always speaks in terms of goodness ("worse" / "better"), never of sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as sps
from scipy.special import log_ndtr, ndtr

MetricKind = Literal["success_rate", "mean_outcome", "brier", "log_loss"]
Direction = Literal["worse", "better", "none"]
ContinuousTest = Literal["welch", "mann_whitney"]

METRICS: tuple[str, ...] = ("success_rate", "mean_outcome", "brier", "log_loss")
LOSS_METRICS: frozenset[str] = frozenset({"brier", "log_loss"})
# Scores are clipped before the logarithm so a confident wrong answer costs a large but finite loss; the
# value is part of the metric's definition and must not change, or logged decisions stop recomputing.
LOG_LOSS_EPS = 1e-15
# Below this many observed successes or failures in any arm the normal approximation of the z-test is
# poor, so the exact test is used instead.
FISHER_MIN_CELL = 5


# --------------------------------------------------------------------------------------------------
# metrics


def higher_is_better(metric: str) -> bool:
    """Losses are minimised, rates and outcomes maximised; every direction label depends on this."""
    _check_metric(metric)
    return metric not in LOSS_METRICS


def per_request_values(metric: str, outcomes: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Turn logged rows into the per-request quantity whose mean is compared between arms.

    brier = (score - outcome)^2; log_loss = -(y log p + (1 - y) log(1 - p)) with p clipped to
    [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]. success_rate insists on 0/1 outcomes because a stray value would
    silently turn a proportion into a different statistic.
    """
    _check_metric(metric)
    y = np.asarray(outcomes, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError("outcomes must be one-dimensional")
    if metric == "mean_outcome":
        return y
    if metric == "success_rate":
        if y.size and bool(((y != 0.0) & (y != 1.0)).any()):
            raise ValueError("success_rate needs binary outcomes (0 or 1)")
        return y
    if scores is None:
        raise ValueError(f"metric {metric!r} needs the predicted scores")
    p = np.asarray(scores, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"scores shape {p.shape} != outcomes shape {y.shape}")
    if metric == "brier":
        return (p - y) ** 2
    p = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


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


def direction_of(effect: float, higher_is_better: bool = True) -> Direction:
    """Label the sign of the point estimate in goodness terms; significance is judged by the caller."""
    if not math.isfinite(effect) or effect == 0.0:
        return "none"
    good = effect > 0.0 if higher_is_better else effect < 0.0
    return "better" if good else "worse"


# --------------------------------------------------------------------------------------------------
# classical fixed-horizon tests


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


# --------------------------------------------------------------------------------------------------
# mSPRT: always-valid p-values


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


def msprt_log_lr(effect: float, variance: float, tau: float) -> float:
    """log Λ for a normal estimate ``effect`` ~ N(θ, variance), H0: θ = 0, mixing prior θ ~ N(0, τ²).

    Derivation. Under the normal approximation the likelihood of θ given the estimate θ̂ is
    φ(θ̂; θ, V). Integrating over the prior gives the marginal φ(θ̂; 0, V + τ²), so

        Λ = φ(θ̂; 0, V + τ²) / φ(θ̂; 0, V)
          = sqrt(V / (V + τ²)) · exp(θ̂²/(2V) − θ̂²/(2(V + τ²)))
          = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²))).

    Computed in log space so large evidence does not overflow. V = 0 is the limit V → 0: infinite
    evidence if θ̂ ≠ 0, none if θ̂ = 0.
    """
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError("tau must be a positive finite number")
    if not (math.isfinite(effect) and math.isfinite(variance)) or variance < 0.0:
        return 0.0
    if variance == 0.0:
        return math.inf if effect != 0.0 else 0.0
    t2 = tau * tau
    shrink = 0.5 * math.log(variance / (variance + t2))
    return shrink + t2 * effect * effect / (2.0 * variance * (variance + t2))


def msprt_p_value(log_lr: float) -> float:
    """Single-look p-value min(1, 1/Λ); by Ville's inequality P(sup_n Λ_n ≥ 1/α) ≤ α under H0."""
    if log_lr <= 0.0:
        return 1.0
    return math.exp(-log_lr)


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


def msprt_confidence_interval(
    effect: float, variance: float, tau: float, alpha: float
) -> tuple[float, float]:
    """Always-valid CI: all θ0 the mSPRT of H0: θ = θ0 would not reject, i.e. Λ_n(θ0) < 1/α.

    Solving sqrt(V/(V+τ²)) · exp(τ²(θ̂−θ0)²/(2V(V+τ²))) < 1/α for θ0 gives
    θ̂ ± sqrt(2 V (V + τ²)/τ² · (log(1/α) + ½ log((V + τ²)/V))). The running intersection over
    looks covers θ with probability ≥ 1 − α at all times, which is what licenses acting on it.
    """
    if not (math.isfinite(effect) and math.isfinite(variance)) or variance < 0.0:
        return (-math.inf, math.inf)
    if variance == 0.0:
        return (effect, effect)
    t2 = tau * tau
    threshold = math.log(1.0 / alpha) + 0.5 * math.log((variance + t2) / variance)
    half = math.sqrt(2.0 * variance * (variance + t2) / t2 * threshold)
    return (effect - half, effect + half)


def always_valid_p_values(look_p_values: np.ndarray) -> np.ndarray:
    """Running minimum of per-look mSPRT p-values: the always-valid p-value sequence (non-increasing)."""
    return np.minimum.accumulate(np.asarray(look_p_values, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# outcome domains


def check_outcome(metric: str, value: float) -> None:
    """Refuse an outcome outside the metric's domain before it is stored (RecordOutcome calls this).

    success_rate, brier and log_loss compare against a binary label, so only 0 and 1 are meaningful;
    mean_outcome takes any finite number. The message names the field so the API can answer
    INVALID_ARGUMENT with it. The analysis also skips such rows (``outcome_in_domain``), so an old row
    stored before this check can never make a look raise.
    """
    _check_metric(metric)
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"value: must be a finite number, got {value!r}")
    if metric != "mean_outcome" and v not in (0.0, 1.0):
        raise ValueError(f"value: metric {metric!r} takes binary outcomes (0 or 1), got {value!r}")


def outcome_in_domain(metric: str, values: np.ndarray) -> np.ndarray:
    """Vectorised ``check_outcome``: True where the value may enter the analysis."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if metric != "mean_outcome":
        ok &= (v == 0.0) | (v == 1.0)
    return ok


# --------------------------------------------------------------------------------------------------
# one-sided mixture SPRT


def msprt_one_sided_log_lr(effect: float, variance: float, tau: float,
                           side: Literal["less", "greater"]) -> float:
    """log Λ of the one-sided mixture SPRT: prior θ ~ N(0, τ²) truncated to θ < 0 ("less") or θ > 0.

    Integrating the normal likelihood over the half-normal prior (density 2φ on one side) gives
    Λ⁻ = 2 · Λ · Φ(∓ θ̂ τ / sqrt(V (V + τ²))) with Λ the two-sided ratio of ``msprt_log_lr``. It is a
    nonnegative martingale under θ = 0 (and a supermartingale for θ on the other side), so Ville's
    inequality gives P(sup Λ⁻ ≥ 1/α) ≤ α; all its evidence goes to one direction, which buys roughly
    a factor 2 in α against the two-sided test at the same false-alarm rate.
    """
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError("tau must be a positive finite number")
    if not (math.isfinite(effect) and math.isfinite(variance)) or variance < 0.0:
        return 0.0
    sign = -1.0 if side == "less" else 1.0
    if variance == 0.0:
        return math.inf if sign * effect > 0.0 else 0.0
    t2 = tau * tau
    two = msprt_log_lr(effect, variance, tau)
    arg = sign * effect * tau / math.sqrt(variance * (variance + t2))
    return math.log(2.0) + two + float(log_ndtr(arg))


def msprt_point_mixture_log_lr(effect: float, variance: float, tau: float, side: Literal["less", "greater"],
                               point_weight: float) -> float:
    """log Λ for a prior that puts ``point_weight`` on the effect ∓τ itself and the rest on the
    half-normal mixture (``msprt_one_sided_log_lr``).

    The point part is Wald's SPRT for H1: θ = ∓τ, log Λ = (θ1 θ̂ − θ1²/2)/V, the fastest test for an
    effect of exactly the size worth catching; the half-normal part keeps the test consistent against
    any other effect on that side. A mixture of likelihood ratios is still a nonnegative martingale
    under θ = 0, so Ville's inequality holds as for the plain mixture.
    """
    half = msprt_one_sided_log_lr(effect, variance, tau, side)
    if point_weight <= 0.0:
        return half
    if not (math.isfinite(effect) and math.isfinite(variance)) or variance <= 0.0:
        return half
    theta1 = -tau if side == "less" else tau
    point = (theta1 * effect - 0.5 * theta1 * theta1) / variance
    if point_weight >= 1.0:
        return point
    return float(np.logaddexp(math.log(point_weight) + point, math.log1p(-point_weight) + half))

# --------------------------------------------------------------------------------------------------
# helpers


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _mean(x: np.ndarray) -> float:
    return float(np.sum(x)) / x.size if x.size else math.nan
