"""Routing policy: exact shares, sticky keys, and monotone growth of a canary."""

from __future__ import annotations

from scipy.stats import binom

from gateway.serving.router import Router

KEYS = [f"account-{i}" for i in range(10_000)]


def test_every_share_within_its_999_binomial_interval() -> None:
    weights = {1: 70, 2: 20, 3: 10}
    router = Router(weights)
    routed = [router.route(k) for k in KEYS]
    for version, weight in weights.items():
        lo, hi = binom.interval(0.999, len(KEYS), weight / 100)
        assert lo <= routed.count(version) <= hi, (version, routed.count(version), lo, hi)


def test_same_key_same_version_across_router_instances() -> None:
    a, b = Router({1: 90, 2: 10}), Router({2: 10, 1: 90})
    assert [a.route(k) for k in KEYS] == [b.route(k) for k in KEYS]


def test_raising_canary_keeps_every_key_that_was_on_it() -> None:
    before = Router({1: 90, 2: 10})
    after = Router({1: 80, 2: 20})
    on_canary = [k for k in KEYS if before.route(k) == 2]
    assert on_canary and all(after.route(k) == 2 for k in on_canary)
    moved = sum(1 for k in KEYS if before.route(k) != after.route(k))
    # Only keys joining the canary move: about 10 % of all keys, never keys leaving it.
    lo, hi = binom.interval(0.999, len(KEYS), 0.10)
    assert lo <= moved <= hi


def test_weight_zero_gets_no_traffic_and_no_key_routes_at_random() -> None:
    router = Router({1: 100, 2: 0})
    assert {router.route(k) for k in KEYS[:2000]} == {1}
    unkeyed = Router({1: 50, 2: 50})
    assert {unkeyed.route("") for _ in range(200)} == {1, 2}
