"""Monte-Carlo check of the rollout policy: the real ``rollout.decision.decide`` on simulated outcomes.

Each run draws a binary outcome stream per arm and a routing stream, then feeds the controller exactly as
production does: after every batch of ``batch_size`` outcomes, ``decide`` sees all outcomes so far of
both arms plus the state from its previous call, until a terminal decision (rollback / promote) or the
horizon ``max_outcomes`` (total outcomes, both arms). The same streams are replayed through the naive
procedure — the classical fixed-horizon test (z / Fisher) applied at every look at the same alpha — so
the two procedures differ only in the test (common random numbers make the contrast sharper).

Traffic follows the controller: after a step-up the canary receives the new weight's share of the
following batches (``follow_steps=True``, the realistic default). That only matters once a canary has
been found better (or, in A/A, after a rare false "better"); rollbacks of a worse canary and false
rollbacks in A/A happen at the starting split (10 %), which is what the acceptance criteria are about.
``follow_steps=False`` keeps the routing share fixed while still passing the stepped weight to ``decide``.

Cost: the per-batch work is two array sums over prefix views (no copies) and scalar arithmetic, about
50 µs per ``decide`` call; 500 A/A + 200 worse runs with both procedures take roughly 10 s on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any, Literal

import numpy as np

from rollout.decision import ArmData, RolloutPolicy, decide

Scenario = Literal["aa", "ab-worse", "ab-better"]
SCENARIOS: tuple[str, ...] = ("aa", "ab-worse", "ab-better")
# Canary minus baseline success rate per scenario when p_canary is not given: the 5-point effect.
SCENARIO_DELTA: dict[str, float] = {"aa": 0.0, "ab-worse": -0.05, "ab-better": 0.05}
# The horizon (total outcomes) used for the acceptance numbers: at a 10 % split that is ≤ 3 000 canary
# outcomes, enough for ≥ 90 % power against a 5-point drop with tau = 0.05.
DEFAULT_MAX_OUTCOMES = 30_000
DEFAULT_BATCH_SIZE = 200


def simulate(
    scenario: str,
    runs: int,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_outcomes: int = DEFAULT_MAX_OUTCOMES,
    canary_share: float = 0.10,
    p_base: float = 0.60,
    p_canary: float | None = None,
    policy: RolloutPolicy | None = None,
    follow_steps: bool = True,
) -> dict[str, Any]:
    """Run ``runs`` simulated rollouts of ``scenario`` with the mSPRT policy and the naive contrast.

    Returns a JSON-able dict. Top level: the settings and the sequential (mSPRT) metrics —
    ``false_rollback_rate`` (aa and ab-better: any rollback is false; None for ab-worse),
    ``rollback_rate``, ``median_outcomes_to_rollback`` (total outcomes, both arms, at the rolling-back
    look), ``promotion_rate``, ``undecided_rate`` and Monte-Carlo standard errors. The same metrics for
    the naive procedure are under ``"naive"`` (and repeated under ``"sequential"`` for symmetry).
    Deterministic for a given seed.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    if runs < 1 or batch_size < 1 or max_outcomes < batch_size:
        raise ValueError("need runs >= 1, batch_size >= 1 and max_outcomes >= batch_size")
    if not 0.0 < canary_share < 1.0:
        raise ValueError("canary_share must be in (0, 1)")
    pc = round(p_base + SCENARIO_DELTA[scenario], 12) if p_canary is None else float(p_canary)
    if not (0.0 <= p_base <= 1.0 and 0.0 <= pc <= 1.0):
        raise ValueError("success probabilities must be in [0, 1]")
    seq_policy = policy if policy is not None else RolloutPolicy(metric="success_rate")
    if seq_policy.metric != "success_rate":
        raise ValueError("the simulator draws binary outcomes: use metric='success_rate'")
    seq_policy = dataclasses.replace(seq_policy, procedure="msprt")
    naive_policy = dataclasses.replace(seq_policy, procedure="naive_fixed_horizon")

    started = time.perf_counter()
    seeds = np.random.SeedSequence(seed).spawn(runs)
    seq_runs: list[_RunResult] = []
    naive_runs: list[_RunResult] = []
    for child in seeds:
        rng = np.random.default_rng(child)
        base = (rng.random(max_outcomes) < p_base).astype(np.float64)
        can = (rng.random(max_outcomes) < pc).astype(np.float64)
        route = rng.random(max_outcomes)
        seq_runs.append(_run_one(seq_policy, base, can, route, canary_share, batch_size, follow_steps))
        naive_runs.append(_run_one(naive_policy, base, can, route, canary_share, batch_size, follow_steps))

    seq = _summarise(scenario, seq_runs)
    naive = _summarise(scenario, naive_runs)
    out: dict[str, Any] = {
        "scenario": scenario,
        "runs": runs,
        "seed": seed,
        "batch_size": batch_size,
        "max_outcomes": max_outcomes,
        "canary_share": canary_share,
        "p_base": p_base,
        "p_canary": pc,
        "follow_steps": follow_steps,
        "policy": {
            "metric": seq_policy.metric,
            "alpha": seq_policy.alpha,
            "tau": seq_policy.resolved_tau,
            "min_samples_per_arm": seq_policy.min_samples_per_arm,
            "min_canary_samples_per_step": seq_policy.min_canary_samples_per_step,
            "steps": list(seq_policy.steps),
        },
        **seq,
        "sequential": seq,
        "naive": naive,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return out


def acceptance(
    *,
    runs_aa: int = 500,
    runs_worse: int = 200,
    runs_better: int = 200,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """The issue's acceptance experiment in one call, with pass/fail per criterion.

    A/A false rollback ≤ 6 % (5 % plus Monte-Carlo allowance) and ≥ 90 % rollbacks of a 5-point worse
    canary; the naive rates are reported alongside, not judged.
    """
    aa = simulate("aa", runs_aa, seed=seed, **kwargs)
    worse = simulate("ab-worse", runs_worse, seed=seed + 1, **kwargs)
    better = simulate("ab-better", runs_better, seed=seed + 2, **kwargs)
    checks = {
        "aa_false_rollback_rate_le_0.06": aa["false_rollback_rate"] <= 0.06,
        "ab_worse_rollback_rate_ge_0.90": worse["rollback_rate"] >= 0.90,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "aa": aa,
        "ab-worse": worse,
        "ab-better": better,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``python -m rollout.simulate``) so the CLI can delegate to it unchanged."""
    ap = argparse.ArgumentParser(prog="chimera simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario (default 500 aa, 200 others)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--max-outcomes", type=int, default=DEFAULT_MAX_OUTCOMES)
    ap.add_argument("--canary-share", type=float, default=0.10)
    ap.add_argument("--p-base", type=float, default=0.60)
    ap.add_argument("--p-canary", type=float, default=None)
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--fixed-share", action="store_true", help="keep routing at canary-share after step-ups")
    args = ap.parse_args(argv)
    policy = RolloutPolicy(metric="success_rate", alpha=args.alpha, tau=args.tau)
    kw: dict[str, Any] = {
        "batch_size": args.batch_size,
        "max_outcomes": args.max_outcomes,
        "canary_share": args.canary_share,
        "p_base": args.p_base,
        "policy": policy,
        "follow_steps": not args.fixed_share,
    }
    if args.scenario == "all":
        if args.p_canary is not None:
            ap.error("--p-canary needs a single --scenario")
        n = args.runs
        res = acceptance(runs_aa=n or 500, runs_worse=n or 200, runs_better=n or 200, seed=args.seed, **kw)
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0 if res["passed"] else 1
    default_runs = 500 if args.scenario == "aa" else 200
    res = simulate(args.scenario, args.runs or default_runs, seed=args.seed, p_canary=args.p_canary, **kw)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RunResult:
    outcome: str  # "rollback" | "promote" | "none"
    outcomes: int  # total outcomes (both arms) at the terminal look, or the horizon
    canary_outcomes: int
    step_ups: int
    final_weight: int


def _run_one(
    policy: RolloutPolicy,
    base: np.ndarray,
    can: np.ndarray,
    route: np.ndarray,
    canary_share: float,
    batch_size: int,
    follow_steps: bool,
) -> _RunResult:
    # Each arm consumes its own pre-drawn stream in order; prefix slices are views, so no copying.
    weight = round(canary_share * 100)
    share = canary_share
    n_b = n_c = 0
    state = None
    step_ups = 0
    total = route.size
    for start in range(0, total, batch_size):
        end = min(start + batch_size, total)
        k = int(np.count_nonzero(route[start:end] < share))
        n_c += k
        n_b += end - start - k
        d, state = decide(policy, ArmData(base[:n_b]), ArmData(can[:n_c]), weight, state)
        if d.action == "rollback":
            return _RunResult("rollback", end, n_c, step_ups, weight)
        if d.action == "promote":
            return _RunResult("promote", end, n_c, step_ups, 100)
        if d.action == "step_up":
            step_ups += 1
            weight = d.next_weight
            if follow_steps:
                share = weight / 100.0
    return _RunResult("none", total, n_c, step_ups, weight)


def _summarise(scenario: str, results: list[_RunResult]) -> dict[str, Any]:
    runs = len(results)
    rb = [r for r in results if r.outcome == "rollback"]
    pr = [r for r in results if r.outcome == "promote"]
    rollback_rate = len(rb) / runs
    promotion_rate = len(pr) / runs

    def med(xs: list[int]) -> float | None:
        return float(np.median(xs)) if xs else None

    def se(p: float) -> float:
        return math.sqrt(p * (1.0 - p) / runs)

    return {
        "false_rollback_rate": rollback_rate if scenario in ("aa", "ab-better") else None,
        "rollback_rate": rollback_rate,
        "rollback_rate_se": se(rollback_rate),
        "median_outcomes_to_rollback": med([r.outcomes for r in rb]),
        "median_canary_outcomes_to_rollback": med([r.canary_outcomes for r in rb]),
        "p90_outcomes_to_rollback": float(np.quantile([r.outcomes for r in rb], 0.9)) if rb else None,
        "promotion_rate": promotion_rate,
        "promotion_rate_se": se(promotion_rate),
        "median_outcomes_to_promotion": med([r.outcomes for r in pr]),
        "undecided_rate": 1.0 - rollback_rate - promotion_rate,
        "step_up_rate": sum(1 for r in results if r.step_ups > 0) / runs,
    }


if __name__ == "__main__":
    raise SystemExit(main())
