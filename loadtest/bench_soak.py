"""`chimera bench --soak S`: Predict at 70 % of the measured c=64 throughput for S seconds while the
gateway's resident memory is sampled (and, apart, that of its rollout look process, rollout.lookprocess,
when the looks run in one: the target is the serving process's; the look process's peak is reported).
Issue 17's soak targets: no error, RSS growth from the first minute to the end, and p99 stable (the last
5 minutes within 1.5x the first 5). For the last one the load runs as back-to-back segments (5 minutes
each in a soak of 15 minutes or more, else thirds), each one run of the load client with its own
percentiles; the gap between two is the client's start-up."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loadtest.bench_procs import rss_mb, spawned_children
from loadtest.closed_loop import LoadResult, LoadSpec, run

SEGMENT_S = 300.0


def soak(pid: int, spec: LoadSpec, max_rps: float, seconds: float, log: Callable[[str], None],
         runner: Callable[[LoadSpec], LoadResult] = run) -> dict[str, Any]:
    """Predict at 70 % of `max_rps` for `seconds`; RSS after 1 min and at the end (for soaks shorter
    than 2 minutes, after 1/3 of the run instead of 1 min). `runner` is the bench's load client."""
    rate = 0.7 * max_rps
    first_at = 60.0 if seconds >= 120 else seconds / 3
    log(f"soak: {seconds:.0f} s at {rate:.0f} req/s (70 % of {max_rps:.0f}) ...")
    segment_s = SEGMENT_S if seconds >= 3 * SEGMENT_S else seconds / 3
    n_segments = max(1, round(seconds / segment_s))
    soak_spec = replace(spec, concurrency=64, rate=rate, duration_s=segment_s, warmup_s=0.0, timeout_s=10.0)
    segments: list[LoadResult] = []
    samples: list[tuple[float, float]] = []
    look_rss: list[tuple[float, float]] = []  # the look process's RSS (MiB), when there is one

    def load() -> None:
        for i in range(n_segments):
            segments.append(runner(replace(soak_spec, seed=i)))

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
        kids = spawned_children(pid)
        if kids:
            look_rss.append((round(elapsed, 1), round(sum(_rss_or_zero(k) for k in kids), 1)))
        if rss_first is None and elapsed >= first_at + startup:
            rss_first = rss
    rss_end = rss_mb(pid)
    if len(segments) < n_segments:
        raise RuntimeError(f"soak: the load client stopped after {len(segments)} of {n_segments} segments")
    growth = (rss_end / rss_first - 1.0) if rss_first else None
    window = sum(s.window_s for s in segments)
    first, last = segments[0], segments[-1]
    p99_ratio = last.p99_ms / first.p99_ms if n_segments > 1 and first.p99_ms > 0 else None
    out = {"seconds": seconds, "target_rps": rate,
           "achieved_rps": sum(s.requests for s in segments) / window if window else 0.0,
           "p99_ms": max(s.p99_ms for s in segments), "errors": sum(s.errors for s in segments),
           "error_codes": dict(sum((Counter(s.error_codes) for s in segments), Counter())),
           "segments": [{"rps": s.rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "errors": s.errors}
                        for s in segments],
           "segment_s": segment_s, "p99_first_ms": first.p99_ms, "p99_last_ms": last.p99_ms,
           "p99_last_over_first": p99_ratio, "rss_mb_first": rss_first, "rss_first_at_s": first_at,
           "rss_mb_end": rss_end, "rss_growth": growth, "rss_samples": samples,
           "look_process_rss_mb_max": max((r for _, r in look_rss), default=None),
           "look_process_rss_samples": look_rss}
    log(f"soak: rss {rss_first} MiB at {first_at:.0f} s -> {rss_end:.1f} MiB at the end "
        f"({(growth or 0) * 100:+.1f} %), {out['achieved_rps']:.0f} req/s, {out['errors']} errors, p99 first "
        f"{first.p99_ms:.1f} ms -> last {last.p99_ms:.1f} ms"
        + (f"; look process peak {out['look_process_rss_mb_max']:.0f} MiB" if look_rss else ""))
    return out


def _rss_or_zero(pid: int) -> float:
    try:
        return rss_mb(pid)
    except (OSError, RuntimeError):  # exited between listing and reading
        return 0.0
