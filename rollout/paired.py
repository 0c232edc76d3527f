"""Paired sequential evaluation of a shadow version on the rows another version served.

A shadow version scores live requests without answering them; once a row's outcome arrives, the row
gives one *paired* comparison: the same request, the same outcome, two scores. For a quality metric
that depends only on the score and the outcome (Brier, log-loss) the per-row loss difference

    d_i = loss(shadow_i, y_i) − loss(served_i, y_i)          (positive: the shadow is worse on row i)

has mean δ, the shadow's loss minus the served version's. Everything that makes rows differ (easy and
hard requests, a base rate that drifts, a traffic mix that changes) hits both losses of a row alike and
cancels in d_i, so its variance is far smaller than a loss's own, and every row is evidence, where a
10 % canary puts one row in ten on the new version. That is why a paired test needs a fraction of the
outcomes a split needs (docs/statistics.md, the measured factor).

Two one-sided decisions, each an always-valid mixture SPRT of ``rollout.stats`` (the same footing as the
canary's primary metric, running minimum of the p-value over looks, Ville's inequality):

* **worse**: H0 δ ≤ 0 against δ > 0. Prior: ``point_mass`` on δ = +τ (Wald's SPRT for the effect worth
  catching), the rest half-normal of scale τ. An equal shadow is called worse with probability at most
  ``alpha_worse``, however often one looks.
* **not worse** (non-inferiority, margin m): H0 δ ≥ m against δ < m, i.e. the test of ``δ̂ − m`` on the
  "less" side with τ = m and the point mass on δ = 0 (an *equal* shadow is the case this test is built
  to pass fast). A shadow worse by m or more is called "not worse" with probability at most
  ``alpha_not_worse``. Margins: Brier 0.01, log-loss 0.025 (half the canary's τ for each metric).

The first decision ends the evaluation; "worse" wins a tie (stopping is the safe answer). For a shadow
worse by less than the margin either answer is correct, and either may come first.

Variance. Estimated from the d_i themselves: the sample variance of the mean difference, cluster-robust
over routing keys (Σ_k (D_k − δ̂ M_k)² / N² · K/(K−1), D_k the key's sum of d, M_k its row count; a row
without a key is its own unit), the estimator the canary's primary metric uses over keys. Assumptions:
(1) rows (keys, with sticky routing) are independent given the model pair, and the pair is fixed for the
evaluation (a retrained shadow is a new evaluation); (2) the outcome does not depend on which of the two
scores was served, or the comparison is read as "on the world the served version makes" (for a score
that drives an action, the shadow's loss is measured on outcomes of the served version's actions);
(3) the shadow scores the rows independently of their outcome (rows the shadow failed to score are left
out, and that is only harmless if shadow failures do not pick hard or easy rows); (4) the normal
approximation of δ̂ with the estimated variance, which is why no decision is taken before
``min_pairs`` rows. Log-loss is unbounded, so probabilities are clipped to [ε, 1 − ε] with
ε = ``log_loss_eps`` (1e-4: a confident miss costs at most 9.2 nats instead of 34.5) before the
difference; the clipped log-loss is the metric compared, a bounded difference whose mean the normal
approximation handles (the canary's log-loss is winsorised instead, a per-arm remedy with no paired
analogue that keeps "equal" meaning "equal").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from chimera.jsonsafe import nan_to_none
from rollout.lookdata import MIN_PERIOD_KEYS, _OutcomeCell
from rollout.policy import DEFAULT_TAU, PAIRED_METRICS
from rollout.stats import (
    msprt_confidence_interval,
    msprt_p_value,
    msprt_point_mixture_log_lr,
    outcome_in_domain,
    per_request_values,
)

# The non-inferiority margin δ < m that "not worse" proves, in the metric's units: half the canary's τ.
DEFAULT_MARGIN: dict[str, float] = {"brier": 0.01, "log_loss": 0.025}
PairedAction = Literal["worse", "not_worse", "continue"]


@dataclass(frozen=True)
class PairedPolicy:
    """How a shadow evaluation is judged; stored with every decision so it recomputes without defaults."""

    metric: str = "brier"
    alpha_worse: float = 0.05
    alpha_not_worse: float = 0.05
    margin: float | None = None
    tau: float | None = None
    point_mass: float = 0.9
    min_pairs: int = 200
    log_loss_eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.metric not in PAIRED_METRICS:
            raise ValueError(f"paired evaluation needs a score-based metric {PAIRED_METRICS}, "
                             f"got {self.metric!r}")
        for name in ("alpha_worse", "alpha_not_worse"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")
        for name in ("margin", "tau"):
            v = getattr(self, name)
            if v is not None and not (v > 0.0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= self.point_mass <= 1.0:
            raise ValueError("point_mass must be in [0, 1]")
        if self.min_pairs < 2:
            raise ValueError("min_pairs must be at least 2 (a variance needs two values)")
        if not 0.0 < self.log_loss_eps < 0.5:
            raise ValueError("log_loss_eps must be in (0, 0.5)")

    @property
    def resolved_tau(self) -> float:
        """Scale of the "worse" test's prior: the canary's default τ for the metric unless set."""
        return float(self.tau) if self.tau is not None else DEFAULT_TAU[self.metric]

    @property
    def resolved_margin(self) -> float:
        """The non-inferiority margin m; also the "not worse" test's τ (its point mass sits on δ = 0)."""
        return float(self.margin) if self.margin is not None else DEFAULT_MARGIN[self.metric]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedPolicy:
        """Unknown keys are ignored, as ``policy_from_dict`` does for the canary policy."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def loss_differences(metric: str, outcomes: np.ndarray, served: np.ndarray, shadow: np.ndarray,
                     log_loss_eps: float = 1e-4) -> np.ndarray:
    """d_i = loss(shadow_i, y_i) − loss(served_i, y_i) through ``rollout.stats.per_request_values`` (the
    canary's own loss definitions); log-loss scores are clipped to [eps, 1 − eps] first (module doc)."""
    served_loss, shadow_loss = pair_losses(metric, outcomes, served, shadow, log_loss_eps)
    return shadow_loss - served_loss


def pair_losses(metric: str, outcomes: np.ndarray, served: np.ndarray, shadow: np.ndarray,
                log_loss_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's loss under the served score and under the shadow's (the paired test's definitions;
    the shadow diff report shows them side by side)."""
    if metric not in PAIRED_METRICS:
        raise ValueError(f"unknown paired metric {metric!r}; expected one of {PAIRED_METRICS}")
    # One call for both scores: the per-call overhead matters at a look every 50 rows.
    y = np.asarray(outcomes, dtype=np.float64)
    both = np.concatenate([np.asarray(served, dtype=np.float64), np.asarray(shadow, dtype=np.float64)])
    if metric == "log_loss":
        both = np.clip(both, log_loss_eps, 1.0 - log_loss_eps)
    loss = per_request_values(metric, np.concatenate([y, y]), both)
    return loss[: y.size], loss[y.size:]


class PairedData:
    """Running per-key sums of the differences of one evaluation; rows in (any batches, any order of
    keys), a look's numbers out in O(1). Rows whose outcome is missing (NaN) or outside {0, 1}, or whose
    score is missing, are counted and left out."""

    def __init__(self, policy: PairedPolicy) -> None:
        self.policy = policy
        self._cell = _OutcomeCell()
        self._codes: dict[Any, int] = {}
        self._next = 0
        self.loss_served = 0.0
        self.loss_shadow = 0.0
        self.skipped = 0

    def add(self, outcomes: np.ndarray, served: np.ndarray, shadow: np.ndarray,
            units: np.ndarray | list[Any] | None = None) -> None:
        """Rows with an outcome: the served version's score, the shadow's, the routing key (None: each
        row its own unit)."""
        y = np.asarray(outcomes, dtype=np.float64)
        s = np.asarray(served, dtype=np.float64)
        h = np.asarray(shadow, dtype=np.float64)
        ok = outcome_in_domain(self.policy.metric, y) & np.isfinite(s) & np.isfinite(h)
        self.skipped += int(np.count_nonzero(~ok))
        if not ok.any():
            return
        k = int(ok.sum())
        if units is None:
            codes = np.arange(self._next, self._next + k, dtype=np.int64)
            self._next += k
        else:
            codes = np.empty(k, dtype=np.int64)
            for i, u in enumerate(np.asarray(units, dtype=object)[ok].tolist()):
                c = self._codes.get(u)
                if c is None:
                    c = self._codes[u] = self._next
                    self._next += 1
                codes[i] = c
        ls, lh = pair_losses(self.policy.metric, y[ok], s[ok], h[ok], self.policy.log_loss_eps)
        self._cell.add(codes, lh - ls, self._next)
        self.loss_served += float(ls.sum())
        self.loss_shadow += float(lh.sum())

    @property
    def n(self) -> int:
        return self._cell.n

    @property
    def units(self) -> int:
        return self._cell.keys

    @property
    def effect(self) -> float:
        """δ̂: mean loss difference, shadow − served."""
        return self._cell.total / self._cell.n if self._cell.n else math.nan

    @property
    def variance(self) -> float:
        """Cluster-robust variance of δ̂ around itself (NaN below two units)."""
        return self._cell.var_of_mean(self.effect) if self._cell.n else math.nan


@dataclass(frozen=True)
class PairedState:
    """Carried between looks (JSON-able): running minima of both p-values and the verdict once taken."""

    looks: int = 0
    p_worse: float = 1.0
    p_not_worse: float = 1.0
    verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedState:
        return cls(int(data.get("looks", 0)), float(data.get("p_worse", 1.0)),
                   float(data.get("p_not_worse", 1.0)), data.get("verdict"))


@dataclass(frozen=True)
class PairedDecision:
    """One look of a shadow evaluation, with what it takes to audit it."""

    action: PairedAction
    metric: str
    n_pairs: int
    units: int
    loss_served: float
    loss_shadow: float
    effect: float
    variance: float
    p_worse: float
    p_not_worse: float
    p_worse_look: float
    p_not_worse_look: float
    ci_low: float
    ci_high: float
    margin: float
    tau: float
    look: int
    skipped: int
    reason: str

    @property
    def terminal(self) -> bool:
        return self.action != "continue"

    def to_dict(self) -> dict[str, Any]:
        return nan_to_none(asdict(self))


def paired_look(policy: PairedPolicy, data: PairedData,
                state: PairedState | None = None) -> tuple[PairedDecision, PairedState]:
    """Judge the shadow on the pairs so far; pass the returned state to the next look. A state that
    already holds a verdict keeps it (the evaluation ended; its p-values still update for the record)."""
    prev = state if state is not None else PairedState()
    tau, margin = policy.resolved_tau, policy.resolved_margin
    effect, var, n = data.effect, data.variance, data.n
    # As the canary's primary test: a cluster-robust variance needs clusters (rollout.lookdata).
    ready = (n >= policy.min_pairs and data.units >= MIN_PERIOD_KEYS and math.isfinite(effect)
             and math.isfinite(var))
    pw_look = pn_look = 1.0
    ci = (-math.inf, math.inf)
    looks = prev.looks
    if ready:
        pw_look = msprt_p_value(msprt_point_mixture_log_lr(effect, var, tau, "greater", policy.point_mass))
        pn_look = msprt_p_value(
            msprt_point_mixture_log_lr(effect - margin, var, margin, "less", policy.point_mass))
        ci = msprt_confidence_interval(effect, var, tau, policy.alpha_worse)
        looks += 1
    p_worse, p_nw = min(prev.p_worse, pw_look), min(prev.p_not_worse, pn_look)
    verdict = prev.verdict
    ml = (f"mean {policy.metric} shadow {_fmt(data.loss_shadow, n)} vs served {_fmt(data.loss_served, n)} "
          f"over {n} pairs")
    if verdict is None and ready:
        if p_worse <= policy.alpha_worse:
            verdict = "worse"
        elif p_nw <= policy.alpha_not_worse:
            verdict = "not_worse"
    if verdict == "worse":
        reason = f"shadow worse: {ml}, always-valid p={p_worse:.4g} <= {policy.alpha_worse:g}"
    elif verdict == "not_worse":
        reason = (f"shadow not worse than served by {margin:g} or more: {ml}, always-valid "
                  f"p={p_nw:.4g} <= {policy.alpha_not_worse:g}")
    elif not ready:
        reason = (f"collecting: {n} pairs from {data.units} keys, need {policy.min_pairs} from "
                  f"{MIN_PERIOD_KEYS} keys")
    else:
        reason = f"no decision yet: {ml}, p_worse={p_worse:.4g}, p_not_worse={p_nw:.4g}"
    new = PairedState(looks, p_worse, p_nw, verdict)
    decision = PairedDecision(
        action=verdict or "continue", metric=policy.metric, n_pairs=n, units=data.units,  # type: ignore[arg-type]
        loss_served=data.loss_served / n if n else math.nan,
        loss_shadow=data.loss_shadow / n if n else math.nan, effect=effect, variance=var,
        p_worse=p_worse, p_not_worse=p_nw, p_worse_look=pw_look, p_not_worse_look=pn_look,
        ci_low=ci[0], ci_high=ci[1], margin=margin, tau=tau, look=looks, skipped=data.skipped,
        reason=reason)
    return decision, new


def _fmt(total: float, n: int) -> str:
    return f"{total / n:.4f}" if n else "nan"
