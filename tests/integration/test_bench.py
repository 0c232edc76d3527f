"""Smoke test of `chimera bench --quick`: the machinery runs end to end (raw onnxruntime, Ray
Serve's gRPC proxy, the gateway as its own process) and the JSON has every case, ratio and target.
Speed is never asserted: this machine is shared and noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray  # `chimera bench` starts a Ray of its own (tests/conftest.py)
CASES = ["onnx_batch1", "onnx_batch256", "echo_c1", "echo_c64", "ray_c1", "ray_c8", "ray_c64",
         "ray_handle_c1", "chimera_c1", "chimera_c8", "chimera_c64", "chimera_named_c64", "chimera_batch256",
         "chimera_packed256", "chimera_stream_c64"]
RATIOS = ["chimera_rps_c64_over_echo_rps_c64", "chimera_p99_c64_over_echo_p99_c64",
          "chimera_p50_c1_minus_echo_p50_c1_ms", "predictbatch_rows_per_s_over_onnx_batch256_rows_per_s",
          "predictbatch_packed_p99_ms", "soak_rss_growth", "soak_errors", "soak_p99_last_over_first"]


def test_quick_bench_reports_every_case_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    exe = Path(sys.executable).with_name("chimera")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # the bench starts (and stops) its own Ray
    proc = subprocess.run([str(exe), "bench", "--quick", "--soak", "2", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(CASES) <= set(report["cases"])
    for name in CASES:
        case = report["cases"][name]
        assert case["rps"] > 0 and case["p50_ms"] > 0 and case["p99_ms"] >= case["p50_ms"], (name, case)
        assert case.get("errors", 0) == 0, (name, case)
    batch = report["cases"]["chimera_batch256"]
    assert batch["rows_per_s"] == 256 * batch["rps"]
    packed = report["cases"]["chimera_packed256"]
    assert packed["rows_per_s"] == 256 * packed["rps"]
    assert report["cases"]["chimera_c64"]["rows_per_ray_call"] >= 1
    for name in (n for n in CASES if n.startswith("chimera_")):  # each case's rows all written, then read
        case = report["cases"][name]
        assert case["rows_logged"] >= case["rows"], (name, case)  # warm-up rows are logged too
        assert 0 < case["gateway_cpu_us_per_row"] < 1e5, (name, case)
        # Where the cores went: the gateway, its replicas and the Go client each show up by themselves,
        # and the parts add up to no more than the machine's busy time (plus counter rounding).
        cores = case["cpu"]["cpu_cores"]
        assert cores["server"] > 0 and cores["replicas"] > 0 and cores["client"] > 0, (name, case["cpu"])
        assert sum(cores.values()) <= case["cpu"]["machine_busy_cores"] * 1.1 + 0.05, (name, case["cpu"])
        assert case["cpu"]["cpu_us_per_row_by_part"]["server"] > 0, (name, case["cpu"])
    echo = report["cases"]["echo_c64"]["cpu"]["cpu_cores"]  # the do-nothing server is the server there
    assert echo["server"] > 0 and echo["client"] > 0, echo
    assert report["client"]["name"] == "go"  # the default: every gRPC case by loadtest/goload
    in_process = ("onnx_batch1", "onnx_batch256", "ray_handle_c1")  # measured by the bench itself, no client
    assert {report["cases"][n]["extra"]["client"] for n in CASES if n not in in_process} == {"go"}
    assert isinstance(report["reference"]["ray_handle_p50_c1_ms"], float)
    assert set(RATIOS) == set(report["ratios"]) == set(report["targets"])
    for key in RATIOS:
        assert isinstance(report["ratios"][key], float), key
        assert report["targets"][key]["pass"] in (True, False)
    assert report["soak"]["rss_mb_end"] > 0 and report["gateway"]["predictions_logged"] > 0
    assert len(report["soak"]["segments"]) == 3  # a short soak: thirds, the first and last compared
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout  # the table was printed


def test_another_tree_makes_its_own_bench_registry(tmp_path: Path) -> None:
    """`chimera bench --gateway-tree T` (make bench-compare): T's own Python and registry code create the
    schema and publish the two versions 90/10, so an older revision's gateway finds the registry it
    knows. Run here with this checkout as T (its .venv exists while the suite runs)."""
    from loadtest.bench_procs import SPLIT_REASON, setup_registry_in
    from registry import Registry

    root = Path(__file__).resolve().parents[2]
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    setup_registry_in(root, url, "bench", (b"onnx-one", b"onnx-two"), ["a", "b"], tmp_path)
    reg = Registry(url)
    try:
        split = reg.get_split("bench")
        assert split.weights == {1: 90, 2: 10}
        assert reg.audit_log("bench")[-1]["reason"] == SPLIT_REASON
        assert reg.get_version("bench", 2).feature_names == ("a", "b")
    finally:
        reg.dispose()
