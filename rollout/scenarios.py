"""The simulated worlds of ``chimera simulate`` (rollout.simulate runs them): one ``Scenario`` per
world, and the list in the order that fixes each scenario's random stream. New scenarios are appended,
so the ones before them keep their seeds and the figures in docs/statistics.md stay reproducible. Kept
apart from the runner so the catalogue of cases reads on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    """One simulated world. ``kind``: aa (no difference), worse, better, srm, fail, slow."""

    name: str
    kind: str
    description: str
    metric: str = "success_rate"
    p: float = 0.5
    p_canary: float | None = None
    canary_weight: int = 10
    actual_share: float | None = None  # SRM: the share the canary really receives
    keys: int = 0  # sticky routing over this many keys (0: every request its own unit)
    key_zipf: float = 0.0  # > 0: a key's share of requests falls as rank^-key_zipf (few large keys)
    icc: float = 0.0  # within-key correlation of outcomes (sticky)
    heavy_tail: bool = False  # lognormal(0, 1.5) - 1 outcomes
    error_rate: float = 0.0
    slow_share: float = 0.0  # share of requests (both arms) that are slow_factor x slower
    slow_factor: float = 5.0
    canary_latency_factor: float = 1.0
    stall_s: float = 0.0  # each arm's replica stalls on its own: slots of this length ...
    stall_prob: float = 0.0  # ... each stalled with this probability (requests in it slow_factor x slower)
    fail_s: float = 0.0  # each arm's replica fails on its own: slots of this length ...
    fail_prob: float = 0.0  # ... each failed with this probability (every request of that arm in it fails)
    cold_s: float = 0.0  # the canary's replica is cold for this long after the canary starts ...
    cold_factor: float = 1.0  # ... and its requests are this much slower meanwhile
    canary_fails: bool = False
    canary_error_rate: float = 0.0  # the canary alone fails this share of its requests (independently)
    step_at: float | None = None  # operator step at this fraction of the run ...
    step_to: int = 50  # ... to this canary weight ...
    p_after_step: float | None = None  # ... while the base rate moves to this
    delay_success_s: float = 0.0  # mean exponential outcome delay of successes / failures
    delay_failure_s: float = 0.0
    canary_delay_factor: float = 1.0  # the canary's outcomes take this much longer to arrive
    policy: dict[str, Any] = field(default_factory=dict)
    shadow_noise: float = 0.5  # paired: the shadow's score noise on the log-odds (0.5: as good as served)
    covariate_r2: float = 0.0  # cuped: share of the outcome's variance the covariate explains
    rows: int = 0  # requests per run when the scenario needs its own horizon (0: max_requests)
    # The production model's score for each row, the covariate a default policy adjusts by (rollout.simulate):
    # its correlation with the latent normal that draws the row's outcome (0: uninformative).
    covariate_rho: float = 0.6
    covariate_drift: bool = False  # the score follows the base rate (shifts by its normal quantile)
    covariate_missing: float = 0.0  # share of canary rows whose score the mirror lost (NaN)


SCENARIO_LIST: tuple[Scenario, ...] = (
    Scenario("aa", "aa", "A/A, binary p = 0.5"),
    Scenario("aa-p10", "aa", "A/A, binary p = 0.1", p=0.1),
    Scenario("aa-rare", "aa", "A/A, rare binary p = 0.02", p=0.02),
    Scenario("aa-heavy", "aa", "A/A, heavy tail lognormal(0, 1.5) - 1 (mean_outcome, winsorised)",
             metric="mean_outcome", heavy_tail=True, policy={"tau": 0.5}),
    Scenario("aa-sticky", "aa", "A/A, sticky routing over 5,000 keys, within-key correlation 0.05",
             keys=5000, icc=0.05),
    Scenario("aa-errors", "aa", "A/A, 2 % errors in both arms", error_rate=0.02),
    Scenario("aa-latency", "aa", "A/A, 1.5 % of requests 5x slower in both arms", slow_share=0.015),
    Scenario("aa-bursts", "aa", "A/A, each arm's replica stalls on its own (1 s slots, 1 % stalled, 5x "
             "slower): slow requests come in bursts", stall_s=1.0, stall_prob=0.01),
    Scenario("aa-cold", "aa", "A/A, the canary's new replica is 4x slower for its first 15 s (warm-up)",
             cold_s=15.0, cold_factor=4.0),
    Scenario("aa-step", "aa", "A/A, split 10 -> 50 % while the base rate moves 0.60 -> 0.50",
             p=0.6, step_at=0.5, step_to=50, p_after_step=0.5),
    Scenario("aa-delayed", "aa", "A/A, outcomes delayed (mean 60 s successes, 20 s failures; window 120 s)",
             delay_success_s=60.0, delay_failure_s=20.0, policy={"outcome_delay_s": 120.0}),
    Scenario("ab-worse", "worse", "canary 0.45 vs baseline 0.50 at 10 %", p=0.5, p_canary=0.45),
    Scenario("ab-better", "better", "canary 0.55 vs baseline 0.50 at 10 %", p=0.5, p_canary=0.55),
    Scenario("fail", "fail", "canary fails every request (no outcome ever)", canary_fails=True),
    Scenario("slow", "slow", "canary 2x slower (every request)", canary_latency_factor=2.0),
    Scenario("srm", "srm", "10 % canary that actually receives 7 % (A/A outcomes)", actual_share=0.07),
    # Issue 18 (rollout.simulate_methods); appended, so the scenarios above keep their seeds.
    Scenario("paired-aa", "paired-aa", "paired shadow A/A, Brier: shadow and served equally good, "
             "independent errors", metric="brier"),
    Scenario("paired-aa-logloss", "paired-aa", "paired shadow A/A, log-loss (scores clipped at 1e-4)",
             metric="log_loss"),
    Scenario("paired-aa-sticky", "paired-aa", "paired shadow A/A, Brier, 2,000 sticky keys holding half "
             "the variance of the log-odds and of each model's error", metric="brier", keys=2000, icc=0.5),
    Scenario("paired-worse", "paired-worse", "shadow's Brier worse by 0.020 (0.205 vs 0.185); reference: "
             "the same rows through a 10 % Brier canary", metric="brier", shadow_noise=0.96, rows=50_000),
    Scenario("cuped-aa", "cuped-aa", "A/A at p = 0.5, covariate-adjusted by the production score "
             "(R^2 = 0.4)", covariate_r2=0.4),
    Scenario("cuped-worse", "cuped-worse", "canary 0.45 vs 0.50 at 10 %, adjusted by a covariate with "
             "R^2 = 0.4, against the unadjusted canary on the same rows", p=0.5, p_canary=0.45,
             covariate_r2=0.4),
    Scenario("paired-margin", "paired-margin", "shadow's Brier worse by 0.010, the non-inferiority margin "
             "itself (0.1955 vs 0.1854): 'not worse' would be wrong", metric="brier", shadow_noise=0.76),
    # Few large clusters (a review, 2026-12-07): appended, so the scenarios above keep their seeds.
    Scenario("aa-few-keys", "aa", "A/A, sticky routing over 300 keys of Zipf(1.1) sizes (the largest ~20 % "
             "of requests), within-key correlation 0.05, split 10 -> 50 % halfway (keys change arms)",
             keys=300, key_zipf=1.1, icc=0.05, step_at=0.5, step_to=50),
    Scenario("aa-heavy-sticky-step", "aa", "A/A, heavy tail (as aa-heavy) over 2,000 sticky keys, split "
             "10 -> 50 % halfway: the cross-period variance on winsorised heavy-tailed outcomes",
             metric="mean_outcome", heavy_tail=True, policy={"tau": 0.5}, keys=2000, step_at=0.5, step_to=50),
    # Bursts of errors (2026-12-07): appended, so the scenarios above keep their seeds.
    Scenario("aa-error-bursts", "aa", "A/A, each arm's replica fails on its own (5 s slots, 1 % failed: "
             "every request of that arm in the slot fails, as while a replica restarts): errors come in "
             "bursts", fail_s=5.0, fail_prob=0.01),
    Scenario("errors-worse", "errors", "canary fails 5 % of its requests, at random (baseline 0 %; margin "
             "1 %)", canary_error_rate=0.05),
    # Outcomes that arrive late with no outcome_delay_s declared (2026-12-07): the controller counts what
    # has arrived by each look, so these run its own look on every row (rollout.simulate, path).
    Scenario("aa-late-undeclared", "aa", "A/A, outcomes delayed (mean 60 s successes, 20 s failures) with "
             "no outcome window declared: each look counts what has arrived", delay_success_s=60.0,
             delay_failure_s=20.0),
    Scenario("aa-canary-late", "aa", "A/A outcomes, but the canary's arrive 3x later (mean 180 s / 60 s "
             "against 60 s / 20 s), no window declared: early canary outcomes are mostly failures",
             delay_success_s=60.0, delay_failure_s=20.0, canary_delay_factor=3.0),
    Scenario("aa-step-covariate-gaps", "aa", "A/A, split 10 -> 50 % while the base rate moves 0.60 -> 0.50, "
             "the production score following it, and 20 % of canary rows without a score (the mirror "
             "dropped them): the covariate stand-ins under drift", p=0.6, step_at=0.5, step_to=50,
             p_after_step=0.5, covariate_drift=True, covariate_missing=0.2),
)
SCENARIOS: dict[str, Scenario] = {s.name: s for s in SCENARIO_LIST}
