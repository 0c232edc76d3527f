"""Simulations of the two faster-decision methods (issue 18), each against the method it speeds up, on
the same generated rows: the paired shadow evaluation (``rollout.paired``) against the unpaired 10 %
canary on the same metric, and the covariate-adjusted canary (``rollout.covariate``) against the
unadjusted one. ``rollout.simulate`` lists the scenarios and runs these (``chimera simulate``).

Paired rows. Each request has a true log-odds η ~ N(0, 1.5²) and an outcome y ~ Bernoulli(σ(η)); the
served version scores σ(η + 0.5 e₁), the shadow σ(η + s e₂) with independent standard normal errors.
s = 0.5 is an A/A pair (two different models of equal quality: d_i is not zero, its mean is); s = 0.96
makes the shadow's Brier score worse by 0.020 (measured over 2·10⁶ rows: served 0.1854, shadow 0.2051),
s = 0.76 by 0.010, the non-inferiority margin (shadow 0.1955).
With sticky keys, a share ``icc`` of the variance of η and of each model's error belongs to the key (a
model that misjudges a customer misjudges all of that customer's requests), so the d_i of a key are
correlated. The reference canary routes 10 % of the same rows to the shadow's scores and runs the
controller's builder and ``look`` (metric Brier) until it rolls back.

CUPED rows. Each request's success probability p_i ~ Beta(a, a) (mean 0.5), known to the production
model, whose score x_i = p_i is the covariate; y ~ Bernoulli(p_i) in the baseline and Bernoulli(r p_i)
in the canary (r = 0.9: 0.45 vs 0.50, the 5-point-worse canary; r = 1 for A/A). x explains
R² = Var(p)/Var(y) = 1/(2a + 1) of the outcome's variance; a is set from the scenario's
``covariate_r2``. Both pipelines see the same requests, outcomes and routing draws; each moves its own
split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit

from rollout import splits
from rollout.covariate import make_builder
from rollout.decision import look
from rollout.lookdata import LookBuilder
from rollout.paired import PairedData, PairedPolicy, PairedState, paired_look
from rollout.policy import RolloutPolicy

if TYPE_CHECKING:
    from rollout.scenarios import Scenario

BASE, CANARY = 1, 2
PAIRED_KINDS = ("paired-aa", "paired-margin", "paired-worse")
CUPED_KINDS = ("cuped-aa", "cuped-worse")
KINDS = frozenset(PAIRED_KINDS + CUPED_KINDS)
ETA_SD = 1.5
SERVED_NOISE = 0.5


@dataclass(frozen=True)
class MethodRun:
    """One run: the method's verdict and outcomes used, and the reference method's on the same rows.

    Paired: verdict worse | not_worse | none (the first decision), ``worse_ever``: whether the "worse"
    test fired anywhere within the horizon (it keeps running after "not worse", the stricter count for
    an A/A pair), ``not_worse_ever`` likewise for a shadow worse by the margin; reference = the unpaired
    canary. CUPED: verdict rollback | promote | none of the
    adjusted canary; reference = the unadjusted canary."""

    verdict: str
    outcomes: int
    worse_ever: bool
    reference: str
    reference_outcomes: int
    srm: bool
    not_worse_ever: bool = False  # paired: "not worse" fired within the horizon (kept running after "worse")


def _canary(policy: RolloutPolicy, builder: Any, u_route: np.ndarray, key: np.ndarray, y: np.ndarray,
            look_every: int, scores: tuple[np.ndarray, np.ndarray] | None = None,
            covariate: np.ndarray | None = None) -> tuple[str, int, bool]:
    """A 10 % canary through the controller's builder, ``look`` and split arithmetic, outcomes at once
    (no failures, equal latencies). y: one outcome per row, or (2, n) outcomes per arm; scores:
    (baseline's, canary's) per row. Returns (action, outcomes of both arms at the end, SRM flagged)."""
    weights = splits.canary_start(BASE, CANARY, 10)
    revision, state = 1, None
    srm = False
    n = y.shape[-1]
    outcomes = 0
    for start in range(0, n, look_every):
        sl = slice(start, min(start + look_every, n))
        w = weights[CANARY]
        arm = (u_route[sl] < w / 100.0).astype(np.int64)
        ok, lat = np.zeros(arm.size, dtype=bool), np.full(arm.size, 5.0)
        builder.add_requests(revision, w, arm, key[sl], ok, lat)
        sc = None if scores is None else np.where(arm == 1, scores[1][sl], scores[0][sl])
        ys = y[sl] if y.ndim == 1 else np.where(arm == 1, y[1, sl], y[0, sl])
        if covariate is None:
            builder.add_outcomes(revision, w, arm, key[sl], ys, sc)
        else:
            builder.add_outcomes(revision, w, arm, key[sl], ys, sc, covariates=covariate[sl])
        d, state = look(policy, builder.data(w), state)
        srm, outcomes = d.srm, d.n_baseline + d.n_canary
        if d.action in ("rollback", "promote"):
            return d.action, outcomes, srm
        if d.action == "step_up":
            weights = splits.step_up(weights, BASE, CANARY, d.next_weight)
            revision += 1
    return "none", outcomes, srm


def _keys(sc: Scenario, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Routing units and routing draws: per request, or per sticky key (a key's draw against the share)."""
    if not sc.keys:
        return np.arange(n, dtype=np.int64), rng.random(n)
    key = rng.integers(0, sc.keys, n)
    return key, rng.random(sc.keys)[key]


def _mixed(rng: np.random.Generator, n: int, key: np.ndarray, n_keys: int, icc: float) -> np.ndarray:
    """Standard normal per row with a share ``icc`` of its variance shared by the row's key."""
    z = rng.standard_normal(n)
    if not n_keys or icc <= 0.0:
        return z
    return math.sqrt(1.0 - icc) * z + math.sqrt(icc) * rng.standard_normal(n_keys)[key]


def run_paired(sc: Scenario, rng: np.random.Generator, *, max_requests: int = 20_000, look_every: int = 50,
               rate: float = 50.0) -> MethodRun:
    """Paired shadow evaluation on generated rows (module docstring); for ``paired-worse`` also the
    unpaired 10 % canary on the same rows."""
    n = sc.rows or max_requests
    key, u_route = _keys(sc, rng, n)
    eta = ETA_SD * _mixed(rng, n, key, sc.keys, sc.icc)
    y = (rng.random(n) < expit(eta)).astype(np.float64)
    served = expit(eta + SERVED_NOISE * _mixed(rng, n, key, sc.keys, sc.icc))
    shadow = expit(eta + sc.shadow_noise * _mixed(rng, n, key, sc.keys, sc.icc))
    policy = PairedPolicy(metric=sc.metric, **sc.policy)
    data = PairedData(policy)
    state: PairedState | None = None
    units = key if sc.keys else None
    verdict, at, worse_ever, nw_ever = "none", data.n, False, False
    for start in range(0, n, look_every):
        sl = slice(start, min(start + look_every, n))
        data.add(y[sl], served[sl], shadow[sl], None if units is None else units[sl])
        d, state = paired_look(policy, data, state)
        if verdict == "none" and d.terminal:
            verdict, at = d.action, d.n_pairs
        worse_ever = worse_ever or state.p_worse <= policy.alpha_worse
        nw_ever = nw_ever or state.p_not_worse <= policy.alpha_not_worse
        # An A/A pair runs on for the false "worse", a pair worse by the margin for the false "not worse".
        if verdict != "none" and (sc.kind == "paired-worse" or (sc.kind == "paired-aa" and worse_ever)
                                  or (sc.kind == "paired-margin" and nw_ever)):
            break
    if verdict == "none":
        at = data.n
    ref, ref_n = "", 0
    if sc.kind == "paired-worse":
        canary_policy = RolloutPolicy(metric=sc.metric)
        builder = LookBuilder(sc.metric, **canary_policy.builder_options())
        ref, ref_n, _ = _canary(canary_policy, builder, u_route, key, y, look_every, (served, shadow))
    return MethodRun(verdict, at, worse_ever, ref, ref_n, False, nw_ever)


def run_cuped(sc: Scenario, rng: np.random.Generator, *, max_requests: int = 20_000, look_every: int = 50,
              rate: float = 50.0) -> MethodRun:
    """The covariate-adjusted 10 % canary and, for ``cuped-worse``, the unadjusted one on the same rows
    (module docstring; an A/A needs no reference: its false decisions are the result)."""
    n = sc.rows or max_requests
    key, u_route = _keys(sc, rng, n)
    a = (1.0 / sc.covariate_r2 - 1.0) / 2.0
    p = rng.beta(a, a, n)
    u_out = rng.random(n)
    ratio = (sc.p_canary / sc.p) if sc.p_canary is not None else 1.0
    policy = RolloutPolicy(metric=sc.metric, **sc.policy)
    y = _outcomes_by_arm(u_out, p, ratio)
    results = []
    # Each pipeline moves its own split over the same rows and draws.
    for adjusted in (True, False) if sc.kind == "cuped-worse" else (True,):
        builder = make_builder(policy, covariates_available=adjusted)
        results.append(_canary(policy, builder, u_route, key, y, look_every,
                               covariate=p if adjusted else None))
    (v, k, srm), (rv, rk, _) = results[0], (results[1] if len(results) > 1 else ("", 0, False))
    return MethodRun(v, k, False, rv, rk, srm)


def _outcomes_by_arm(u: np.ndarray, p: np.ndarray, ratio: float) -> np.ndarray:
    """Row j's outcome in the baseline (row 0) and in the canary (row 1): the same uniform against the
    arm's probability, so a row's luck does not depend on where it lands."""
    return np.stack([(u < p), (u < ratio * p)]).astype(np.float64)


def summarise(sc: Scenario, res: list[MethodRun], seed: int, elapsed: float, kw: dict[str, Any],
              wilson: Callable[[int, int], tuple[float, float]]) -> dict[str, Any]:
    """JSON-able summary of one method scenario; ``wilson`` is ``rollout.simulate.wilson``.

    Medians of outcomes are over all runs, a run without the verdict counting as +inf (censored at the
    horizon: the median is exact while fewer than half are censored, and None otherwise), so a method
    that often fails to decide cannot look fast by its few quick runs."""
    n = len(res)

    def rate(k: int) -> dict[str, float]:
        lo, hi = wilson(k, n)
        return {"rate": k / n, "ci_low": lo, "ci_high": hi}

    def med(pairs: list[tuple[bool, int]]) -> float | None:
        v = float(np.median([k if hit else math.inf for hit, k in pairs]))
        return v if math.isfinite(v) else None

    out: dict[str, Any] = {
        "scenario": sc.name, "kind": sc.kind, "description": sc.description, "runs": n, "seed": seed,
        "max_requests": sc.rows or kw.get("max_requests"), "look_every": kw.get("look_every"),
        "elapsed_s": round(elapsed, 2)}
    if sc.kind in PAIRED_KINDS:
        out |= {
            "worse": rate(sum(r.verdict == "worse" for r in res)),
            "not_worse": rate(sum(r.verdict == "not_worse" for r in res)),
            "worse_ever": rate(sum(r.worse_ever for r in res)),
            "not_worse_ever": rate(sum(r.not_worse_ever for r in res)),
            "median_pairs_to_worse": med([(r.verdict == "worse", r.outcomes) for r in res]),
            "median_pairs_to_not_worse": med([(r.verdict == "not_worse", r.outcomes) for r in res]),
        }
        if sc.kind == "paired-worse":
            m_ref = med([(r.reference == "rollback", r.reference_outcomes) for r in res])
            out |= {"canary_rollback": rate(sum(r.reference == "rollback" for r in res)),
                    "canary_promotion": rate(sum(r.reference == "promote" for r in res)),
                    "median_canary_outcomes_to_rollback": m_ref}
            m = out["median_pairs_to_worse"]
            out["ratio_paired_to_canary"] = (m / m_ref) if m is not None and m_ref else None
        return out
    m_adj = med([(r.verdict == "rollback", r.outcomes) for r in res])
    m_raw = med([(r.reference == "rollback", r.reference_outcomes) for r in res])
    out |= {"rollback": rate(sum(r.verdict == "rollback" for r in res)),
            "promotion": rate(sum(r.verdict == "promote" for r in res)),
            "srm_flagged": rate(sum(r.srm for r in res)),
            "unadjusted_rollback": rate(sum(r.reference == "rollback" for r in res)),
            "unadjusted_promotion": rate(sum(r.reference == "promote" for r in res)),
            "median_outcomes_to_rollback": m_adj, "median_outcomes_to_rollback_unadjusted": m_raw,
            "reduction": (1.0 - m_adj / m_raw) if m_adj is not None and m_raw else None}
    return out


def check(result: dict[str, Any]) -> dict[str, bool]:
    """Issue 18's acceptance thresholds for one method scenario's summary."""
    kind = result["kind"]
    if kind == "paired-aa":
        w = result["worse_ever"]
        return {"false_worse_le_5pct": w["rate"] <= 0.05,
                "false_worse_ci_high_le_6.5pct": w["ci_high"] <= 0.065}
    if kind == "paired-margin":
        w = result["not_worse_ever"]
        return {"false_not_worse_le_5pct": w["rate"] <= 0.05,
                "false_not_worse_ci_high_le_6.5pct": w["ci_high"] <= 0.065}
    if kind == "paired-worse":
        ratio = result["ratio_paired_to_canary"]
        return {"worse_ge_95pct": result["worse"]["rate"] >= 0.95,
                "false_not_worse_le_5pct": result["not_worse"]["rate"] <= 0.05,
                "median_le_third_of_canary": ratio is not None and ratio <= 1.0 / 3.0}
    if kind == "cuped-aa":
        rb, pr = result["rollback"], result["promotion"]
        return {"false_rollback_le_5pct": rb["rate"] <= 0.05, "false_rollback_ci_high_le_6.5pct":
                rb["ci_high"] <= 0.065, "false_promotion_le_5pct": pr["rate"] <= 0.05,
                "false_promotion_ci_high_le_6.5pct": pr["ci_high"] <= 0.065}
    if kind == "cuped-worse":
        red = result["reduction"]
        return {"rollback_ge_95pct": result["rollback"]["rate"] >= 0.95,
                "median_outcomes_drop_ge_30pct": red is not None and red >= 0.30}
    return {}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the method scenarios of a report, as docs/statistics.md shows it."""
    def pct(r: dict[str, float]) -> str:
        return f"{100 * r['rate']:.1f} % ({100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f})"

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:,.0f}"

    lines = ["| scenario | runs | false decision (95 % CI) | decided (95 % CI) | median outcomes, method | "
             "median outcomes, reference | checks |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] not in KINDS:
            continue
        ok = "pass" if all(r.get("checks", check(r)).values()) else "FAIL"
        if r["kind"] == "paired-aa":
            row = (f"'worse' ever {pct(r['worse_ever'])}", f"'not worse' {pct(r['not_worse'])}",
                   f"{num(r['median_pairs_to_not_worse'])} pairs to 'not worse'", "")
        elif r["kind"] == "paired-margin":
            row = (f"'not worse' ever {pct(r['not_worse_ever'])}", f"'worse' {pct(r['worse'])}",
                   f"{num(r['median_pairs_to_worse'])} pairs to 'worse'", "")
        elif r["kind"] == "paired-worse":
            row = (f"'not worse' {pct(r['not_worse'])}", f"'worse' {pct(r['worse'])}",
                   f"{num(r['median_pairs_to_worse'])} pairs to 'worse'",
                   f"{num(r['median_canary_outcomes_to_rollback'])} (10 % canary, rolled back "
                   f"{100 * r['canary_rollback']['rate']:.1f} %)")
        elif r["kind"] == "cuped-aa":
            row = (f"rollback {pct(r['rollback'])}, promotion {pct(r['promotion'])}",
                   f"held by SRM/balance {pct(r['srm_flagged'])}", "", "")
        else:
            red = r["reduction"]
            row = (f"promotion {pct(r['promotion'])}", f"rollback {pct(r['rollback'])}",
                   f"{num(r['median_outcomes_to_rollback'])} (adjusted)",
                   f"{num(r['median_outcomes_to_rollback_unadjusted'])} (unadjusted; drop "
                   f"{'' if red is None else f'{100 * red:.1f} %'})")
        cells = " | ".join(row)
        lines.append(f"| {r['scenario']}: {r['description']} | {r['runs']} | {cells} | {ok} |")
    return "\n".join(lines)


RUNNERS: dict[str, Callable[..., MethodRun]] = {
    **{k: run_paired for k in PAIRED_KINDS}, **{k: run_cuped for k in CUPED_KINDS}}
