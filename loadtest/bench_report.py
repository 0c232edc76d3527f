"""`chimera bench`'s report: each case as a dict and a log line, the ratios the issue sets targets for
with pass/fail, the machine it ran on, and the final table."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from loadtest.bench_cpu import describe
from loadtest.closed_loop import LoadResult

BATCH_ROWS = 256

# Issue 17's "Done when", all from one run with the Go client: the anchor for the unary targets is the
# do-nothing grpc.aio PredictionService (echo_c*), the most any Python gRPC server reaches here.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    # (ratio key, what it is, comparison, bound)
    ("chimera_rps_c64_over_echo_rps_c64", "Chimera unary req/s at c=64 / do-nothing server's", ">=", 0.85),
    ("chimera_p99_c64_over_echo_p99_c64", "Chimera unary p99 at c=64 / do-nothing server's", "<=", 3.0),
    ("chimera_p50_c1_minus_echo_p50_c1_ms", "Chimera unary p50 at c=1 - do-nothing server's (ms)", "<=", 1.0),
    ("predictbatch_rows_per_s_over_onnx_batch256_rows_per_s",
     "PredictBatch(256, packed) rows/s / raw onnxruntime batch-256's", ">=", 0.5),
    ("predictbatch_packed_p99_ms", "PredictBatch(256, packed) p99 (ms)", "<=", 100.0),
    ("soak_rss_growth", "gateway RSS at the end of the soak / RSS after 1 minute - 1", "<=", 0.10),
    ("soak_errors", "calls that failed during the soak", "<=", 0),
    ("soak_p99_last_over_first", "soak p99, last 5 minutes / first 5 (thirds if shorter)", "<=", 1.5),
)


def case(title: str, res: LoadResult) -> dict[str, Any]:
    d = res.as_dict()
    d["title"] = title
    d["loadavg_1m"] = round(os.getloadavg()[0], 2)  # on a shared machine, how busy it was just then
    return d


def line(name: str, case: dict[str, Any]) -> str:
    """One case as the log line printed while the bench runs."""
    extra = ""
    if case.get("rows_per_ray_call"):
        extra = f"  rows/Ray call {case['rows_per_ray_call']:.1f}"
    if case.get("errors"):
        extra += f"  errors {case['errors']} {case.get('error_codes')}"
    if case.get("cpu"):
        extra += f"\n  {'':22s} {describe(case['cpu'])}"
    return (f"  {name:22s} {case['rps']:>10.0f} req/s {case['rows_per_s']:>10.0f} rows/s "
            f"p50 {case['p50_ms']:8.2f} ms  p99 {case['p99_ms']:8.2f} ms{extra}")


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b and np.isfinite(a) and np.isfinite(b) else None


def finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def targets(cases: dict[str, Any], soak: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ratios, and per target its value, bound and pass (None: not run)."""
    c64, e64, c1, e1 = cases["chimera_c64"], cases["echo_c64"], cases["chimera_c1"], cases["echo_c1"]
    packed = cases[f"chimera_packed{BATCH_ROWS}"]
    ratios: dict[str, float | None] = {
        "chimera_rps_c64_over_echo_rps_c64": ratio(c64["rps"], e64["rps"]),
        "chimera_p99_c64_over_echo_p99_c64": ratio(c64["p99_ms"], e64["p99_ms"]),
        "chimera_p50_c1_minus_echo_p50_c1_ms": finite(c1["p50_ms"] - e1["p50_ms"]),
        "predictbatch_rows_per_s_over_onnx_batch256_rows_per_s":
            ratio(packed["rows_per_s"], cases[f"onnx_batch{BATCH_ROWS}"]["rows_per_s"]),
        "predictbatch_packed_p99_ms": finite(packed["p99_ms"]),
        "soak_rss_growth": soak.get("rss_growth") if soak else None,
        "soak_errors": float(soak["errors"]) if soak else None,
        "soak_p99_last_over_first": finite(soak.get("p99_last_over_first")) if soak else None,
    }
    out: dict[str, Any] = {}
    for key, what, op, bound in TARGETS:
        value = ratios[key]
        passed = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"what": what, "value": None if value is None else round(value, 4),
                    "target": f"{op} {bound:g}", "pass": passed}
    return ratios, out


def reference(cases: dict[str, Any], stream_concurrency: int) -> dict[str, float | None]:
    """Ratios with no target: Chimera and the do-nothing server against Ray Serve's own gRPC proxy (the
    anchor of the earlier targets: 10x its c=64 req/s, a quarter of its p99, its c=1 p50), and the
    ping-pong stream against unary."""
    c64, r64 = cases["chimera_c64"], cases["ray_c64"]
    return {
        "chimera_rps_c64_over_ray_rps_c64": ratio(c64["rps"], r64["rps"]),
        "chimera_p99_c64_over_ray_p99_c64": ratio(c64["p99_ms"], r64["p99_ms"]),
        "chimera_p50_c1_over_ray_p50_c1": ratio(cases["chimera_c1"]["p50_ms"], cases["ray_c1"]["p50_ms"]),
        "echo_rps_c64_over_ray_rps_c64": ratio(cases["echo_c64"]["rps"], r64["rps"]),
        "chimera_stream_rps_over_chimera_rps_c64": ratio(
            cases[f"chimera_stream_c{stream_concurrency}"]["rps"], c64["rps"]),
        # What one bare Ray Serve handle call costs (c=1 p50), next to the c=1 target's budget (1.0 ms
        # over the do-nothing server): the gateway makes one such call per idle request.
        "ray_handle_p50_c1_ms": finite(cases.get("ray_handle_c1", {}).get("p50_ms")),
    }


def machine() -> dict[str, Any]:
    import grpc
    import onnxruntime
    import ray

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__,
            "go": go_version()}


def go_version() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("go"):
        return None
    try:
        return subprocess.run(["go", "version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':24s} {'req/s':>10s} {'rows/s':>10s} {'p50 ms':>9s} {'p99 ms':>9s}  notes"]
    for name, c in report["cases"].items():
        notes = c.get("title", c.get("kind", ""))
        if c.get("rows_per_ray_call"):
            notes += f"; {c['rows_per_ray_call']:.1f} rows/Ray call"
        if c.get("errors"):
            notes += f"; {c['errors']} errors"
        lines.append(f"{name:24s} {c['rps']:>10.0f} {c['rows_per_s']:>10.0f} {c['p50_ms']:>9.2f} "
                     f"{c['p99_ms']:>9.2f}  {notes}")
    lines.append("")
    lines.append(f"load client: {report.get('client', {}).get('name', 'python')}")
    lines.append(f"{'target (issue 17)':64s} {'value':>8s} {'bound':>8s}  result")
    for t in report["targets"].values():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        result = "not run" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"{t['what'][:64]:64s} {value:>8s} {t['target']:>8s}  {result}")
    if report.get("reference"):
        lines.append("reference (no target): " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in report["reference"].items()))
    if report.get("soak"):
        s = report["soak"]
        lines.append(f"soak: {s['seconds']:.0f} s at {s['target_rps']:.0f} req/s; "
                     f"RSS {s['rss_mb_first']} MiB -> {s['rss_mb_end']:.1f} MiB"
                     + (f" (look process peak {s['look_process_rss_mb_max']:.0f} MiB)"
                        if s.get("look_process_rss_mb_max") else ""))
    return "\n".join(lines)
