"""Canary rollout decision policy: pure, so the controller, the simulator and an auditor run the same code.

The controller calls ``decide`` after every batch of new outcomes with *all* data so far for both arms
and the ``SequentialState`` returned by the previous call. Rules, in order:

1. A guardrail breach (error rate or p99 latency) rolls back at once, even below the minimum sample
   size: a crashing or slow canary must not wait for outcome statistics.
2. Below ``min_samples_per_arm`` outcomes in either arm: hold. The normal approximation behind the
   mSPRT needs some data, and looks before that point are not counted.
3. Always-valid p-value in the "worse" direction ≤ alpha: rollback.
4. Always-valid p-value in the "better" direction ≤ alpha: step up to the next step of ``steps``, or
   promote when that step is the last (100 %). At most one step per ``min_canary_samples_per_step`` new
   canary outcomes, so every weight gets its own guardrail evidence before the next one.
5. Otherwise hold.

Why per-direction running minima. A plain always-valid p-value stops the experiment the first time it
crosses alpha. Here "better" does not stop anything: the canary steps up and is still watched. So the
state keeps two running minima, one over looks whose estimate pointed "worse" and one over looks that
pointed "better". Under H0 the chance that either ever reaches alpha is ≤ alpha (Ville's inequality
on the two-sided mixture); when the canary is truly better, the chance of ever concluding "worse" is
smaller still (a better canary shifts the estimate away from the worse side). So the later rollback
check keeps its guarantee after a step-up.

Ties (no significant difference). Default: hold, and let an operator decide — the policy never ships a
model without evidence. Optionally set ``non_inferiority_margin``: then the canary also steps up once the
running always-valid confidence interval shows it is at most ``margin`` worse than baseline. That
interval covers the true effect at all looks with probability ≥ 1 − alpha, so a canary that is really
worse than the margin is stepped up with probability ≤ alpha. This is the principled version of "after
enough samples without a significant regression, treat it as not worse": the sample size at which that
happens is derived from the data instead of fixed in advance.

Recomputing a stored decision. Take the logged rows of both arms as of that decision, compute the
per-request values (``rollout.stats.per_request_values``) and ``msprt_test(..., tau=decision.tau)``: that
reproduces ``statistic`` (log Λ) and ``p_value_look`` exactly. ``p_value_worse`` / ``p_value_better`` are
the running minima of ``p_value_look`` over the stored decisions of this canary (those at or above the
minimum sample size) whose ``direction`` was worse / better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from rollout.stats import (
    METRICS,
    ArmMoments,
    ContinuousTest,
    Direction,
    GuardrailResult,
    MsprtResult,
    TestResult,
    classical_test,
    error_rate_guardrail,
    higher_is_better,
    latency_guardrail,
    msprt_from_moments,
    per_request_values,
)

Action = Literal["rollback", "step_up", "promote", "hold"]
Procedure = Literal["msprt", "naive_fixed_horizon"]

# Default mixing scale τ in the metric's own units: roughly the smallest effect worth catching. The
# mSPRT has most power for effects of about this size. mean_outcome has no natural scale, so it has no
# default and the policy refuses to guess.
DEFAULT_TAU: dict[str, float] = {"success_rate": 0.05, "brier": 0.02, "log_loss": 0.05}


@dataclass(frozen=True)
class RolloutPolicy:
    """How a canary is judged. ``procedure="naive_fixed_horizon"`` exists only to show, in simulation,
    why production must use the mSPRT: it applies the classical test at every look and so inflates
    false rollbacks.
    """

    metric: str = "success_rate"
    alpha: float = 0.05
    min_samples_per_arm: int = 200
    steps: tuple[int, ...] = (5, 10, 25, 50, 100)
    tau: float | None = None
    max_error_rate_delta: float = 0.01
    guardrail_alpha: float = 0.001
    max_p99_ratio: float = 1.5
    min_latency_requests: int = 100
    min_canary_samples_per_step: int = 200
    non_inferiority_margin: float | None = None
    continuous_test: ContinuousTest = "welch"
    procedure: Procedure = "msprt"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.min_samples_per_arm < 2:
            raise ValueError("min_samples_per_arm must be at least 2 (a variance needs two values)")
        steps = tuple(int(s) for s in self.steps)
        if not steps or steps[-1] != 100 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("steps must be strictly increasing and end at 100")
        if steps[0] <= 0:
            raise ValueError("steps must be positive")
        object.__setattr__(self, "steps", steps)
        if self.tau is None and self.metric not in DEFAULT_TAU:
            raise ValueError(f"metric {self.metric!r} has no natural scale: set tau (in outcome units)")
        if self.tau is not None and not (self.tau > 0.0 and math.isfinite(self.tau)):
            raise ValueError("tau must be positive")
        if self.non_inferiority_margin is not None and self.non_inferiority_margin < 0.0:
            raise ValueError("non_inferiority_margin must be >= 0")
        if self.procedure not in ("msprt", "naive_fixed_horizon"):
            raise ValueError(f"unknown procedure {self.procedure!r}")
        if self.continuous_test not in ("welch", "mann_whitney"):
            raise ValueError(f"unknown continuous test {self.continuous_test!r}")

    @property
    def higher_is_better(self) -> bool:
        """Derived from the metric so a loss can never be configured the wrong way round."""
        return higher_is_better(self.metric)

    @property
    def resolved_tau(self) -> float:
        """The τ actually used; stored in every decision so recomputation does not depend on defaults."""
        return float(self.tau) if self.tau is not None else DEFAULT_TAU[self.metric]

    def next_weight(self, current_weight: int) -> int:
        """Smallest step above the current weight; 100 when the canary is already at or past the last step."""
        for s in self.steps:
            if s > current_weight:
                return s
        return self.steps[-1]


@dataclass(frozen=True, eq=False)
class ArmData:
    """Everything logged for one arm (baseline or canary) since the canary started.

    ``scores`` is needed for brier/log_loss. ``requests``/``errors`` count all requests routed to the
    arm (outcomes arrive for only some of them); ``p99_latency_s`` is NaN when unknown.
    """

    outcomes: np.ndarray
    scores: np.ndarray | None = None
    requests: int = 0
    errors: int = 0
    p99_latency_s: float = math.nan

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcomes", np.asarray(self.outcomes, dtype=np.float64))
        if self.scores is not None:
            object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float64))


@dataclass(frozen=True)
class SequentialState:
    """What the controller carries between looks; JSON-able, and rebuildable from the last Decision."""

    looks: int = 0
    p_worse: float = 1.0
    p_better: float = 1.0
    improvement_lower_bound: float = -math.inf
    canary_n_at_last_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Store -inf as None so the state survives strict JSON."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequentialState:
        """Inverse of ``to_dict``, for a controller that restarts mid-rollout."""
        lb = data.get("improvement_lower_bound")
        return cls(
            looks=int(data.get("looks", 0)),
            p_worse=float(data.get("p_worse", 1.0)),
            p_better=float(data.get("p_better", 1.0)),
            improvement_lower_bound=-math.inf if lb is None else float(lb),
            canary_n_at_last_step=int(data.get("canary_n_at_last_step", 0)),
        )

    @classmethod
    def from_decision(cls, decision: Decision) -> SequentialState:
        """Resume from the stored decisions alone, without a separate state table."""
        return cls(
            looks=decision.look,
            p_worse=decision.p_value_worse,
            p_better=decision.p_value_better,
            improvement_lower_bound=decision.improvement_lower_bound,
            canary_n_at_last_step=decision.canary_n_at_last_step,
        )


@dataclass(frozen=True)
class Decision:
    """One verdict with everything needed to audit and recompute it (see module docstring).

    ``p_value`` is the always-valid p-value behind the verdict under the msprt procedure: the running
    minimum in the "worse" direction for a statistical rollback, in the "better" direction for a step-up,
    otherwise the smaller of the two. Under the naive procedure it is just this look's classical p-value.
    ``improvement_lower_bound`` is the running always-valid lower confidence bound on the improvement
    (canary − baseline, sign-flipped for losses so positive is always good).
    """

    action: Action
    current_weight: int
    next_weight: int
    metric: str
    procedure: str
    higher_is_better: bool
    test: str
    statistic: float
    p_value: float
    p_value_worse: float
    p_value_better: float
    p_value_look: float
    naive_test: str
    naive_statistic: float
    naive_p_value: float
    n_baseline: int
    n_canary: int
    mean_baseline: float
    mean_canary: float
    var_baseline: float
    var_canary: float
    effect: float
    direction: Direction
    ci_low: float
    ci_high: float
    improvement_lower_bound: float
    tau: float
    alpha: float
    min_samples_per_arm: int
    look: int
    canary_n_at_last_step: int
    guardrail: str | None
    guardrails: tuple[GuardrailResult, ...] = field(default_factory=tuple)
    reason: str = ""

    @property
    def terminal(self) -> bool:
        """Rollback and promote end the canary; the controller stops looking after them."""
        return self.action in ("rollback", "promote")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the decisions table; non-finite floats become None."""
        return _jsonable(asdict(self))


def decide(
    policy: RolloutPolicy,
    baseline: ArmData,
    canary: ArmData,
    current_canary_weight: int,
    state: SequentialState | None = None,
) -> tuple[Decision, SequentialState]:
    """Judge the canary on all data so far; returns the verdict and the state for the next call.

    Pass ``state=None`` for the first look of a new canary, then always the state returned last time.
    """
    prev = state if state is not None else SequentialState()
    hib = policy.higher_is_better
    tau = policy.resolved_tau
    vb = per_request_values(policy.metric, baseline.outcomes, baseline.scores)
    vc = per_request_values(policy.metric, canary.outcomes, canary.scores)
    binary = policy.metric == "success_rate"
    mb, mc = ArmMoments.from_values(vb, binary=binary), ArmMoments.from_values(vc, binary=binary)
    seq = msprt_from_moments(mb, mc, tau=tau, higher_is_better=hib)
    naive = classical_test(
        policy.metric, vb, vc, continuous=policy.continuous_test, moments=(mb, mc) if binary else None
    )
    ci_low, ci_high = seq.confidence_interval(policy.alpha)
    look_lower = ci_low if hib else -ci_high

    guards = (
        error_rate_guardrail(
            baseline.errors,
            baseline.requests,
            canary.errors,
            canary.requests,
            max_delta=policy.max_error_rate_delta,
            alpha=policy.guardrail_alpha,
        ),
        latency_guardrail(
            baseline.p99_latency_s,
            canary.p99_latency_s,
            max_ratio=policy.max_p99_ratio,
            requests_c=canary.requests,
            min_requests=policy.min_latency_requests,
        ),
    )

    enough = mb.n >= policy.min_samples_per_arm and mc.n >= policy.min_samples_per_arm
    new = prev
    if enough:
        new = _update_state(policy, prev, seq, naive, look_lower)

    action, next_w, reason, guard_name = _rules(policy, guards, enough, new, mb, mc, current_canary_weight)
    if action in ("step_up", "promote"):
        new = SequentialState(new.looks, new.p_worse, new.p_better, new.improvement_lower_bound, mc.n)

    msprt_mode = policy.procedure == "msprt"
    decision = Decision(
        action=action,
        current_weight=int(current_canary_weight),
        next_weight=next_w,
        metric=policy.metric,
        procedure=policy.procedure,
        higher_is_better=hib,
        test="msprt" if msprt_mode else naive.test,
        statistic=seq.statistic if msprt_mode else naive.statistic,
        p_value=_verdict_p(policy, new, guard_name) if msprt_mode else naive.p_value,
        p_value_worse=new.p_worse,
        p_value_better=new.p_better,
        p_value_look=seq.p_value,
        naive_test=naive.test,
        naive_statistic=naive.statistic,
        naive_p_value=naive.p_value,
        n_baseline=mb.n,
        n_canary=mc.n,
        mean_baseline=mb.mean,
        mean_canary=mc.mean,
        var_baseline=mb.var,
        var_canary=mc.var,
        effect=seq.effect,
        direction=seq.direction,
        ci_low=ci_low,
        ci_high=ci_high,
        improvement_lower_bound=new.improvement_lower_bound,
        tau=tau,
        alpha=policy.alpha,
        min_samples_per_arm=policy.min_samples_per_arm,
        look=new.looks,
        canary_n_at_last_step=new.canary_n_at_last_step,
        guardrail=guard_name,
        guardrails=guards,
        reason=reason,
    )
    return decision, new


def _verdict_p(policy: RolloutPolicy, st: SequentialState, guard_name: str | None) -> float:
    # The p-value that justified the verdict: a rollback for "worse" must not quote an older, smaller
    # p-value from the "better" direction (possible after a step-up).
    if guard_name is None and st.p_worse <= policy.alpha:
        return st.p_worse
    if guard_name is None and st.p_better <= policy.alpha:
        return st.p_better
    return min(st.p_worse, st.p_better)


def _update_state(
    policy: RolloutPolicy, prev: SequentialState, seq: MsprtResult, naive: TestResult, look_lower: float
) -> SequentialState:
    if policy.procedure == "msprt":
        p_worse = min(prev.p_worse, seq.p_value) if seq.direction == "worse" else prev.p_worse
        p_better = min(prev.p_better, seq.p_value) if seq.direction == "better" else prev.p_better
    else:
        # The naive procedure has no memory: each look is judged as if it were the planned final one.
        p_worse = naive.p_value if naive.direction == "worse" else 1.0
        p_better = naive.p_value if naive.direction == "better" else 1.0
    return SequentialState(
        looks=prev.looks + 1,
        p_worse=p_worse,
        p_better=p_better,
        improvement_lower_bound=max(prev.improvement_lower_bound, look_lower),
        canary_n_at_last_step=prev.canary_n_at_last_step,
    )


def _rules(
    policy: RolloutPolicy,
    guards: tuple[GuardrailResult, ...],
    enough: bool,
    st: SequentialState,
    mb: ArmMoments,
    mc: ArmMoments,
    weight: int,
) -> tuple[Action, int, str, str | None]:
    breached = [g for g in guards if g.breached]
    if breached:
        return "rollback", 0, "guardrail breached: " + "; ".join(g.reason for g in breached), breached[0].name
    if not enough:
        return (
            "hold",
            weight,
            f"collecting: {mb.n} baseline / {mc.n} canary outcomes, "
            f"need {policy.min_samples_per_arm} per arm",
            None,
        )
    a = policy.alpha
    label = "always-valid p" if policy.procedure == "msprt" else "fixed-horizon p"
    if st.p_worse <= a:
        return "rollback", 0, f"canary worse: {label}={st.p_worse:.4g} <= alpha={a}", None
    margin = policy.non_inferiority_margin
    better = st.p_better <= a
    non_inferior = margin is not None and st.improvement_lower_bound >= -margin
    if better or non_inferior:
        why = (
            f"canary better: {label}={st.p_better:.4g} <= alpha={a}"
            if better
            else f"canary non-inferior: always-valid lower bound on improvement "
            f"{st.improvement_lower_bound:.4g} >= -{margin}"
        )
        fresh = mc.n - st.canary_n_at_last_step
        if fresh < policy.min_canary_samples_per_step:
            return (
                "hold",
                weight,
                f"{why}; waiting for {policy.min_canary_samples_per_step} new canary outcomes since the last "
                f"step (have {fresh})",
                None,
            )
        nxt = policy.next_weight(weight)
        if nxt >= policy.steps[-1]:
            return "promote", policy.steps[-1], f"{why}; promoting", None
        return "step_up", nxt, f"{why}; stepping {weight}% -> {nxt}%", None
    return (
        "hold",
        weight,
        f"no significant difference yet: p_worse={st.p_worse:.4g}, p_better={st.p_better:.4g}, alpha={a}",
        None,
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj
