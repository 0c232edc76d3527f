"""Acceptance of the rollout decision path by simulation (rollout.simulate): generated rows through the
controller's own builder, look() and split arithmetic, for every scenario of issue 14.

Run counts here fit `make test`'s budget (about two minutes on two cores); the 1,000-run table is in
docs/statistics.md with the command that made it. The cheap scenarios that end early (worse, failing,
slow canaries) run at or near full count (the worse canary at 1,000); the A/A scenarios, which run to
the 20,000-request horizon, at a count where the checks still fail if a rate is grossly off (they are
deterministic for a seed)."""

from __future__ import annotations

import json

import pytest

from rollout.simulate import SCENARIOS, check, main, simulate, wilson

SEED = 2026


@pytest.mark.parametrize("name", ["aa", "aa-p10", "aa-rare", "aa-heavy", "aa-sticky", "aa-errors",
                                  "aa-latency", "aa-bursts", "aa-cold", "aa-step", "aa-delayed",
                                  "aa-few-keys", "aa-heavy-sticky-step", "aa-error-bursts"])
def test_aa_scenarios_neither_roll_back_nor_promote_beyond_alpha(name):
    """40 runs per scenario (the suite's budget): consistent with <= 5 % (the Wilson interval reaches
    below 5 %) and far from the rates the issue measured before (8.7 % to 97 %). The 1,000-run
    acceptance is the documented command (docs/statistics.md)."""
    r = simulate(name, 40, seed=SEED)
    assert r["rollback"]["ci_low"] <= 0.05 and r["promotion"]["ci_low"] <= 0.05, r
    assert r["rollback"]["rate"] <= 0.10 and r["promotion"]["rate"] <= 0.10, r
    if name in ("aa-latency", "aa-bursts", "aa-cold"):  # latency noise, bursts, a cold canary replica
        assert "latency" not in r["rollbacks_by"], r
    if name == "aa-error-bursts":  # a replica down for 5 s: 16 % error rollbacks on per-request variance
        assert "error_rate" not in r["rollbacks_by"], r


@pytest.fixture(scope="module")
def ab_worse() -> dict:
    """The 5-pp-worse canary at the full 1,000 runs (about 30 s with two workers: the runs stop early);
    300 runs gave 94.3 %, a count too small to judge a 95 % threshold."""
    return simulate("ab-worse", 1000, seed=SEED, workers=2)


def test_five_point_worse_canary_is_rolled_back_fast(ab_worse):
    assert ab_worse["rollback"]["rate"] >= 0.95, ab_worse
    assert ab_worse["promotion"]["rate"] == 0.0


def test_five_point_worse_canary_median_outcomes_meets_the_6000_target(ab_worse):
    """The issue's target, not loosened: a median of at most 6,000 outcomes to roll back. At the mixture's
    former point mass of 0.8 it was 6,025 on these seeds; at 0.9 (the default since 2026-12-04) 5,950.
    The median's sampling error at 1,000 runs is about 50 outcomes (docs/statistics.md says so)."""
    assert ab_worse["median_outcomes_to_rollback"] <= 6_000, ab_worse


def test_a_canary_failing_five_percent_of_requests_is_rolled_back_by_the_error_guardrail():
    """The power the windows keep: 5 % failures at random against none, margin 1 % (100 runs here;
    1,000 in docs/statistics.md)."""
    r = simulate("errors-worse", 100, seed=SEED)
    assert all(check(r).values()), r
    assert r["rollbacks_by"].get("error_rate", 0) >= 95 and r["promotion"]["rate"] == 0.0, r


def test_failing_canary_rolled_back_within_seconds_and_slow_canary_rolled_back():
    fail = simulate("fail", 200, seed=SEED)
    assert all(check(fail).values()), fail
    assert fail["rollbacks_by"] == {"error_rate": 200} and fail["max_seconds_to_rollback"] <= 10
    slow = simulate("slow", 200, seed=SEED)
    assert all(check(slow).values()) and slow["rollbacks_by"] == {"latency": 200}, slow


def test_srm_canary_is_held_never_promoted():
    r = simulate("srm", 30, seed=SEED)
    assert r["held_by_srm"]["rate"] >= 0.95 and r["promotion"]["rate"] == 0.0, r


def test_wilson_interval_and_checks():
    lo, hi = wilson(0, 1000)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.003 < hi < 0.004
    lo, hi = wilson(50, 1000)
    assert lo < 0.05 < hi and hi == pytest.approx(0.0653, abs=5e-4)
    fake = {"kind": "aa", "rollback": {"rate": 0.04, "ci_low": 0.03, "ci_high": 0.07},
            "promotion": {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.004}}
    assert check(fake)["false_rollback_ci_high_le_6.5pct"] is False


def test_deterministic_json_and_cli_entry(capsys):
    a = simulate("ab-worse", 6, seed=7)
    b = simulate("ab-worse", 6, seed=7)
    a.pop("elapsed_s")
    b.pop("elapsed_s")
    assert a == b
    json.dumps(a, allow_nan=False)
    assert main(["--scenario", "fail", "--runs", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "fail" and out["runs"] == 5 and all(out["checks"].values())
    with pytest.raises(ValueError):
        simulate("nope", 1)
    assert {"aa", "ab-worse", "fail", "slow", "srm", "aa-step", "aa-delayed"} <= set(SCENARIOS)
