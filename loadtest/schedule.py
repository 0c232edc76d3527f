"""Arrival schedules for open-loop load: when each request *should* be sent, independent of when
earlier requests come back.

A run of `total_s` seconds at `rate` requests/s is split across `n_workers` processes. Each worker
gets its own share of the schedule so together they produce exactly the target process:

- constant: global arrival k is due at k / rate; worker i takes every k with k % n_workers == i, so
  the merged stream is evenly spaced (not n_workers simultaneous bursts).
- poisson: each worker draws an independent Poisson process at rate / n_workers; the superposition
  of independent Poisson processes is a Poisson process at the full rate.

Schedules are generators of offsets in seconds from the run's start, so a long run at a high rate
does not hold millions of floats in memory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Literal

Arrival = Literal["constant", "poisson"]
ARRIVALS: tuple[str, ...] = ("constant", "poisson")


def worker_schedule(rate: float, total_s: float, worker: int, n_workers: int,
                    arrival: Arrival = "constant", seed: int = 0) -> Iterator[float]:
    """Offsets (seconds from the run's start, ascending, all < total_s) of this worker's arrivals."""
    if rate <= 0:
        raise ValueError(f"rate: must be > 0, got {rate}")
    if total_s <= 0:
        raise ValueError(f"total_s: must be > 0, got {total_s}")
    if not 0 <= worker < n_workers:
        raise ValueError(f"worker: must be within 0..{n_workers - 1}, got {worker}")
    if arrival == "constant":
        return _constant(rate, total_s, worker, n_workers)
    if arrival == "poisson":
        return _poisson(rate / n_workers, total_s, random.Random(f"{seed}:{worker}"))
    raise ValueError(f"arrival: must be one of {', '.join(ARRIVALS)}, got {arrival!r}")


def _constant(rate: float, total_s: float, worker: int, n_workers: int) -> Iterator[float]:
    # Computed from the index (not by accumulating 1/rate) so there is no floating-point drift.
    n_total = math.ceil(total_s * rate - 1e-9)
    for k in range(worker, n_total, n_workers):
        yield k / rate


def _poisson(rate: float, total_s: float, rng: random.Random) -> Iterator[float]:
    t = rng.expovariate(rate)
    while t < total_s:
        yield t
        t += rng.expovariate(rate)


def expected_arrivals(rate: float, total_s: float) -> int:
    """Arrivals a constant schedule makes over total_s (the Poisson one makes this many on average)."""
    return math.ceil(total_s * rate - 1e-9)
