"""`chimera bench --soak S`: Predict at 70 % of the measured c=64 throughput for S seconds while the
gateway's resident memory is sampled; the target is RSS growth from the first minute to the end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loadtest.bench_procs import rss_mb
from loadtest.closed_loop import LoadResult, LoadSpec, run


def soak(pid: int, spec: LoadSpec, max_rps: float, seconds: float, log: Callable[[str], None],
         runner: Callable[[LoadSpec], LoadResult] = run) -> dict[str, Any]:
    """Predict at 70 % of `max_rps` for `seconds`; RSS after 1 min and at the end (for soaks shorter
    than 2 minutes, after 1/3 of the run instead of 1 min). `runner` is the bench's load client."""
    rate = 0.7 * max_rps
    first_at = 60.0 if seconds >= 120 else seconds / 3
    log(f"soak: {seconds:.0f} s at {rate:.0f} req/s (70 % of {max_rps:.0f}) ...")
    soak_spec = replace(spec, concurrency=64, rate=rate, duration_s=seconds, warmup_s=0.0, timeout_s=10.0)
    result: dict[str, Any] = {}
    samples: list[tuple[float, float]] = []

    def load() -> None:
        result["load"] = runner(soak_spec)

    t = threading.Thread(target=load, name="soak-load")
    started = time.monotonic()
    t.start()
    rss_first: float | None = None
    # Sample often enough that even a seconds-long --quick soak gets its first reading in time.
    every = min(5.0, max(0.2, seconds / 20))
    startup = 2.0 if seconds >= 120 else 0.0  # the load client's own start-up
    while t.is_alive():
        t.join(every)
        elapsed = time.monotonic() - started
        try:
            rss = rss_mb(pid)
        except (OSError, RuntimeError):
            break
        samples.append((round(elapsed, 1), round(rss, 1)))
        if rss_first is None and elapsed >= first_at + startup:
            rss_first = rss
    rss_end = rss_mb(pid)
    load_res: LoadResult = result["load"]
    growth = (rss_end / rss_first - 1.0) if rss_first else None
    out = {"seconds": seconds, "target_rps": rate, "achieved_rps": load_res.rps,
           "p99_ms": load_res.p99_ms, "errors": load_res.errors, "rss_mb_first": rss_first,
           "rss_first_at_s": first_at, "rss_mb_end": rss_end, "rss_growth": growth, "rss_samples": samples}
    log(f"soak: rss {rss_first} MiB at {first_at:.0f} s -> {rss_end:.1f} MiB at the end "
        f"({(growth or 0) * 100:+.1f} %), {load_res.rps:.0f} req/s, p99 {load_res.p99_ms:.1f} ms")
    return out
