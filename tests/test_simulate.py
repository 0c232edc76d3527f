"""Acceptance of the rollout policy by simulation: ab-worse at the issue's 200 runs; A/A here at 300
(its 500-run acceptance runs through the CLI in tests/test_cli.py)."""

from __future__ import annotations

import json

import pytest

from rollout.decision import RolloutPolicy
from rollout.simulate import main, simulate


@pytest.fixture(scope="module")
def aa() -> dict:
    return simulate("aa", 300, seed=100)


def test_aa_false_rollback_rate_within_alpha(aa):
    assert aa["scenario"] == "aa" and aa["runs"] == 300
    assert aa["false_rollback_rate"] <= 0.06


def test_naive_peeking_inflates_false_rollbacks(aa):
    naive = aa["naive"]["false_rollback_rate"]
    assert naive > 0.06
    assert naive >= 3 * max(aa["false_rollback_rate"], 0.01)


def test_ab_worse_is_rolled_back():
    r = simulate("ab-worse", 200, seed=200)  # the acceptance size
    assert r["p_canary"] == pytest.approx(0.55)
    assert r["rollback_rate"] >= 0.90
    assert r["median_outcomes_to_rollback"] is not None
    assert r["median_outcomes_to_rollback"] <= r["max_outcomes"]
    assert r["false_rollback_rate"] is None
    assert r["naive"]["rollback_rate"] >= r["rollback_rate"] - 0.05


def test_ab_better_is_promoted_not_rolled_back():
    r = simulate("ab-better", 60, seed=300)
    assert r["promotion_rate"] >= 0.85
    assert r["false_rollback_rate"] <= 0.05
    assert "promotion_rate" in r["naive"]


def test_simulation_is_deterministic_and_json_able():
    kw = {"seed": 7, "max_outcomes": 6_000, "batch_size": 200}
    a = simulate("ab-worse", 10, **kw)
    b = simulate("ab-worse", 10, **kw)
    a.pop("elapsed_s")
    b.pop("elapsed_s")
    assert a == b
    json.dumps(a, allow_nan=False)


def test_fixed_share_and_custom_policy():
    pol = RolloutPolicy(metric="success_rate", tau=0.03, min_samples_per_arm=100)
    r = simulate("ab-better", 10, seed=1, max_outcomes=8_000, policy=pol, follow_steps=False)
    assert r["policy"]["tau"] == 0.03 and r["follow_steps"] is False
    with pytest.raises(ValueError):
        simulate("ab-worse", 1, policy=RolloutPolicy(metric="brier"))
    with pytest.raises(ValueError):
        simulate("nope", 1)


def test_cli_entry(capsys):
    assert main(["--scenario", "ab-worse", "--runs", "5", "--max-outcomes", "4000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "ab-worse" and out["runs"] == 5
