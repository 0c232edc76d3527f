"""The generated rows of one simulated rollout (``rollout.simulate``): what each request would be, drawn
once before the run, and the columns of a block of requests once the split of the moment has routed it.

Kept apart from the runner so the world (who fails, how slow, which outcome, when it arrives, what the
production model's score says) reads on its own, and the runner only feeds rows to the controller's
builder and looks. The draws are made in a fixed order and every new kind of draw is appended after the
others, so the scenarios that existed before it keep their random streams, and the figures in
docs/statistics.md stay reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from rollout.scenarios import Scenario


@dataclass(frozen=True)
class World:
    """Per request (index = arrival order): time ``t`` (s), routing draw and unit, outcome draws, latency,
    failure draws, outcome delay draw, and the covariate's parts (the outcome's latent normal, the
    score's own noise, whether a canary row loses it); per replica slot, the stall and outage draws of
    each arm."""

    t: np.ndarray
    u_route: np.ndarray
    key: np.ndarray
    p_key: np.ndarray | None
    u_out: np.ndarray
    z: np.ndarray
    latency: np.ndarray
    err: np.ndarray
    delay_draw: np.ndarray
    stalled: np.ndarray | None
    down: np.ndarray | None
    canary_err: np.ndarray | None
    latent: np.ndarray
    x_noise: np.ndarray
    x_missing: np.ndarray | None


@dataclass(frozen=True)
class Block:
    """A routed block's columns as the gateway would log them: failure, latency (ms), the outcome the
    request will get, how long after it the outcome arrives (s), and the covariate (NaN: lost)."""

    failed: np.ndarray
    latency: np.ndarray
    value: np.ndarray
    delay: np.ndarray
    x: np.ndarray


def draw(sc: Scenario, rng: np.random.Generator, n: int, rate: float) -> World:
    """Every draw of one run, in the order that fixes the scenarios' random streams (module docstring)."""
    t = np.arange(n) / rate
    u_route = rng.random(n)
    key = np.arange(n, dtype=np.int64)
    p_key = None
    if sc.keys:
        if sc.key_zipf:
            share = np.arange(1, sc.keys + 1, dtype=np.float64) ** -sc.key_zipf
            key = rng.choice(sc.keys, n, p=share / share.sum())
        else:
            key = rng.integers(0, sc.keys, n)
        key_u = rng.random(sc.keys)
        u_route = key_u[key]
        if sc.icc > 0.0:  # beta-distributed per-key rate: correlation icc = 1 / (a + b + 1)
            s = 1.0 / sc.icc - 1.0
            p_key = rng.beta(sc.p * s, (1.0 - sc.p) * s, sc.keys)[key]
    u_out = rng.random(n)
    z = rng.standard_normal(n)
    lat = np.exp(np.log(5.0) + 0.35 * rng.standard_normal(n))
    if sc.slow_share:
        lat = np.where(rng.random(n) < sc.slow_share, lat * sc.slow_factor, lat)
    err = rng.random(n) < sc.error_rate if sc.error_rate else np.zeros(n, dtype=bool)
    delay_draw = rng.exponential(1.0, n)
    stalled = None
    if sc.stall_prob:
        stalled = rng.random((2, int(t[-1] // sc.stall_s) + 1)) < sc.stall_prob
    down = None
    if sc.fail_prob:
        down = rng.random((2, int(t[-1] // sc.fail_s) + 1)) < sc.fail_prob
    canary_err = rng.random(n) < sc.canary_error_rate if sc.canary_error_rate else None
    # The covariate: the production model's score, correlated covariate_rho with the latent normal that
    # draws the outcome (z, or the normal quantile of u_out: a high x means a likely success), known
    # before routing and alike in both arms (block() puts it together).
    latent = z if sc.heavy_tail else -special.ndtri(u_out)
    x_noise = rng.standard_normal(n)
    x_missing = rng.random(n) < sc.covariate_missing if sc.covariate_missing else None
    return World(t, u_route, key, p_key, u_out, z, lat, err, delay_draw, stalled, down, canary_err, latent,
                 x_noise, x_missing)


def block(sc: Scenario, w: World, sl: slice, arm: np.ndarray, p_now: float) -> Block:
    """The columns of requests ``sl`` once routed to ``arm`` (1: canary), at base rate ``p_now``."""
    t = w.t[sl]
    f = w.err[sl] | ((arm == 1) & sc.canary_fails)
    if w.down is not None:
        f = f | w.down[arm, (t // sc.fail_s).astype(np.int64)]
    if w.canary_err is not None:
        f = f | ((arm == 1) & w.canary_err[sl])
    la = w.latency[sl] * np.where(arm == 1, sc.canary_latency_factor, 1.0)
    if w.stalled is not None:
        la = la * np.where(w.stalled[arm, (t // sc.stall_s).astype(np.int64)], sc.slow_factor, 1.0)
    if sc.cold_s:
        la = la * np.where((arm == 1) & (t < sc.cold_s), sc.cold_factor, 1.0)
    la = np.where((arm == 1) & sc.canary_fails, np.nan, la)
    if sc.heavy_tail:
        v = np.exp(1.5 * w.z[sl]) - 1.0
    else:
        base_p = w.p_key[sl] if w.p_key is not None else np.full(t.size, p_now)
        if sc.p_canary is not None:
            base_p = np.where(arm == 1, sc.p_canary, base_p)
        v = (w.u_out[sl] < base_p).astype(np.float64)
    delay = np.where(v == 1.0, sc.delay_success_s, sc.delay_failure_s) * w.delay_draw[sl]
    if sc.canary_delay_factor != 1.0:
        delay = delay * np.where(arm == 1, sc.canary_delay_factor, 1.0)
    latent = w.latent[sl]
    if sc.covariate_drift and not sc.heavy_tail:  # v = 1 exactly when latent + ndtri(p_now) > 0
        latent = latent + special.ndtri(p_now)
    x = sc.covariate_rho * latent + math.sqrt(1.0 - sc.covariate_rho ** 2) * w.x_noise[sl]
    if w.x_missing is not None:  # only the canary's rows depend on the mirror
        x = np.where((arm == 1) & w.x_missing[sl], np.nan, x)
    return Block(f, la, v, delay, x)
