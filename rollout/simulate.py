"""Monte-Carlo check of the rollout controller's decision path: generated rows through the builder the
controller picks (``rollout.covariate.make_builder``: covariate-adjusted for a business metric under the
default policy), its own ``rollout.decision.look`` and the split arithmetic of ``rollout.splits``.

Each run is a stream of routed requests (``rate`` per second, ``max_requests`` in all) with a look
every ``look_every`` requests, as the controller looks every second. A request is routed by the split
of the moment (per request, or per routing key with sticky routing: a key's uniform draw against the
canary share, which is how rendezvous hashing behaves), logged with its period (split revision),
failure, latency and the production model's score (the covariate), and gets an outcome after its
delay (``rollout.simworld`` draws them). The builder receives the requests at once and the outcomes
once the policy's outcome window has closed, as the controller reads them; ``path="checked"`` runs the
controller's own look (``rollout.controller.decide`` on every row so far) beside each look and fails
at the first difference (``rollout.controller_mirror``). A step-up moves the split with
``rollout.splits.step_up`` and starts a new period; a rollback or promotion ends the run.

Scenarios (``SCENARIOS``, listed in rollout.scenarios) are the issue's table and its extra cases. A/A
scenarios report the false rollback and false promotion rates with Wilson 95 % intervals; the worse
canaries report the rollback rate and the median matured outcomes (both arms) at the rolling-back
look; the SRM canary the share of runs held by the sample-ratio check. ``acceptance`` applies the
issue's thresholds.

The scenarios of issue 18 (kinds ``paired-*`` and ``cuped-*``, at the end of the list) run the paired
shadow evaluation and the covariate-adjusted canary against their unpaired / unadjusted references on
the same generated rows: ``rollout.simulate_methods``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rollout import simulate_methods as methods
from rollout import simworld, splits
from rollout.blas import one_blas_thread
from rollout.controller_mirror import ControllerMirror, ControllerPathMismatch
from rollout.covariate import AdjustedBuilder, make_builder
from rollout.decision import SequentialState, look
from rollout.lookdata import LookBuilder
from rollout.policy import RolloutPolicy
from rollout.scenarios import SCENARIO_LIST, SCENARIOS, Scenario

BASE, CANARY = 1, 2  # version numbers in the simulated split


DEFAULT_MAX_REQUESTS = 20_000
DEFAULT_LOOK_EVERY = 50
DEFAULT_RATE = 50.0  # requests per second: a look every 50 requests is the controller's 1 s interval


@dataclass(frozen=True)
class RunResult:
    outcome: str  # rollback | promote | none
    outcomes: int  # matured outcomes, both arms, at the end
    canary_outcomes: int
    seconds: float
    guardrail: str | None
    srm: bool
    step_ups: int


PATHS = ("incremental", "controller", "checked")


def run_once(sc: Scenario, rng: np.random.Generator, *, max_requests: int = DEFAULT_MAX_REQUESTS,
             look_every: int = DEFAULT_LOOK_EVERY, rate: float = DEFAULT_RATE, covariate: bool = True,
             path: str = "incremental") -> RunResult:
    """One simulated rollout through the controller's builder, look and split arithmetic.

    ``covariate``: the default policy, which adjusts business metrics by the production model's score
    (``make_builder`` picks the covariate-adjusted builder, as the controller does when the gateway
    mirrors canary rows); False: the covariate off (``covariate: ""`` in a rollout config), the
    unadjusted builder.

    ``path``: how the rows reach ``look``. ``incremental`` feeds the builder what is new at each look
    (fast: the 1,000-run tables); ``controller`` runs the live controller's own look on every row
    logged so far (``rollout.controller.decide`` through ``rollout.controller_mirror``: O(rows) a look,
    as live); ``checked`` runs both and raises ``ControllerPathMismatch`` where they disagree. Outcomes
    that arrive late without a declared ``outcome_delay_s`` always take the controller path: the
    incremental feed takes an outcome once, at maturity, while the controller counts whatever has
    arrived by each look, and more at the next.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    policy = RolloutPolicy(metric=sc.metric, **{**sc.policy, **({} if covariate else {"covariate": None})})
    n = max_requests
    world = simworld.draw(sc, rng, n, rate)
    t = world.t
    window = policy.outcome_delay_s
    path = path_for(sc, path)
    builder = make_builder(policy, covariates_available=True) if path != "controller" else None
    weights = splits.canary_start(BASE, CANARY, sc.canary_weight)
    revision = 1
    weight_of = {revision: weights[CANARY]}  # each split revision's canary weight
    mirror = ControllerMirror(policy, n, BASE, CANARY) if path != "incremental" else None
    if mirror is not None:
        mirror.split(revision, weights, 0.0)
    state: SequentialState | None = None
    arm = np.zeros(n, dtype=np.int64)
    period = np.zeros(n, dtype=np.int64)
    value = np.full(n, np.nan)
    x = np.full(n, np.nan)  # the covariate each request was logged with
    failed = np.zeros(n, dtype=bool)
    matured_upto = 0
    step_ups = 0
    stepped = False
    p_now = sc.p
    for start in range(0, n, look_every):
        end = min(start + look_every, n)
        if sc.step_at is not None and not stepped and start >= sc.step_at * n:
            weights = splits.set_weight(weights, CANARY, sc.step_to)
            revision += 1
            weight_of[revision] = weights[CANARY]
            stepped = True
            p_now = sc.p_after_step if sc.p_after_step is not None else p_now
            if mirror is not None:
                mirror.split(revision, weights, float(t[start]))
        w = weights[CANARY]
        # SRM: the canary really receives actual_share where the split says canary_weight (scaled
        # with later steps); otherwise routing follows the split.
        share = w / 100.0 if sc.actual_share is None else sc.actual_share * w / sc.canary_weight
        sl = slice(start, end)
        a = (world.u_route[sl] < share).astype(np.int64)
        arm[sl], period[sl] = a, revision
        b = simworld.block(sc, world, sl, a, p_now)
        failed[sl], x[sl] = b.failed, b.x
        now = float(t[end - 1])
        if mirror is not None:
            mirror.log(sl, arm=a, revision=revision, unit=world.key[sl], created=t[sl], failed=b.failed,
                       latency_ms=b.latency, value=b.value, outcome_at=t[sl] + b.delay, covariate=b.x)
        d = None
        if builder is not None:
            value[sl] = np.where(b.delay <= window, b.value, np.nan) if window > 0.0 else b.value
            builder.add_requests(revision, w, a, world.key[sl], b.failed, b.latency)
            upto = end if window <= 0.0 else int(np.searchsorted(t, now - window, side="right"))
            if upto > matured_upto:
                _add_outcomes(builder, slice(matured_upto, upto), arm, period, world.key, x, value, failed,
                              weight_of)
                matured_upto = upto
            d, state = look(policy, builder.data(w), state)
        if mirror is not None:
            d = mirror.look(end, now, w, revision, d)
        assert d is not None
        if d.action in ("rollback", "promote"):
            return RunResult(d.action, d.n_baseline + d.n_canary, d.n_canary, now, d.guardrail, d.srm,
                             step_ups)
        if d.action == "step_up":
            weights = splits.step_up(weights, BASE, CANARY, d.next_weight)
            revision += 1
            weight_of[revision] = weights[CANARY]
            step_ups += 1
            if mirror is not None:
                mirror.split(revision, weights, now)
    return RunResult("none", d.n_baseline + d.n_canary, d.n_canary, float(t[-1]), None, d.srm, step_ups)


def path_for(sc: Scenario, path: str) -> str:
    """The path a run of ``sc`` takes when ``path`` is asked: the controller's own look where outcomes
    arrive late with no window declared (``run_once`` says why), else ``path``."""
    undeclared = RolloutPolicy(metric=sc.metric, **sc.policy).outcome_delay_s <= 0.0
    return "controller" if undeclared and (sc.delay_success_s or sc.delay_failure_s) else path


def _add_outcomes(builder: LookBuilder | AdjustedBuilder, ms: slice, arm: np.ndarray, period: np.ndarray,
                  key: np.ndarray, x: np.ndarray, value: np.ndarray, failed: np.ndarray,
                  weight_of: dict[int, int]) -> None:
    """The requests ``ms``, now matured, into the builder per split period; failed rows carry no outcome
    (as ``build_look_data``), and the covariate goes with them where the builder adjusts."""
    ok = ~failed[ms]
    for rev in np.unique(period[ms]):
        sel = ok & (period[ms] == rev)
        args = (int(rev), weight_of[int(rev)], arm[ms][sel], key[ms][sel], value[ms][sel])
        if isinstance(builder, AdjustedBuilder):
            builder.add_outcomes(*args, covariates=x[ms][sel])
        else:
            builder.add_outcomes(*args)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson 95 % interval for a binomial rate (sound at 0 events, unlike the normal interval)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1.0 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (0.0 if k == 0 else max(0.0, c - h), 1.0 if k == n else min(1.0, c + h))


def _chunk(args: tuple[str, int, int, int, dict[str, Any]]) -> list[RunResult]:
    name, seed, first, count, kw = args
    sc = SCENARIOS[name]
    seqs = np.random.SeedSequence([seed, SCENARIO_LIST.index(sc)]).spawn(first + count)[first:]
    runner = methods.RUNNERS.get(sc.kind)
    if runner is not None:  # the method comparisons choose their own builders and path
        kw = {k: v for k, v in kw.items() if k not in ("covariate", "path")}
    with one_blas_thread():  # the runs' sums, as in the look process (rollout.blas)
        return [(runner or run_once)(sc, np.random.default_rng(s), **kw) for s in seqs]


def simulate(name: str, runs: int, *, seed: int = 0, workers: int = 1, **kw: Any) -> dict[str, Any]:
    """``runs`` runs of scenario ``name``; JSON-able summary (rates with Wilson 95 % intervals)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    if runs < 1:
        raise ValueError("runs must be >= 1")
    sc = SCENARIOS[name]
    started = time.perf_counter()
    if workers > 1 and runs >= 2 * workers:
        size = math.ceil(runs / workers)
        jobs = [(name, seed, i, min(size, runs - i), kw) for i in range(0, runs, size)]
        with ProcessPoolExecutor(workers) as pool:
            results = [r for part in pool.map(_chunk, jobs) for r in part]
    else:
        results = _chunk((name, seed, 0, runs, kw))
    if sc.kind in methods.KINDS:
        return methods.summarise(sc, results, seed, time.perf_counter() - started, kw, wilson)
    return _summarise(sc, results, seed, time.perf_counter() - started, kw)


def _summarise(sc: Scenario, res: list[RunResult], seed: int, elapsed: float,
               kw: dict[str, Any]) -> dict[str, Any]:
    n = len(res)
    rb = [r for r in res if r.outcome == "rollback"]
    pr = [r for r in res if r.outcome == "promote"]
    held_srm = [r for r in res if r.outcome == "none" and r.srm]

    def rate(k: int) -> dict[str, float]:
        lo, hi = wilson(k, n)
        return {"rate": k / n, "ci_low": lo, "ci_high": hi}

    def med(xs: list[float]) -> float | None:
        return float(np.median(xs)) if xs else None

    guard: dict[str, int] = {}
    for r in rb:
        guard[r.guardrail or "primary"] = guard.get(r.guardrail or "primary", 0) + 1
    return {
        "scenario": sc.name, "kind": sc.kind, "description": sc.description, "runs": n, "seed": seed,
        "max_requests": kw.get("max_requests", DEFAULT_MAX_REQUESTS),
        "look_every": kw.get("look_every", DEFAULT_LOOK_EVERY),
        "covariate": kw.get("covariate", True), "path": path_for(sc, kw.get("path", "incremental")),
        "rollback": rate(len(rb)), "promotion": rate(len(pr)), "held_by_srm": rate(len(held_srm)),
        "srm_flagged": rate(sum(r.srm for r in res)),
        "rollbacks_by": guard,
        "median_outcomes_to_rollback": med([r.outcomes for r in rb]),
        "median_canary_outcomes_to_rollback": med([r.canary_outcomes for r in rb]),
        "median_seconds_to_rollback": med([r.seconds for r in rb]),
        "max_seconds_to_rollback": max((r.seconds for r in rb), default=None),
        "median_outcomes_to_promotion": med([r.outcomes for r in pr]),
        "step_up_rate": sum(r.step_ups > 0 for r in res) / n,
        "elapsed_s": round(elapsed, 2),
    }


def check(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's acceptance thresholds for one scenario's summary."""
    kind = result["kind"]
    if kind in methods.KINDS:
        return methods.check(result)
    rb, pr = result["rollback"], result["promotion"]
    if kind == "aa":
        return {"false_rollback_le_5pct": rb["rate"] <= 0.05, "false_rollback_ci_high_le_6.5pct":
                rb["ci_high"] <= 0.065, "false_promotion_le_5pct": pr["rate"] <= 0.05,
                "false_promotion_ci_high_le_6.5pct": pr["ci_high"] <= 0.065}
    if kind == "worse":
        med = result["median_outcomes_to_rollback"]
        return {"rollback_ge_95pct": rb["rate"] >= 0.95, "median_outcomes_le_6000": med is not None
                and med <= 6000}
    if kind == "better":
        return {"false_rollback_le_5pct": rb["rate"] <= 0.05, "false_rollback_ci_high_le_6.5pct":
                rb["ci_high"] <= 0.065}
    if kind == "srm":
        return {"held_ge_95pct": result["held_by_srm"]["rate"] >= 0.95, "never_promoted": pr["rate"] == 0.0}
    if kind == "fail":
        return {"rolled_back_always": rb["rate"] == 1.0, "within_10s": (result["max_seconds_to_rollback"]
                                                                        or math.inf) <= 10.0}
    if kind in ("slow", "errors"):
        return {"rollback_ge_95pct": rb["rate"] >= 0.95}
    return {}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``chimera simulate``); prints JSON, exits 1 when an acceptance check fails."""
    ap = argparse.ArgumentParser(prog="chimera simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (the runs are independent)")
    ap.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    ap.add_argument("--look-every", type=int, default=DEFAULT_LOOK_EVERY)
    ap.add_argument("--no-covariate", action="store_true",
                    help="the covariate off (covariate: \"\" in a rollout config: the unadjusted builder) "
                         "instead of the default")
    ap.add_argument("--path", choices=PATHS, default="incremental",
                    help="incremental (fast), controller (the live controller's look on all rows so far, "
                         "O(rows) a look) or checked (both; exit 2 at the first disagreement)")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry: the output is JSON")
    args = ap.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    kw = {"max_requests": args.max_requests, "look_every": args.look_every,
          "covariate": not args.no_covariate, "path": args.path}
    out = []
    for name in names:
        try:
            r = simulate(name, args.runs, seed=args.seed, workers=args.workers, **kw)
        except ControllerPathMismatch as exc:
            sys.stderr.write(f"{name}: the controller's look and the simulator's disagree: {exc}\n")
            return 2
        r["checks"] = check(r)
        out.append(r)
    passed = all(all(r["checks"].values()) for r in out)
    report: dict[str, Any] = out[0] if len(out) == 1 else {"passed": passed, "scenarios": out}
    json.dump(report, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0 if passed else 1


def table(report: dict[str, Any]) -> str:
    """Markdown table of a ``--scenario all`` report, as docs/statistics.md shows it (the issue-18
    scenarios have their own columns: ``rollout.simulate_methods.table``)."""
    def pct(r: dict[str, float]) -> str:
        return f"{100 * r['rate']:.1f} % ({100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f})"

    lines = ["| scenario | runs | rollback (95 % CI) | promotion (95 % CI) | held by SRM | median outcomes "
             "to rollback | median s to rollback | checks |", "|---|---|---|---|---|---|---|---|"]
    for r in report["scenarios"]:
        if r["kind"] in methods.KINDS:
            continue
        med = r["median_outcomes_to_rollback"]
        sec = r["median_seconds_to_rollback"]
        lines.append(f"| {r['scenario']}: {r['description']} | {r['runs']} | {pct(r['rollback'])} | "
                     f"{pct(r['promotion'])} | {pct(r['held_by_srm'])} | "
                     f"{'' if med is None else f'{med:,.0f}'} | {'' if sec is None else f'{sec:.0f}'} | "
                     f"{'pass' if all(r['checks'].values()) else 'FAIL'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
