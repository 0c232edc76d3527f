"""The Go load client of `chimera bench` (loadtest/goload), built offline by its build.sh the way `make bench`
builds it, driven through loadtest.bench_go exactly as the bench drives it: against the do-nothing grpc.aio
PredictionService (the anchor of issue 17's targets) and against a live gateway (grpc.aio + Ray Serve
replicas of a real ONNX model, two versions behind a 90/10 split, prediction logging on).

What a user of `make bench` relies on: every call the client reports as answered really was answered and
logged by the gateway (so req/s is not inflated), failures are counted by their gRPC code (not hidden),
and the percentiles are ordered. Speed is never asserted: the machine is shared.

Needs the Go packages listed in test_go_client.py; missing as root is a failure, as another user a skip."""

from __future__ import annotations

import json
import math
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from loadtest import bench_go
from loadtest.bench_procs import EchoProcess
from loadtest.bench_scrape import count_logged
from loadtest.closed_loop import LoadResult, LoadSpec
from registry import Registry
from tests.harness import GatewayThread, small_onnx, wait_for
from tests.integration.test_go_client import require_go_toolchain

ROWS = tuple(tuple(float(v) for v in r) for r in np.random.default_rng(7).normal(size=(50, 4)))
NAMES = ("f0", "f1", "f2", "f3")
SHORT = {"duration_s": 1.5, "warmup_s": 0.3}


@pytest.fixture(scope="module")
def goload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_go_toolchain()
    out = bench_go.build(tmp_path_factory.mktemp("goload") / "chimera-goload")
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def echo():
    server = EchoProcess()
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


def assert_sane(res: LoadResult) -> None:
    assert res.extra["client"] == "go"
    assert res.requests > 0 and res.errors == 0, res
    assert 0 < res.p50_ms <= res.p90_ms <= res.p99_ms <= res.max_ms, res
    assert res.rps == pytest.approx(res.requests / res.window_s)
    assert res.rows_per_s == pytest.approx(res.rows / res.window_s)


def test_goload_sources_are_gofmt_clean() -> None:
    require_go_toolchain()
    proc = subprocess.run(["gofmt", "-l", str(bench_go.GO_DIR)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_goload_against_the_do_nothing_server(goload: Path, echo: EchoProcess) -> None:
    spec = LoadSpec(target=f"127.0.0.1:{echo.port}", kind="predict", concurrency=1, model="m", rows=ROWS,
                    **SHORT)
    for c in (1, 16):
        res = bench_go.run_go(replace(spec, concurrency=c), goload)
        assert_sane(res)
        assert res.concurrency == c and res.rows == res.requests
    # The do-nothing server has no PredictStream: every stream fails, counted under its gRPC code.
    res = bench_go.run_go(replace(spec, kind="stream", concurrency=3), goload)
    assert res.requests == 0 and res.error_codes == {"UNIMPLEMENTED": 3} and math.isnan(res.p99_ms)


def test_python_client_is_still_an_option(echo: EchoProcess) -> None:
    """`chimera bench --client python` drives the same cases with loadtest.closed_loop: same spec in,
    same result shape out."""
    from loadtest.bench import BenchOptions, load_client
    from loadtest.closed_loop import run

    load, about = load_client(BenchOptions(client="python"))
    assert load is run and about["name"] == "python"
    spec = LoadSpec(target=f"127.0.0.1:{echo.port}", kind="predict", concurrency=2, model="m", rows=ROWS,
                    **SHORT)
    res = load(spec)
    assert res.requests > 0 and res.errors == 0 and 0 < res.p50_ms <= res.p99_ms
    with pytest.raises(ValueError, match="go or python"):
        load_client(BenchOptions(client="rust"))


def test_goload_refuses_bad_flags_and_names_them(goload: Path, tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": [list(r) for r in ROWS], "feature_names": []}))
    proc = subprocess.run([str(goload), "-kind", "unary", "-rows", str(rows)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "-kind" in proc.stderr
    proc = subprocess.run([str(goload), "-named", "-rows", str(rows)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "feature name" in proc.stderr


@pytest.mark.usefixtures("ray_cluster")
def test_goload_against_a_live_gateway_every_answer_is_logged(goload: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    registry.upgrade()
    model = "gobench" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    registry.publish_version(model, b1, names)
    registry.publish_version(model, b2, names)
    registry.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path).start()
    try:
        spec = LoadSpec(target=f"127.0.0.1:{gw.port}", kind="predict", concurrency=4, model=model, rows=ROWS,
                        batch_rows=16, **SHORT)
        results = {
            "dense": bench_go.run_go(spec, goload),
            "named": bench_go.run_go(replace(spec, feature_names=NAMES), goload),
            "packed": bench_go.run_go(replace(spec, kind="packed", concurrency=2), goload),
            "batch": bench_go.run_go(replace(spec, kind="batch", concurrency=2), goload),
            "stream": bench_go.run_go(replace(spec, kind="stream"), goload),
        }
        for name, res in results.items():
            assert_sane(res)
            per_call = 16 if name in ("packed", "batch") else 1
            assert res.rows == res.requests * per_call, (name, res)
        # Every answered call (measured or in the warm-up/tail) was scored and logged, row by row.
        answered = sum((r.requests + r.extra["unmeasured_calls"]) * (r.rows // r.requests)
                       for r in results.values())
        wait_for(lambda: count_logged(registry, model) == answered, timeout=60,
                 what=f"{answered} logged predictions")

        # A model the gateway does not know: every call fails and is counted as NOT_FOUND, none as done.
        bad = bench_go.run_go(replace(spec, model="no-such-model", concurrency=2), goload)
        assert bad.requests == 0 and set(bad.error_codes) == {"NOT_FOUND"} and bad.errors > 0
    finally:
        gw.stop()
        registry.dispose()
