"""The controller's shadow look (rollout.shadow_gate.judge: all pairs so far, re-read at every look) and
the simulation's (rollout.simulate_methods.run_paired: pairs added look by look) are one test: on the
same rows they take the same decision at every look with the same p-values, so the simulated error
rates in docs/statistics.md are the controller's."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from registry.shadow_eval import PairedRows
from rollout.paired import PairedData, PairedPolicy, PairedState, paired_look
from rollout.shadow_gate import judge


def _rows(n: int, shadow_noise: float, seed: int, keys: int = 0) -> PairedRows:
    rng = np.random.default_rng(seed)
    eta = rng.normal(0.0, 1.2, n)
    y = (rng.random(n) < expit(eta)).astype(float)
    unit = [f"k{k}" for k in rng.integers(0, keys, n)] if keys else [f"r{i}" for i in range(n)]
    t = np.arange(n, dtype=float)
    served = expit(eta + rng.normal(0, 0.3, n))
    shadow = expit(eta + rng.normal(0, shadow_noise, n))
    return PairedRows(served=served, shadow=shadow, outcome=y, unit=unit, last_id=n, created=t,
                      outcome_at=t + 1.0)


def _prefix(rows: PairedRows, n: int) -> PairedRows:
    return PairedRows(rows.served[:n], rows.shadow[:n], rows.outcome[:n], rows.unit[:n], n, rows.created[:n],
                      rows.outcome_at[:n])


def _same_path(rows: PairedRows, policy: PairedPolicy, every: int = 50) -> list[str]:
    data = PairedData(policy)
    inc: PairedState | None = None
    ctl: PairedState | None = None
    actions = []
    for end in range(every, rows.outcome.size + 1, every):
        sl = slice(end - every, end)
        data.add(rows.outcome[sl], rows.served[sl], rows.shadow[sl], rows.unit[sl])
        a, inc = paired_look(policy, data, inc)
        b, ctl = judge(policy, _prefix(rows, end), ctl, until=float(end))
        assert a.action == b.action and a.n_pairs == b.n_pairs and a.units == b.units
        for f in ("p_worse", "p_not_worse", "effect"):
            assert abs(getattr(a, f) - getattr(b, f)) <= 1e-12, (end, f)
        actions.append(b.action)
    return actions


def test_the_controller_look_is_the_simulated_look() -> None:
    policy = PairedPolicy(metric="brier")
    assert "not_worse" in _same_path(_rows(2000, 0.3, seed=1), policy)
    assert "worse" in _same_path(_rows(2000, 2.0, seed=2), policy)
    assert _same_path(_rows(1500, 0.3, seed=3, keys=40), PairedPolicy(metric="log_loss"))


def test_immature_pairs_are_left_out() -> None:
    rows = _rows(1000, 0.3, seed=4)
    d, _ = judge(PairedPolicy(), rows, None, until=1000.0, outcome_delay_s=500.0)
    assert d.n_pairs == 501  # requests logged at t = 0..500 (outcomes 1 s later, within the delay)
    late = PairedRows(rows.served, rows.shadow, rows.outcome, rows.unit, rows.last_id, rows.created,
                      rows.created + 600.0)
    d, _ = judge(PairedPolicy(), late, None, until=2000.0, outcome_delay_s=500.0)
    assert d.n_pairs == 0  # every outcome came after the delay: none counts
