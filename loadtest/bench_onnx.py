"""`chimera bench` case (a): raw onnxruntime through the replicas' own scorer, one thread, the floor
every served number is compared with."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np


def percentiles_ms(samples_s: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_onnx(onnx_bytes: bytes, x: np.ndarray, batch: int, seconds: float) -> dict[str, Any]:
    """Raw onnxruntime through the replicas' own scorer: calls per second and rows per second."""
    from replicas.scorer import OnnxScorer

    scorer = OnnxScorer(onnx_bytes, hashlib.sha256(onnx_bytes).hexdigest())
    n = len(x)
    batches = [x[(i * batch) % n:(i * batch) % n + batch] for i in range(max(1, n // batch))]
    batches = [b for b in batches if len(b) == batch] or [np.resize(x, (batch, x.shape[1]))]
    for b in batches[:20]:
        scorer.score(b)
    lat: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        scorer.score(batches[i % len(batches)])
        lat.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - started
    p50, p99 = percentiles_ms(lat)
    return {"kind": f"onnxruntime batch {batch}", "batch": batch, "requests": i, "rps": i / elapsed,
            "rows_per_s": i * batch / elapsed, "p50_ms": p50, "p99_ms": p99}
