"""The look's checks besides the primary metric (rollout.decision.look runs them first): the two
sequential guardrails (error rate and the share of slow requests, canary worse than the baseline by
more than a margin: a rollback at any sample size), the sample-ratio mismatch of assignment units, and
the difference in outcome coverage between arms (both holds: the arms are not comparable).

Each is an always-valid mixture SPRT (rollout.stats) whose running minimum the caller keeps in the
sequential state; docs/statistics.md gives the tests, their variances and their share of alpha. Kept
apart from the decision rules so each file has one job: these say whether the comparison can be
trusted, rollout.decision says what the comparison shows."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rollout.lookdata import BASELINE, CANARY, LookData
from rollout.policy import RolloutPolicy
from rollout.stats import msprt_log_lr, msprt_one_sided_log_lr, msprt_p_value


@dataclass(frozen=True)
class GuardrailResult:
    """One sequential guardrail: canary worse than baseline by more than ``margin``?"""

    name: str
    breached: bool
    observed: float
    margin: float
    p_value: float
    p_value_look: float
    reason: str


def proportion_guardrail(
    name: str, counts: list[tuple[int, int, int, int]], margin: float, tau: float, prev: float, alpha: float,
    what: str, window_var: list[tuple[int, float]] | None = None, min_windows: int = 0,
) -> tuple[GuardrailResult, float]:
    """One-sided mSPRT that the canary's rate exceeds the baseline's by more than ``margin``, stratified
    over periods. counts: per period (events_b, n_b, events_c, n_c). Rates are Agresti–Caffo adjusted
    ((x+1)/(n+2)), so a variance is never zero (a canary failing its first 5 of 5 requests has one).
    ``window_var``: per period, (time windows, cluster-robust variance of the difference over them); the
    larger of it and the binomial one is used (the binomial variance alone counts a burst of slow
    requests from one stalled or warming replica as that many independent pieces of evidence), and a
    period enters only once it has ``min_windows`` windows (before that, a replica's warm-up of a few
    seconds looks exactly like a slow version: the windows must show whether it persists)."""
    inv = 0.0
    acc = 0.0
    eb = nb = ec = nc = 0
    for i, (xb, b, xc, c) in enumerate(counts):
        eb, nb, ec, nc = eb + xb, nb + b, ec + xc, nc + c
        if b == 0 or c == 0:
            continue
        pb, pc = (xb + 1.0) / (b + 2.0), (xc + 1.0) / (c + 2.0)
        v = pb * (1.0 - pb) / b + pc * (1.0 - pc) / c
        if window_var is not None:
            k, wv = window_var[i]
            if k < min_windows:
                continue
            if math.isfinite(wv):
                v = max(v, wv)
        inv += 1.0 / v
        acc += (pc - pb) / v
    rate_b = eb / nb if nb else math.nan
    rate_c = ec / nc if nc else math.nan
    if inv == 0.0:
        none = GuardrailResult(name, False, math.nan, margin, prev, 1.0, f"{name}: no canary requests yet")
        return none, prev
    effect, var = acc / inv, 1.0 / inv
    p_look = msprt_p_value(msprt_one_sided_log_lr(effect - margin, var, tau, "greater"))
    p = min(prev, p_look)
    breached = p <= alpha
    reason = (f"{what}: canary {rate_c:.4f} vs baseline {rate_b:.4f} ({nc} / {nb} requests), "
              f"margin {margin}, always-valid p={p:.3g} {'<=' if breached else '>'} {alpha}")
    return GuardrailResult(name, breached, rate_c - rate_b, margin, p, p_look, reason), p


def srm_check(data: LookData, policy: RolloutPolicy, prev: float) -> tuple[float, float, float]:
    """Two-sided mSPRT of observed canary share of assignment units against the configured weight,
    stratified over periods: Σ(c_s − n_s w_s) has variance Σ n_s w_s (1 − w_s) under correct routing."""
    dev = info = total = 0.0
    for p in data.periods:
        w = p.weight / 100.0
        n = p.units[BASELINE] + p.units[CANARY]
        if n == 0 or not 0.0 < w < 1.0:
            continue
        dev += p.units[CANARY] - n * w
        info += n * w * (1.0 - w)
        total += n
    if info == 0.0:
        return prev, 1.0, 0.0
    llr = msprt_log_lr(dev / total, info / (total * total), policy.srm_tau)
    p_look = msprt_p_value(llr)
    return min(prev, p_look), p_look, llr


def coverage_check(data: LookData, policy: RolloutPolicy, prev: float) -> tuple[float, tuple[float, float]]:
    """Two-sided mSPRT of outcome coverage (outcomes / matured predictions), canary vs baseline, per
    period around the pooled coverage; a difference means the arms' outcomes are not comparable.

    The variance is cluster-robust over routing keys, as the primary metric's: whether outcomes come
    back is a property of the client as much as of the row (a client that never reports), so with
    sticky keys the rows of a key are not independent, and the binomial variance used until 2026-12-07
    held 9 of 20 A/A canaries as "not comparable" when half the keys never reported
    (tests/unit/test_decision.py::test_coverage_counts_keys_that_never_report_as_keys: now at most 1).
    Pooled over both arms (rollout.lookdata._pooled_variances), as the primary metric's variance is;
    below three keys it falls back to the binomial variance."""
    inv = acc = 0.0
    cov = [0, 0, 0, 0]
    for p in data.periods:
        ob, mb, oc, mc = p.outcomes[BASELINE], p.matured[BASELINE], p.outcomes[CANARY], p.matured[CANARY]
        cov = [cov[0] + ob, cov[1] + mb, cov[2] + oc, cov[3] + mc]
        if mb == 0 or mc == 0:
            continue
        pooled = (ob + oc) / (mb + mc)
        v = pooled * (1.0 - pooled) * (1.0 / mb + 1.0 / mc)
        robust = p.coverage_var[BASELINE] + p.coverage_var[CANARY]
        if math.isfinite(robust) and robust > 0.0:
            v = robust
        if v <= 0.0:
            continue
        inv += 1.0 / v
        acc += (oc / mc - ob / mb) / v
    coverage = (cov[0] / cov[1] if cov[1] else math.nan, cov[2] / cov[3] if cov[3] else math.nan)
    if inv == 0.0:
        return prev, coverage
    p_look = msprt_p_value(msprt_log_lr(acc / inv, 1.0 / inv, policy.coverage_tau))
    return min(prev, p_look), coverage
