"""Covariate adjustment (CUPED) of the canary's primary metric, on the same always-valid footing.

A business outcome (a click, a trade's result) varies from row to row for reasons no version changes:
some requests are simply likelier to succeed. A covariate x known *before* the row is assigned to an
arm (the production model's own score for the row, computed for canary rows too, in the same batch;
or the routing key's mean outcome before the rollout) predicts part of that variation. The canary test
then compares the adjusted outcome

    y' = y − θ (x − c)

instead of y, per period and per key exactly as before (this module only changes the values the look
builder receives). Because x does not depend on the arm, x̄ has the same expectation in both arms and
the adjustment leaves the compared difference of means unchanged in expectation, while the variance
per row drops by the share of the outcome's variance x explains (ρ²). Fewer outcomes reach the same
evidence: docs/statistics.md has the measured gain.

What keeps the always-valid guarantee:

* **x is fixed before assignment.** Then under "no effect" (y, x) has the same distribution in both
  arms, so y' does too, for any fixed θ and c: the test of y' is the tested-and-simulated test on
  another per-row value. It is checked, not assumed: a two-sided mixture SPRT on the difference of x̄
  between arms (per period, cluster-robust over keys, in units of x's standard deviation) holds the
  canary like a sample-ratio mismatch when it falls below ``srm_alpha`` (``p_balance``).
* **θ and c come from baseline rows only** (the baseline outcomes in hand when their count first reaches
  ``covariate_calibration``: all of the batch that crossed it), never from canary rows: a θ fitted on
  both arms would let the canary's effect leak into the adjustment. c = mean of x over those rows; θ =
  cov(x, y)/var(x) over them.
* **θ is fixed once** and stored in the sequential state (as the winsor limits are), so every later look,
  a restarted controller and ``chimera analyze`` use the same θ; nothing is re-estimated between looks.
  Rows are held (not yet counted, in either arm) until θ is fixed; at a 10 % canary the 1,000 baseline
  outcomes arrive well before the 200 canary outcomes a decision needs, so this costs nothing there.
* **The effect of estimating θ.** The calibration rows also enter the test, so θ̂ is not independent of
  the baseline mean: the covariance this adds to the estimate is of order 1/n_baseline (zero for jointly
  normal x, y), against a standard error of order 1/√n_canary, and a θ̂ off its optimum only costs
  power (the test's variance is estimated from the adjusted values themselves). The A/A simulation with
  the adjustment on is what checks the combination.

A row without a covariate (NaN) is given the mean x of the last ``STANDIN_WINDOW`` baseline rows with x
that reached the builder before it (c before any). Why not c:
only canary rows can lack x (a baseline row's covariate is its own served score; a canary row's comes from
the mirror, which drops rows under load or while production is down), so missingness always depends on
the arm. A row given c is left unadjusted while the rows with x are moved by −θ(x̄ − c) on average; when
x̄ has drifted from the calibration mean (base rates move), that leaves a bias of θ·(share of canary rows
missing)·(x̄ − c) in the compared difference that does not shrink with n (a review found false rollbacks
and step-ups from it in A/A checks, 2026-12-07). The recent baseline mean has the expectation x has at
that time (to a lag of half the window, ~130 baseline rows), so a missing row's adjustment has the same
expectation as a present row's, drift or not. Why the rows *before* it, not a block around it (the rule
until the evening of 2026-12-07, still applied to decisions stored under it: ``covariate_standin:
"block"``): a block depends on how rows are grouped into calls, and the controller rebuilds from every
row at each look while the simulator adds each look's new rows, so the two gave different stand-ins
(``chimera simulate --path checked`` found it in aa-step-covariate-gaps, look 40); and a stand-in from
later rows changes as they arrive, so a row's adjusted value moved between looks. The trailing window
depends only on the order rows reach the builder, the same on both paths, and never changes once made:
tests/unit/test_covariate.py::test_missing_canary_covariates_under_drift_leave_an_aa_unbiased. The
balance check still sees only rows that have x.
Success rates: y' is no longer 0/1, so the builder treats it as a continuous mean (the domain check still
applies to the raw outcomes; the minimum expected events is taken at the pooled mean of y', close to the
raw rate); ``mean_outcome`` keeps its winsorising, which
is then applied to y' (limits from the first baseline values of y', a fixed function of pre-assignment
data and the outcome, the same for both arms).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rollout.lookdata import BASELINE, LookBuilder, LookData
from rollout.policy import RolloutPolicy
from rollout.stats import msprt_log_lr, msprt_p_value, outcome_in_domain

# Metrics the adjustment applies to: outcomes of the served version's action. Brier and log-loss are
# score quality, compared on the same rows by the paired shadow evaluation (rollout.paired) instead.
ADJUSTABLE_METRICS = frozenset({"success_rate", "mean_outcome"})
# Rows (in log order) over which a missing covariate's stand-in is averaged from the baseline rows, under
# the rule of decisions stored before 2026-12-07's evening (``covariate_standin: "block"``).
IMPUTE_BLOCK = 512
# Baseline rows with x whose mean stands in for a missing x (``covariate_standin: "trailing"``): the
# stand-in's noise is 1/16 of x's spread, and at a 10 % canary the window spans ~280 requests, seconds of
# traffic at the rates a rollout runs at (drift within it is negligible).
STANDIN_WINDOW = 256
# Mixing scale of the balance check, in standard deviations of x. Chance imbalance is what the adjustment
# corrects; the check is for faults (x computed differently for one arm), which are large, and a scale
# of a quarter standard deviation catches a fault of half a deviation before the primary metric moves.
BALANCE_TAU = 0.25


def adjusts(policy: RolloutPolicy, covariates_available: bool) -> bool:
    """On where the policy names a covariate (it does by default), the metric is a business outcome, and
    the caller has the covariate for its rows: 'on by default only where a covariate is available'."""
    return bool(policy.covariate) and covariates_available and policy.metric in ADJUSTABLE_METRICS


def make_builder(policy: RolloutPolicy, *, covariates_available: bool,
                 winsor: tuple[float, float] | None = None,
                 covariate: dict[str, Any] | None = None,
                 latency_thresholds: dict[str, float] | None = None) -> LookBuilder | AdjustedBuilder:
    """The look builder a controller, ``analyze`` or ``simulate`` should use: the plain ``LookBuilder``
    when no adjustment applies, else ``AdjustedBuilder``. ``winsor``, ``latency_thresholds`` and
    ``covariate`` (the record with θ, c and the sd of x, once fixed) come from the previous decision's
    ``SequentialState``."""
    if not adjusts(policy, covariates_available):
        return LookBuilder(policy.metric, winsor=winsor, latency_thresholds=latency_thresholds,
                           **policy.builder_options())
    return AdjustedBuilder(policy, winsor=winsor, covariate=covariate, latency_thresholds=latency_thresholds)


def fit_theta(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(θ, c, sd of x) from baseline rows: least squares slope of y on x, x's mean and spread. θ = 0 (no
    adjustment) when x does not vary or fewer than two rows have it."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return 0.0, float(x.mean()) if x.size else 0.0, math.nan
    c = float(x.mean())
    sxx = float(np.dot(x - c, x - c))
    if sxx <= 0.0:
        return 0.0, c, 0.0
    theta = float(np.dot(x - c, y - y.mean())) / sxx
    return theta, c, math.sqrt(sxx / (x.size - 1))


def impute_local(x: np.ndarray, arm: np.ndarray, before: float,
                 block: int = IMPUTE_BLOCK) -> tuple[np.ndarray, float]:
    """The stand-in rule of decisions stored before 2026-12-07's evening (``covariate_standin:
    "block"``; ``TrailingMean`` since): x with each NaN replaced by the mean x of the baseline rows in its
    block of ``block`` rows of the call (log order), or of the last earlier block that had some
    (``before`` for the first), and that last mean. Baseline rows count whether or not their outcome
    has arrived: x is known before assignment."""
    missing = ~np.isfinite(x)
    ref = ~missing & (arm == BASELINE)
    if not missing.any():
        return x, (float(x[ref][-block:].mean()) if ref.any() else before)
    out = x.copy()
    for start in range(0, x.size, block):
        sl = slice(start, start + block)
        r = ref[sl]
        if r.any():
            before = float(x[sl][r].mean())
        m = missing[sl]
        if m.any():
            out[sl][m] = before
    return out, before


class TrailingMean:
    """Stand-ins for missing x: the mean x of the last ``window`` baseline rows with x before each row, in
    the order rows are given, across calls (module docstring: the same whatever the calls' sizes)."""

    def __init__(self, window: int = STANDIN_WINDOW) -> None:
        self.window = window
        self.tail = np.zeros(0)  # the last ``window`` baseline values of x seen

    def fill(self, x: np.ndarray, arm: np.ndarray, before: float) -> np.ndarray:
        """x with each NaN replaced by its stand-in (``before`` while no baseline x has been seen)."""
        missing = ~np.isfinite(x)
        ref = ~missing & (arm == BASELINE)
        values = np.concatenate([self.tail, x[ref]])
        out = x
        if missing.any():
            sums = np.concatenate([[0.0], np.cumsum(values)])
            seen = self.tail.size + (np.cumsum(ref) - ref)[missing]  # baseline values before each row
            first = np.maximum(seen - self.window, 0)
            count = seen - first
            out = x.copy()
            out[missing] = np.where(count > 0, (sums[seen] - sums[first]) / np.maximum(count, 1), before)
        self.tail = values[-self.window:]
        return out


class AdjustedBuilder:
    """A ``LookBuilder`` whose outcomes are adjusted by a pre-assignment covariate (module docstring).

    Same interface as ``LookBuilder`` (``add_requests``, ``add_outcomes`` with ``covariates=``, ``data``);
    the look data carries ``covariate`` = {theta, center, sd, calibration_n, r2, balance_effect,
    p_balance_look} once θ is fixed, which ``rollout.decision.look`` stores and checks. Before that it
    carries {name, theta: None, calibration_n so far, p_balance_look: 1}: the stored decision then says
    the adjustment was chosen for this rollout (a controller keeps a rollout's choice from its first look
    to its last, and ``chimera analyze`` recomputes each decision the way it was made).
    """

    def __init__(self, policy: RolloutPolicy, *, winsor: tuple[float, float] | None = None,
                 covariate: dict[str, Any] | None = None,
                 latency_thresholds: dict[str, float] | None = None) -> None:
        if policy.metric not in ADJUSTABLE_METRICS:
            raise ValueError(f"covariate adjustment applies to {sorted(ADJUSTABLE_METRICS)}, "
                             f"not {policy.metric!r}")
        self.policy = policy
        opts = policy.builder_options()
        if policy.metric == "success_rate":
            opts["winsor_quantile"] = None  # y' of a rate is bounded; the raw rate was never winsorised
        # The inner builder compares y' as a plain mean; the outcome domain is checked here, on raw y.
        # Only canary rows can lack x, so under "no difference" the canary's y' may vary more than the
        # baseline's: its variance is floored at its own (RolloutPolicy.canary_variance_floor).
        self.inner = LookBuilder("mean_outcome", winsor=winsor, latency_thresholds=latency_thresholds,
                                 canary_floor=policy.canary_variance_floor, **opts)
        self.balance = LookBuilder("mean_outcome", winsor_quantile=None, latency_calibration=1)
        self.theta: tuple[float, float, float] | None = None
        self.r2 = math.nan
        self.calibration_n = 0
        if covariate and covariate.get("theta") is not None:  # fixed by an earlier look: never re-estimated
            sd = covariate.get("sd")
            self.theta = (float(covariate["theta"]), float(covariate["center"]),
                          math.nan if sd is None else float(sd))
            self.r2 = float(covariate.get("r2") or math.nan)
            self.calibration_n = int(covariate.get("calibration_n") or 0)
        self._pending: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._cal_x: list[np.ndarray] = []
        self._cal_y: list[np.ndarray] = []
        self._cal_n = 0
        self.skipped = 0
        self._local_x: float | None = None  # the last block's baseline mean of x (impute_local)
        self._trailing = TrailingMean() if policy.covariate_standin == "trailing" else None

    @property
    def winsor(self) -> tuple[float, float] | None:
        return self.inner.winsor

    def codes(self, units: np.ndarray | list[Any]) -> np.ndarray:
        """Integer codes for routing keys, as ``LookBuilder.codes`` (the inner builder's)."""
        return self.inner.codes(units)

    def add_requests(self, revision: int, weight: int, arm: np.ndarray, units: np.ndarray,
                     failed: np.ndarray, latency_ms: np.ndarray) -> None:
        """Unchanged: the guardrails and the SRM check see the requests as ``LookBuilder`` does."""
        self.inner.add_requests(revision, weight, arm, units, failed, latency_ms)

    def add_outcomes(self, revision: int, weight: int, arm: np.ndarray, units: np.ndarray,
                     values: np.ndarray, scores: np.ndarray | None = None,
                     covariates: np.ndarray | None = None) -> None:
        """Matured predictions of one period with their outcome (NaN: none arrived) and covariate (NaN
        or None: unknown, given the recent baseline mean: TrailingMean). Held until θ is fixed, then
        adjusted and passed on."""
        arm = np.asarray(arm, dtype=np.int64)
        units = np.asarray(units)
        y = np.asarray(values, dtype=np.float64)
        x = (np.full(y.shape, np.nan) if covariates is None
             else np.asarray(covariates, dtype=np.float64))
        have = ~np.isnan(y)
        ok = have & outcome_in_domain(self.policy.metric, y)
        self.skipped += int(np.count_nonzero(have & ~ok))
        y = np.where(ok, y, np.nan)  # out of domain: matured without an outcome, as LookBuilder counts it
        if self.theta is None:
            self._pending.append((revision, weight, arm, units, y, x))
            base = ok & (arm == BASELINE)
            self._cal_x.append(x[base])
            self._cal_y.append(y[base])
            self._cal_n += int(base.sum())
            if self._cal_n < self.policy.covariate_calibration:
                return
            cx, cy = np.concatenate(self._cal_x), np.concatenate(self._cal_y)
            self.theta = fit_theta(cx, cy)
            self.calibration_n = int(np.isfinite(cx).sum())
            self._r2(cx, cy)
            pending, self._pending, self._cal_x, self._cal_y = self._pending, [], [], []
            for b in pending:
                self._pass_on(*b)
            return
        self._pass_on(revision, weight, arm, units, y, x)

    def _r2(self, x: np.ndarray, y: np.ndarray) -> None:
        keep = np.isfinite(x)
        if keep.sum() > 2 and np.std(x[keep]) > 0 and np.std(y[keep]) > 0:
            self.r2 = float(np.corrcoef(x[keep], y[keep])[0, 1] ** 2)

    def _pass_on(self, revision: int, weight: int, arm: np.ndarray, units: np.ndarray, y: np.ndarray,
                 x: np.ndarray) -> None:
        assert self.theta is not None
        theta, c, _ = self.theta
        if self._trailing is not None:
            x_used = self._trailing.fill(x, arm, c)
        else:
            x_used, self._local_x = impute_local(x, arm, c if self._local_x is None else self._local_x)
        adjusted = y - theta * (x_used - c)
        self.inner.add_outcomes(revision, weight, arm, units, adjusted)
        seen = np.isfinite(x)
        if seen.any():
            self.balance.add_outcomes(revision, weight, arm[seen], units[seen], x[seen])

    def data(self, current_weight: int) -> LookData:
        """The inner builder's look data (of y'), with the raw metric's name, the skipped count of raw
        outcomes and the covariate record; before θ is fixed nothing has entered (a hold)."""
        d = self.inner.data(current_weight)
        cov: dict[str, Any] = {"name": self.policy.covariate, "theta": None, "calibration_n": self._cal_n,
                               "p_balance_look": 1.0}
        if self.theta is not None:
            theta, c, sd = self.theta
            b = self.balance.data(current_weight)
            p_look = 1.0
            if sd > 0.0 and math.isfinite(b.effect) and math.isfinite(b.variance) and b.variance > 0.0:
                p_look = msprt_p_value(msprt_log_lr(b.effect / sd, b.variance / (sd * sd), BALANCE_TAU))
            cov = {"name": self.policy.covariate, "theta": theta, "center": c, "sd": sd,
                   "calibration_n": self.calibration_n, "r2": self.r2, "balance_effect": b.effect,
                   "p_balance_look": p_look}
        return LookData(
            metric=self.policy.metric, current_weight=d.current_weight, periods=d.periods, n=d.n,
            mean=d.mean, effect=d.effect, variance=d.variance, winsor=d.winsor,
            latency_thresholds=d.latency_thresholds, skipped_outcomes=self.skipped, covariate=cov)
