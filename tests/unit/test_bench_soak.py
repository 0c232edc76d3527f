"""`chimera bench --soak S` (loadtest/bench_soak.py): the soak runs as back-to-back segments so issue 17's
"p99 stable" target compares the last segment's p99 with the first's, and every segment's errors count.
The load client is the bench's injected runner; here one that returns what a slowing gateway would give
(the real client runs in tests/integration/test_bench.py)."""

from __future__ import annotations

import os

from loadtest.bench_report import targets
from loadtest.bench_soak import soak
from loadtest.closed_loop import LoadResult, LoadSpec


def _result(spec: LoadSpec, p99: float, errors: int = 0) -> LoadResult:
    n = int(spec.rate * spec.duration_s)
    return LoadResult(kind="predict", concurrency=spec.concurrency, requests=n, rows=n, errors=errors,
                      error_codes={"UNAVAILABLE": errors} if errors else {}, window_s=spec.duration_s,
                      rps=n / spec.duration_s, rows_per_s=n / spec.duration_s, p50_ms=p99 / 3, p90_ms=p99 / 2,
                      p99_ms=p99, max_ms=p99 * 2)


def test_a_soak_is_judged_on_its_last_segment_against_its_first_and_on_every_error() -> None:
    spec = LoadSpec(target="127.0.0.1:1", kind="predict", concurrency=1, duration_s=1, model="m",
                    rows=((1.0,),))
    seen: list[LoadSpec] = []

    def runner(s: LoadSpec) -> LoadResult:  # p99 doubles each segment; errors in the later ones
        seen.append(s)
        return _result(s, p99=10.0 * 2 ** (len(seen) - 1), errors=len(seen) - 1)  # 0, 1, 2 errors

    out = soak(os.getpid(), spec, max_rps=100.0, seconds=0.3, log=lambda _: None, runner=runner)
    assert len(seen) == 3
    assert all(abs(s.duration_s - 0.1) < 1e-9 and s.rate == 70.0 and s.concurrency == 64 for s in seen)
    assert [s["p99_ms"] for s in out["segments"]] == [10.0, 20.0, 40.0]
    assert out["p99_last_over_first"] == 4.0 and out["errors"] == 3 and out["p99_ms"] == 40.0
    assert out["error_codes"] == {"UNAVAILABLE": 3}  # summed over the segments, not the last one's

    names = ("chimera_c64", "echo_c64", "chimera_c1", "echo_c1", "chimera_packed256", "onnx_batch256")
    cases = {n: {"rps": 1.0, "rows_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0} for n in names}
    _, judged = targets(cases, out)
    assert judged["soak_p99_last_over_first"]["pass"] is False and judged["soak_errors"]["pass"] is False
    steady = soak(os.getpid(), spec, 100.0, 0.3, lambda _: None, runner=lambda s: _result(s, p99=10.0))
    _, judged = targets(cases, steady)
    assert judged["soak_p99_last_over_first"]["pass"] is True and judged["soak_errors"]["pass"] is True
