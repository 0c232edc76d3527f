"""The paired shadow evaluation (rollout.paired): per-row loss differences, the two always-valid one-sided
decisions, the variance over routing keys, and the simulations of issue 18 at counts that fit make test
(the 1,000-run figures are in docs/statistics.md with the command that made them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rollout.paired import (
    PairedData,
    PairedPolicy,
    PairedState,
    loss_differences,
    paired_look,
)
from rollout.simulate import check, simulate

SEED = 2026


def _evaluate(policy: PairedPolicy, y, served, shadow, units=None, every: int = 50):
    data, state, d = PairedData(policy), None, None
    for i in range(0, len(y), every):
        sl = slice(i, i + every)
        data.add(y[sl], served[sl], shadow[sl], None if units is None else units[sl])
        d, state = paired_look(policy, data, state)
        if d.terminal:
            break
    return d, state, data


def test_loss_differences_use_the_canary_definitions_and_clip_log_loss():
    y = np.array([1.0, 0.0, 1.0])
    served = np.array([0.9, 0.2, 0.0])
    shadow = np.array([0.6, 0.2, 0.5])
    d = loss_differences("brier", y, served, shadow)
    assert d == pytest.approx([0.16 - 0.01, 0.0, 0.25 - 1.0])
    ll = loss_differences("log_loss", y, served, shadow, log_loss_eps=1e-4)
    # served scored the last row 0 for a success: clipped at 1e-4, it costs 9.21 nats, not 34.5
    assert ll[2] == pytest.approx(-math.log(0.5) + math.log(1e-4))
    with pytest.raises(ValueError):
        loss_differences("success_rate", y, served, shadow)


def test_policy_defaults_and_validation():
    p = PairedPolicy()
    assert (p.resolved_tau, p.resolved_margin) == (0.02, 0.01)
    assert PairedPolicy(metric="log_loss").resolved_margin == 0.025
    assert PairedPolicy.from_dict({**p.to_dict(), "unknown": 1}) == p
    for bad in ({"metric": "success_rate"}, {"alpha_worse": 0.0}, {"margin": -0.1}, {"min_pairs": 1},
                {"point_mass": 2.0}):
        with pytest.raises(ValueError):
            PairedPolicy(**bad)


def test_the_same_model_in_shadow_is_never_worse_and_passes_as_not_worse():
    """A shadow that is the served model gives d = 0 on every row: no evidence of harm, ever; the
    non-inferiority test passes as soon as min_pairs rows are in."""
    rng = np.random.default_rng(1)
    s = rng.random(1000)
    y = (rng.random(1000) < s).astype(float)
    d, state, _ = _evaluate(PairedPolicy(), y, s, s.copy())
    assert d.action == "not_worse" and d.n_pairs == 200 and state.p_worse == 1.0, d


def test_a_clearly_worse_shadow_is_called_worse_and_the_verdict_stays():
    rng = np.random.default_rng(2)
    n = 5000
    p = rng.random(n)
    y = (rng.random(n) < p).astype(float)
    shadow = np.clip(p + rng.normal(0, 0.35, n), 0, 1)  # much noisier
    d, state, data = _evaluate(PairedPolicy(), y, p, shadow)
    assert d.action == "worse" and d.effect > 0.0 and d.loss_shadow > d.loss_served, d
    assert "shadow worse" in d.reason and d.p_worse <= 0.05
    again, st2 = paired_look(PairedPolicy(), data, PairedState.from_dict(state.to_dict()))
    assert again.action == "worse" and st2.verdict == "worse"
    assert d.to_dict()["action"] == "worse"


def test_collecting_below_min_pairs_and_bad_rows_are_counted_not_used():
    policy = PairedPolicy(min_pairs=200)
    data = PairedData(policy)
    data.add(np.array([1.0, 0.5, np.nan, 0.0]), np.array([0.7, 0.7, 0.7, np.nan]), np.array([0.6] * 4))
    assert data.n == 1 and data.skipped == 3
    d, state = paired_look(policy, data)
    assert d.action == "continue" and "collecting" in d.reason and state.looks == 0


def test_variance_is_over_routing_keys():
    """Rows of one key that repeat the same difference are one piece of evidence, not five: with keys the
    variance of the mean difference matches the one-row-per-key data; ignoring the keys shrinks it ~5x."""
    rng = np.random.default_rng(3)
    k = 400
    p = rng.random(k)
    y = (rng.random(k) < p).astype(float)
    served, shadow = p, np.clip(p + rng.normal(0, 0.1, k), 0, 1)
    rep = np.repeat
    one = PairedData(PairedPolicy())
    one.add(y, served, shadow)
    keyed = PairedData(PairedPolicy())
    keyed.add(rep(y, 5), rep(served, 5), rep(shadow, 5), [f"key-{i}" for i in rep(np.arange(k), 5)])
    flat = PairedData(PairedPolicy())
    flat.add(rep(y, 5), rep(served, 5), rep(shadow, 5))
    assert keyed.units == k and keyed.n == 5 * k
    assert keyed.effect == pytest.approx(one.effect)
    assert keyed.variance == pytest.approx(one.variance, rel=1e-9)
    assert flat.variance < keyed.variance / 4.0


@pytest.mark.parametrize("name,runs", [("paired-aa", 100), ("paired-aa-logloss", 40),
                                       ("paired-aa-sticky", 40)])
def test_paired_aa_seldom_calls_an_equal_shadow_worse(name, runs):
    """An equally good shadow (independent errors): 'worse' fired anywhere within 20,000 rows (the test
    keeps running after 'not worse') in at most 5 %, allowing for the few runs; 'not worse' reached in
    most."""
    r = simulate(name, runs, seed=SEED)
    assert r["worse_ever"]["ci_low"] <= 0.05 and r["worse_ever"]["rate"] <= 0.10, r
    assert r["not_worse"]["rate"] >= 0.80, r


def test_a_shadow_worse_by_the_margin_is_seldom_called_not_worse():
    """The non-inferiority test's own guarantee: at δ = m (Brier +0.010) 'not worse' fired anywhere
    within 20,000 rows (the test keeps running after 'worse') in at most 5 %, allowing for the few runs."""
    r = simulate("paired-margin", 60, seed=SEED)
    assert r["not_worse_ever"]["ci_low"] <= 0.05 and r["not_worse_ever"]["rate"] <= 0.10, r


def test_paired_worse_shadow_needs_a_fraction_of_the_canary_outcomes():
    """Brier worse by 0.020: the paired test says 'worse' with at most a third (measured: well under a
    tenth) of the outcomes the unpaired 10 % canary needs on the same rows, and never 'not worse'."""
    r = simulate("paired-worse", 60, seed=SEED)
    assert all(check(r).values()), r
    assert r["canary_rollback"]["rate"] >= 0.9 and r["ratio_paired_to_canary"] <= 1 / 3, r


def test_method_scenarios_have_their_own_table_and_leave_the_canary_table_alone():
    from rollout import simulate_methods
    from rollout.simulate import table

    r = simulate("paired-worse", 3, seed=SEED)
    r["checks"] = check(r)
    assert table({"scenarios": [r]}).count("\n") == 1  # header lines only: not a canary row
    md = simulate_methods.table([r])
    assert md.count("\n") == 2 and "paired-worse" in md and "pairs to 'worse'" in md


def test_pairs_from_a_few_keys_keep_collecting():
    """2,000 pairs from five sticky clients, the shadow clearly worse: five keys give no estimate of how
    much a client's difference varies, so the evaluation keeps collecting (as the canary's primary test
    does below 10 keys an arm); the same rows over 40 clients decide."""
    rng = np.random.default_rng(4)
    n = 2000
    p = rng.random(n)
    y = (rng.random(n) < p).astype(float)
    shadow = np.clip(p + rng.normal(0, 0.35, n), 0, 1)
    for keys, action in ((5, "continue"), (40, "worse")):
        data = PairedData(PairedPolicy())
        data.add(y, p, shadow, [f"client-{i % keys}" for i in range(n)])
        d, _ = paired_look(PairedPolicy(), data)
        assert d.action == action and d.units == keys, d.reason
        assert ("10 keys" in d.reason) == (keys == 5), d.reason
