"""The latency guardrail's rolling thresholds (rollout.lookdata.LookBuilder): what an operator relies on
is that start-up jitter cannot blind the guardrail for a whole period, a replica's warm-up is not
counted against it, and the controller (all rows at once) and the simulator (rows look by look) see
the same counts."""

from __future__ import annotations

import numpy as np

from rollout.lookdata import LookBuilder

BLOCK = 500


def feed(builder: LookBuilder, arm: np.ndarray, lat: np.ndarray, chunks: int = 1) -> None:
    n = arm.size
    units = np.arange(n)
    for part in np.array_split(np.arange(n), chunks):
        builder.add_requests(1, 10, arm[part], units[part], np.zeros(part.size, bool), lat[part])


def counts(builder: LookBuilder) -> tuple[tuple[int, int], tuple[int, int], float]:
    p = builder.data(10).periods[0]
    return p.latency_n, p.slow, p.latency_threshold_ms


def traffic(n: int, seed: int = 0, canary_factor: float = 1.0, jitter_first: int = 0):
    rng = np.random.default_rng(seed)
    arm = (rng.random(n) < 0.1).astype(np.int64)
    lat = rng.lognormal(np.log(5.0), 0.3, n)
    lat[arm == 1] *= canary_factor
    lat[:jitter_first] *= 40.0  # the first requests after start: 200 ms instead of 5
    return arm, lat


def test_counts_do_not_depend_on_how_rows_arrive() -> None:
    arm, lat = traffic(20_000, canary_factor=2.0)
    whole, pieces = LookBuilder("success_rate"), LookBuilder("success_rate")
    feed(whole, arm, lat)
    feed(pieces, arm, lat, chunks=37)
    assert counts(whole) == counts(pieces)


def test_first_block_only_calibrates_and_later_blocks_are_judged() -> None:
    arm, lat = traffic(20_000)
    b = LookBuilder("success_rate")
    feed(b, arm, lat)
    (nb, nc), _, _ = counts(b)
    first_block_end = int(np.searchsorted(np.cumsum(arm == 0), BLOCK)) + 1
    assert nb + nc == arm.size - first_block_end  # nothing of the first block counted, all else counted


def test_start_up_jitter_does_not_blind_the_guardrail() -> None:
    """The first 600 requests are 40x slower (a cold gateway). A threshold fixed from them would hide a
    2x slower canary for the rest of the period; the rolling threshold recovers within one block."""
    arm, lat = traffic(20_000, canary_factor=2.0, jitter_first=600)
    b = LookBuilder("success_rate")
    feed(b, arm, lat)
    (nb, nc), (sb, sc), threshold = counts(b)
    assert threshold < 20.0, threshold  # back near the steady baseline p99 (~10 ms), not ~400 ms
    assert sc / nc > 0.15 and sb / nb < 0.03, (sb, nb, sc, nc)


def test_a_a_shares_match_under_a_latency_drift() -> None:
    """Latency doubles for everyone half-way (load): both arms face the same thresholds, so their
    shares stay alike (the guardrail compares them, so a drift is not a canary effect)."""
    rng = np.random.default_rng(3)
    n = 60_000
    arm = (rng.random(n) < 0.1).astype(np.int64)
    lat = rng.lognormal(np.log(5.0), 0.3, n) * np.where(np.arange(n) < n // 2, 1.0, 2.0)
    b = LookBuilder("success_rate")
    feed(b, arm, lat, chunks=120)
    (nb, nc), (sb, sc), _ = counts(b)
    assert abs(sc / nc - sb / nb) < 0.01, (sb / nb, sc / nc)


def _latency_verdict(arm: np.ndarray, lat: np.ndarray, policy=None):  # noqa: ANN001, ANN202
    from rollout.decision import look
    from rollout.policy import RolloutPolicy

    policy = policy or RolloutPolicy()
    b = LookBuilder("success_rate", **policy.builder_options())
    feed(b, arm, lat, chunks=40)
    d, _ = look(policy, b.data(10))
    return d.guardrails[1]


def test_a_burst_of_slow_canary_requests_is_one_window_not_hundreds_of_requests() -> None:
    """The canary's replica stalls for ~3 windows (150 of its requests 10x slower, a few seconds of a
    CPU-starved or warming replica on a shared machine), otherwise A/A. Counted per request (binomial
    variance) that is overwhelming evidence and a rollback; over time windows it is three windows among
    ~390 and not a rollback. The window-free rule (latency_window larger than the traffic) still breaches:
    this test fails on the rule before time windows."""
    from rollout.policy import RolloutPolicy

    arm, lat = traffic(40_000, seed=5)
    canary_idx = np.flatnonzero(arm == 1)
    burst = canary_idx[(canary_idx > 10_000)][:150]
    lat[burst] *= 10.0
    assert not _latency_verdict(arm, lat).breached
    assert _latency_verdict(arm, lat, RolloutPolicy(latency_window=10**9, latency_min_windows=0)).breached


def test_a_sustained_slowdown_is_breached_and_window_variance_is_order_independent() -> None:
    arm, lat = traffic(20_000, seed=6, canary_factor=2.0)
    g = _latency_verdict(arm, lat)
    assert g.breached and g.observed > 0.2, g
    whole, pieces = LookBuilder("success_rate"), LookBuilder("success_rate")
    feed(whole, arm, lat)
    feed(pieces, arm, lat, chunks=53)
    a, b = whole.data(10).periods[0], pieces.data(10).periods[0]
    assert (a.latency_windows, a.latency_window_var) == (b.latency_windows, b.latency_window_var)
    assert a.latency_windows > 300


def test_the_guardrail_waits_for_enough_windows() -> None:
    """A canary 4x slower from the start, but only 9 windows after calibration: a replica's warm-up
    looks exactly like this, so nothing is decided until the windows can show whether it persists."""
    from rollout.policy import RolloutPolicy

    policy = RolloutPolicy()
    arm, lat = traffic(20_000, seed=7, canary_factor=4.0)
    base_before = np.cumsum(arm == 0) - (arm == 0)
    cut = int(np.searchsorted(base_before, BLOCK + (policy.latency_min_windows - 1) * policy.latency_window))
    assert not _latency_verdict(arm[:cut], lat[:cut]).breached
    assert _latency_verdict(arm[: cut + 200], lat[: cut + 200]).breached


def test_a_decision_stored_before_time_windows_is_recomputed_with_its_own_rule() -> None:
    """`chimera analyze` recomputes a stored decision with the policy stored with it. A decision stored
    before the latency time windows has no window fields: the auditor must get the per-request rule it
    was made with (this burst breaches under it), not today's defaults (which would not breach)."""
    import dataclasses

    from rollout.policy import RolloutPolicy
    from rollout.splits import stored_policy

    today = dataclasses.asdict(RolloutPolicy())
    assert stored_policy(today) == RolloutPolicy()
    before = {k: v for k, v in today.items() if k not in ("latency_window", "latency_min_windows")}
    arm, lat = traffic(40_000, seed=5)
    canary_idx = np.flatnonzero(arm == 1)
    lat[canary_idx[(canary_idx > 10_000)][:150]] *= 10.0
    assert _latency_verdict(arm, lat, stored_policy(before)).breached
    assert not _latency_verdict(arm, lat, stored_policy(today)).breached
