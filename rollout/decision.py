"""Canary rollout decision policy: one pure ``look`` that the controller, the simulator and an auditor run.

``look(policy, data, state)`` takes the look data of ``rollout.lookdata.LookBuilder`` (per split period:
assignment units, requests, errors, latencies, matured outcomes) and the ``SequentialState`` of the
previous look, and returns the verdict with every statistic and the next state. Rules, in order:

1. Guardrails (sequential tests, own share of the error budget). The error guardrail (failed or
   failed-over requests, counted against the version they were routed to) or the latency guardrail
   (share of requests slower than the baseline's p99 of the period; variance over time windows, since
   slow requests come in bursts) says the canary is worse by more
   than its margin: rollback at once, at any sample size, with or without outcomes.
2. Sample-ratio mismatch, a difference in outcome coverage between arms, or (covariate adjustment on,
   ``rollout.covariate``) a covariate imbalance between arms: hold, never promote. The
   randomisation is broken, so no comparison of the arms can be trusted; the decision is stored with
   the SRM statistic and an operator must look.
3. Below ``min_samples_per_arm`` matured outcomes in either arm (or, for winsorised metrics, before the
   winsor limits are fixed): hold.
4. One-sided always-valid p-value "worse" ≤ the primary alpha: rollback.
5. One-sided always-valid p-value "better" ≤ ``promote_alpha`` (half the primary alpha by default), or
   the non-inferiority bound holds (the lower side of the always-valid interval at 2·promote_alpha):
   step up to the next step, or promote from the last; at most one step per
   ``min_canary_samples_per_step`` new canary outcomes.
6. Otherwise hold.

Error budget. ``alpha`` is the total false-rollback budget of an A/A canary: the primary metric's
"worse" test gets ``alpha − 2·guardrail_alpha`` and each guardrail ``guardrail_alpha`` (default alpha/50;
Bonferroni over always-valid p-values, so the sum holds at every look). The "better" test has its own
``promote_alpha``, which bounds false promotions of a canary that is not better; with a
non-inferiority margin, a canary worse than the margin can also pass the bound, at most about
``promote_alpha`` more (docs/statistics.md, "The error budget"). SRM and coverage checks only ever
hold, so their ``srm_alpha`` buys no rollback and is not part of the budget.

Every p-value is the running minimum of a mixture-SPRT p-value (Ville's inequality), on a statistic
that combines the split periods by inverse-variance weights with cluster-robust (per routing key)
variances: see docs/statistics.md for the assumptions and the simulations that check them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from chimera.jsonsafe import nan_to_none
from rollout.checks import GuardrailResult, coverage_check, proportion_guardrail, srm_check
from rollout.lookdata import BASELINE, CANARY, MIN_PERIOD_KEYS, MIN_PERIOD_OUTCOMES, ROBUST_METRICS, LookData
from rollout.policy import RolloutPolicy
from rollout.stats import (
    Direction,
    direction_of,
    msprt_confidence_interval,
    msprt_p_value,
    msprt_point_mixture_log_lr,
)

Action = Literal["rollback", "step_up", "promote", "hold"]


@dataclass(frozen=True)
class SequentialState:
    """What the controller carries between looks; JSON-able (the previous decision row stores it)."""

    looks: int = 0
    p_worse: float = 1.0
    p_better: float = 1.0
    p_errors: float = 1.0
    p_latency: float = 1.0
    p_srm: float = 1.0
    p_coverage: float = 1.0
    improvement_lower_bound: float = -math.inf
    canary_n_at_last_step: int = 0
    winsor: tuple[float, float] | None = None
    latency_thresholds: dict[str, float] = field(default_factory=dict)
    covariate: dict[str, Any] | None = None  # CUPED: θ, c, sd of x, fixed once (rollout.covariate)
    p_balance: float = 1.0  # covariate balance between arms (held like an SRM below srm_alpha)

    def to_dict(self) -> dict[str, Any]:
        """Store -inf as None so the state survives strict JSON."""
        return nan_to_none(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequentialState:
        """Inverse of ``to_dict``, for a controller that restarts mid-rollout."""
        lb = data.get("improvement_lower_bound")
        w = data.get("winsor")

        def p(key: str) -> float:
            v = data.get(key)
            return 1.0 if v is None else float(v)

        return cls(
            looks=int(data.get("looks", 0)),
            p_worse=p("p_worse"), p_better=p("p_better"), p_errors=p("p_errors"),
            p_latency=p("p_latency"), p_srm=p("p_srm"), p_coverage=p("p_coverage"),
            improvement_lower_bound=-math.inf if lb is None else float(lb),
            canary_n_at_last_step=int(data.get("canary_n_at_last_step", 0)),
            winsor=(float(w[0]), float(w[1])) if w else None,
            latency_thresholds={str(k): float(v) for k, v in (data.get("latency_thresholds") or {}).items()},
            covariate=data.get("covariate"), p_balance=p("p_balance"),
        )


@dataclass(frozen=True)
class Decision:
    """One verdict with everything needed to audit and recompute it (see module docstring).

    ``p_value`` is the always-valid p-value behind the verdict: the guardrail's for a guardrail rollback,
    ``p_value_worse`` for a statistical rollback, ``p_value_better`` for a step-up, otherwise the
    smaller of the two. ``periods`` holds the per-period counts and estimates.
    """

    action: Action
    current_weight: int
    next_weight: int
    metric: str
    higher_is_better: bool
    test: str
    statistic: float
    p_value: float
    p_value_worse: float
    p_value_better: float
    p_value_look: float
    n_baseline: int
    n_canary: int
    mean_baseline: float
    mean_canary: float
    effect: float
    variance: float
    direction: Direction
    ci_low: float
    ci_high: float
    improvement_lower_bound: float
    tau: float
    alpha: float
    primary_alpha: float
    min_samples_per_arm: int
    look: int
    canary_n_at_last_step: int
    guardrail: str | None
    guardrails: tuple[GuardrailResult, ...]
    p_errors: float
    p_latency: float
    srm: bool
    p_srm: float
    srm_statistic: float
    p_coverage: float
    coverage: tuple[float, float]
    periods: tuple[dict[str, Any], ...]
    winsor: tuple[float, float] | None
    skipped_outcomes: int
    reason: str = ""
    covariate: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        """Rollback and promote end the canary; the controller stops looking after them."""
        return self.action in ("rollback", "promote")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the decisions table; non-finite floats become None."""
        return nan_to_none(asdict(self))


# ------------------------------------------------------------------------------------------ look


def look(
    policy: RolloutPolicy, data: LookData, state: SequentialState | None = None
) -> tuple[Decision, SequentialState]:
    """Judge the canary on the look data; returns the verdict and the state for the next look.

    Pass ``state=None`` for the first look of a new canary, then always the state returned last time.
    """
    prev = state if state is not None else SequentialState()
    hib = policy.higher_is_better
    tau = policy.resolved_tau
    a_primary = policy.primary_alpha
    weight = data.current_weight

    err, p_err = proportion_guardrail(
        "error_rate", [(p.errors[0], p.requests[0], p.errors[1], p.requests[1]) for p in data.periods],
        policy.max_error_rate_delta, policy.error_tau, prev.p_errors, policy.resolved_guardrail_alpha,
        "error rate", [(p.error_windows, p.error_window_var) for p in data.periods] if policy.error_windows
        else None)
    lat, p_lat = proportion_guardrail(
        "latency", [(p.slow[0], p.latency_n[0], p.slow[1], p.latency_n[1]) for p in data.periods],
        policy.max_slow_share_delta, policy.latency_tau, prev.p_latency, policy.resolved_guardrail_alpha,
        f"share slower than the baseline's p{policy.latency_quantile * 100:g}",
        [(p.latency_windows, p.latency_window_var) for p in data.periods], policy.latency_min_windows)
    p_srm, _, srm_stat = srm_check(data, policy, prev.p_srm)
    p_cov, coverage = coverage_check(data, policy, prev.p_coverage)
    cov_rec = data.covariate
    p_bal = min(prev.p_balance, cov_rec["p_balance_look"]) if cov_rec else prev.p_balance
    srm = p_srm <= policy.srm_alpha or p_cov <= policy.srm_alpha or p_bal <= policy.srm_alpha

    n_b, n_c = data.n
    effect, var = data.effect, data.variance
    # Binary outcomes: the normal approximation needs events, not only rows. Require, in the smaller
    # arm, min_expected_events successes and failures at the pooled rate (the rate under "no effect",
    # so the rule does not look at which arm is ahead): a rare rate waits for more outcomes.
    pooled = (data.mean[BASELINE] * n_b + data.mean[CANARY] * n_c) / (n_b + n_c) if n_b and n_c else math.nan
    events_ok = policy.metric != "success_rate" or (
        math.isfinite(pooled)
        and min(pooled, 1.0 - pooled) * min(n_b, n_c) >= policy.min_expected_events)
    # The minimum counts the outcomes the estimate is made of: those of periods that enter it (a period
    # with fewer than 30 outcomes, or too few keys, in an arm is reported but not used).
    used_b = sum(p.outcomes[BASELINE] for p in data.periods if p.included)
    used_c = sum(p.outcomes[CANARY] for p in data.periods if p.included)
    ready = (used_b >= policy.min_samples_per_arm and used_c >= policy.min_samples_per_arm and events_ok
             and math.isfinite(effect) and math.isfinite(var)
             and (policy.metric not in ROBUST_METRICS or policy.winsor_quantile is None
                  or data.winsor is not None))
    worse_side = "less" if hib else "greater"
    better_side = "greater" if hib else "less"
    p_worse, p_better, lb, looks = prev.p_worse, prev.p_better, prev.improvement_lower_bound, prev.looks
    p_look, statistic, ci = 1.0, 0.0, (-math.inf, math.inf)
    if ready:
        llr_w = msprt_point_mixture_log_lr(effect, var, tau, worse_side, policy.point_mass)
        llr_b = msprt_point_mixture_log_lr(effect, var, tau, better_side, policy.point_mass)
        pw, pb = msprt_p_value(llr_w), msprt_p_value(llr_b)
        p_worse, p_better = min(p_worse, pw), min(p_better, pb)
        statistic = max(llr_w, llr_b)
        p_look = min(pw, pb)
        ci = msprt_confidence_interval(effect, var, tau, a_primary)
        # The non-inferiority route promotes, so its bound spends the promotion budget: one side of the
        # two-sided always-valid interval at 2·promote_alpha (the reported interval by default).
        a_ni = 2.0 * policy.resolved_promote_alpha
        ci_ni = ci if math.isclose(a_ni, a_primary) else msprt_confidence_interval(effect, var, tau, a_ni)
        lb = max(lb, ci_ni[0] if hib else -ci_ni[1])
        looks += 1

    new = SequentialState(looks, p_worse, p_better, p_err, p_lat, p_srm, p_cov, lb,
                          prev.canary_n_at_last_step, data.winsor, dict(data.latency_thresholds),
                          {**cov_rec, "p_balance": p_bal} if cov_rec else prev.covariate, p_bal)
    action, next_w, reason, guard, verdict_p = _rules(policy, err, lat, srm, p_srm, min(p_cov, p_bal), ready,
                                                      new, n_b, n_c, weight)
    if action in ("step_up", "promote"):
        new = SequentialState(**{**new.__dict__, "canary_n_at_last_step": n_c})
    decision = Decision(
        action=action, current_weight=int(weight), next_weight=next_w, metric=policy.metric,
        higher_is_better=hib, test="msprt_stratified", statistic=statistic, p_value=verdict_p,
        p_value_worse=p_worse, p_value_better=p_better, p_value_look=p_look, n_baseline=n_b, n_canary=n_c,
        mean_baseline=data.mean[BASELINE], mean_canary=data.mean[CANARY], effect=effect, variance=var,
        direction=direction_of(effect, hib), ci_low=ci[0], ci_high=ci[1], improvement_lower_bound=lb,
        tau=tau, alpha=policy.alpha, primary_alpha=a_primary, min_samples_per_arm=policy.min_samples_per_arm,
        look=new.looks, canary_n_at_last_step=new.canary_n_at_last_step, guardrail=guard,
        guardrails=(err, lat), p_errors=p_err, p_latency=p_lat, srm=srm, p_srm=p_srm,
        srm_statistic=srm_stat, p_coverage=p_cov,
        coverage=coverage, periods=tuple(p.to_dict() for p in data.periods), winsor=data.winsor,
        skipped_outcomes=data.skipped_outcomes, reason=reason, covariate=new.covariate)
    return decision, new


def _rules(
    policy: RolloutPolicy, err: GuardrailResult, lat: GuardrailResult, srm: bool, p_srm: float,
    p_cov: float, ready: bool, st: SequentialState, n_b: int, n_c: int, weight: int,
) -> tuple[Action, int, str, str | None, float]:
    breached = [g for g in (err, lat) if g.breached]
    if breached:
        g = breached[0]
        return ("rollback", 0, "guardrail breached: " + "; ".join(b.reason for b in breached), g.name,
                g.p_value)
    best = min(st.p_worse, st.p_better)
    if srm:
        return ("hold", weight,
                f"sample-ratio mismatch: assignment always-valid p={p_srm:.3g}, outcome coverage "
                f"(or covariate balance) p={p_cov:.3g} (srm_alpha={policy.srm_alpha}); the arms are not "
                f"comparable, not deciding",
                None, min(p_srm, p_cov))
    if not ready:
        return ("hold", weight, f"collecting: {n_b} baseline / {n_c} canary matured outcomes, need "
                f"{policy.min_samples_per_arm} per arm in periods with {MIN_PERIOD_OUTCOMES} outcomes from "
                f"{MIN_PERIOD_KEYS} keys in each arm (and {policy.min_expected_events:g} expected "
                f"successes and failures per arm for a rate)", None, best)
    a = policy.primary_alpha
    if st.p_worse <= a:
        return ("rollback", 0, f"canary worse: always-valid p={st.p_worse:.4g} <= alpha={a:g}", None,
                st.p_worse)
    margin = policy.non_inferiority_margin
    a = policy.resolved_promote_alpha
    better = st.p_better <= a
    non_inferior = margin is not None and st.improvement_lower_bound >= -margin
    if better or non_inferior:
        why = (f"canary better: always-valid p={st.p_better:.4g} <= alpha={a:g}" if better
               else f"canary non-inferior: always-valid lower bound on improvement "
                    f"{st.improvement_lower_bound:.4g} >= -{margin}")
        fresh = n_c - st.canary_n_at_last_step
        if fresh < policy.min_canary_samples_per_step:
            return ("hold", weight, f"{why}; waiting for {policy.min_canary_samples_per_step} new canary "
                    f"outcomes since the last step (have {fresh})", None, st.p_better)
        nxt = policy.next_weight(weight)
        if nxt >= policy.steps[-1]:
            return "promote", policy.steps[-1], f"{why}; promoting", None, st.p_better
        return "step_up", nxt, f"{why}; stepping {weight}% -> {nxt}%", None, st.p_better
    return ("hold", weight, f"no significant difference yet: p_worse={st.p_worse:.4g}, "
            f"p_better={st.p_better:.4g}, alpha={a:g}", None, best)
