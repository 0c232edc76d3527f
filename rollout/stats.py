"""Statistics the rollout decision uses: per-request metric values, outcome domains and the mixture
SPRTs (the normal-mixture mSPRT of Johari, Pekelis & Walsh (2017), its one-sided and point-mixture
forms, and the always-valid confidence interval).

Everything here is a pure function so that a stored decision can be recomputed exactly from the logged
rows. The policy that combines these (periods, guardrails, SRM) lives in ``rollout.decision``; the
textbook fixed-horizon tests that the controller does not use live in ``rollout.reference``.

Conventions: ``effect = mean_canary - mean_baseline`` in the metric's own units. For the loss metrics
("brier", "log_loss") lower is better, so a positive effect means the canary is *worse*; ``direction``
always speaks in terms of goodness ("worse" / "better"), never of sign.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.special import log_ndtr

MetricKind = Literal["success_rate", "mean_outcome", "brier", "log_loss"]
Direction = Literal["worse", "better", "none"]

METRICS: tuple[str, ...] = ("success_rate", "mean_outcome", "brier", "log_loss")
LOSS_METRICS: frozenset[str] = frozenset({"brier", "log_loss"})
# Scores are clipped before the logarithm so a confident wrong answer costs a large but finite loss; the
# value is part of the metric's definition and must not change, or logged decisions stop recomputing.
LOG_LOSS_EPS = 1e-15


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


def direction_of(effect: float, higher_is_better: bool = True) -> Direction:
    """Label the sign of the point estimate in goodness terms; significance is judged by the caller."""
    if not math.isfinite(effect) or effect == 0.0:
        return "none"
    good = effect > 0.0 if higher_is_better else effect < 0.0
    return "better" if good else "worse"


# --------------------------------------------------------------------------------------------------
# classical fixed-horizon tests


# --------------------------------------------------------------------------------------------------
# mSPRT: always-valid p-values


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
