"""The run's report: one JSON document (what is stored in the registry and written with --report),
and a terminal table rendered from it.

The JSON carries the merged HDR histogram (base64) next to the summary, so a percentile nobody asked
for today can still be recomputed from a stored run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from chimera.jsonsafe import nan_to_none
from loadtest.histogram import encode, percentile_curve_ms, summary_ms
from loadtest.runner import LoadTestResult
from loadtest.slo import SLO

REPORT_SCHEMA = "chimera.loadtest/1"
SEND_LAG_WARN_MS = 50.0


def git_revision(cwd: str | Path | None = None) -> dict[str, Any] | None:
    """HEAD of the checkout the load test runs from (and whether it has local changes), or None
    outside a git checkout / without git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "dirty": bool(dirty)} if rev else None


def _explained(messages: Mapping[str, str]) -> dict[str, str]:
    """First message per code, with a hint where gRPC's own text says nothing useful."""
    out = dict(messages)
    if out.get("CANCELLED") in ("", "CANCELLED"):
        out["CANCELLED"] = ("no details: the server reset the stream, typically gRPC core shedding load "
                            "when more than grpc.server.max_pending_requests (default 1000) calls wait for "
                            "the application")
    return out


def warnings_for(result: LoadTestResult) -> list[str]:
    """Things that make the numbers less trustworthy without failing the gate."""
    out = []
    lag = summary_ms(result.send_lag)
    lag_p99 = lag.get("p99")
    if isinstance(lag_p99, float) and lag_p99 > SEND_LAG_WARN_MS and not result.config.concurrency_limit:
        out.append(f"the load generator sent late (send lag p99 {lag_p99:.1f} ms): the client machine may be "
                   f"saturated; latencies include that delay")
    if result.never_sent:
        out.append(f"{result.never_sent} arrivals were older than the timeout by their turn (waiting for a "
                   f"concurrency-limit slot, or the client fell behind) and were never sent "
                   f"(counted as DEADLINE_EXCEEDED)")
    if result.ok and not result.config.version and len(result.versions) > 1:
        out.append("responses came from several versions (routed traffic); pin one with --version to "
                   "test a single version")
    return out


def build_report(result: LoadTestResult, slo: SLO, failures: Sequence[str], *, payload_source: str,
                 git: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything about one run, JSON-ready."""
    cfg = result.config
    latency = summary_ms(result.hist)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "model": cfg.model,
        "version": cfg.version or None,
        "target": cfg.target,
        "git_revision": (git or {}).get("commit"),
        "git_dirty": (git or {}).get("dirty"),
        "started_at": result.started_at.isoformat(),
        "finished_at": result.finished_at.isoformat(),
        "config": {
            "rps": cfg.rps, "duration_s": cfg.duration_s, "warmup_s": cfg.warmup_s, "arrival": cfg.arrival,
            "concurrency_limit": cfg.concurrency_limit or None, "workers": result.workers,
            "timeout_s": cfg.timeout_s, "payload": payload_source, "seed": cfg.seed,
            "latency_from": "intended send time (open loop, no coordinated omission)",
            "on_concurrency_limit": "queue (latency still counts from the intended send time)",
        },
        "target_rps": cfg.rps,
        "achieved_rps": round(result.achieved_rps, 3),
        "achieved_ratio": round(result.achieved_ratio, 4),
        "ok_rps": round(result.ok_rps, 3),
        "requests": {
            "scheduled": result.scheduled, "sent": result.sent, "completed": result.completed,
            "ok": result.ok, "errors": result.error_count, "never_sent": result.never_sent,
            "peak_in_flight": result.peak_in_flight,
        },
        "error_rate": round(result.error_rate, 6),
        "errors_by_code": dict(result.errors),
        "error_examples": _explained(result.error_messages),
        "responses_by_version": {str(v): n for v, n in result.versions.items()},
        "latency_ms": latency,
        "send_lag_ms": summary_ms(result.send_lag),
        "percentile_curve_ms": percentile_curve_ms(result.hist),
        "timeseries": {"bucket_s": result.bucket_s, **result.series},
        "histogram": {"unit": "us", "encoding": "HdrHistogram compressed, base64",
                      "data": encode(result.hist)},
        "slo": slo.stated(),
        "passed": not failures,
        "failures": list(failures),
        "warnings": warnings_for(result),
    }
    if extra:
        report.update(extra)
    return nan_to_none(report)  # the report is written as JSON files too, not only to the registry


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return p


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}{unit}" if abs(v) < 100 else f"{v:,.1f}{unit}"
    return f"{v:,}{unit}"


def render_table(report: Mapping[str, Any], console: Console | None = None) -> None:
    """The summary a release engineer reads in the terminal: rate, latency, errors, verdict."""
    console = console or Console()
    version = report.get("version")
    which = f"v{version}" if version else "(routed)"
    title = f"load test {report['model']} {which} → {report['target']}"
    t = Table(title=title, show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("SLO", justify="right")
    slo = report.get("slo", {})
    cfg = report["config"]
    t.add_row("arrivals", f"{cfg['arrival']}, {cfg['workers']} worker(s)", "")
    t.add_row("target rate", _fmt(report["target_rps"], " req/s"), "")
    ratio = report["achieved_ratio"]
    t.add_row("achieved rate", f"{_fmt(report['achieved_rps'], ' req/s')} ({ratio:.1%})",
              f"≥ {slo['min_achieved_ratio']:.0%}" if "min_achieved_ratio" in slo else "")
    req = report["requests"]
    t.add_row("requests (measured)", f"{req['scheduled']:,} scheduled, {req['ok']:,} ok", "")
    lat = report["latency_ms"]
    for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99_9", "p99.9"), ("max", "max")):
        limit = slo.get(f"{key}_ms")
        t.add_row(f"latency {label}", _fmt(lat.get(key), " ms"), f"≤ {limit:g} ms" if limit else "")
    t.add_row("error rate", f"{report['error_rate']:.2%}",
              f"≤ {slo['max_error_rate']:.2%}" if "max_error_rate" in slo else "")
    for code, n in report["errors_by_code"].items():
        t.add_row(f"  {code}", f"{n:,}", "")
    versions = report.get("responses_by_version") or {}
    if versions:
        t.add_row("answered by", ", ".join(f"v{v}: {n:,}" for v, n in versions.items()), "")
    t.add_row("send lag p99", _fmt(report["send_lag_ms"].get("p99"), " ms"), "")
    console.print(t)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    for code, msg in (report.get("error_examples") or {}).items():
        console.print(f"[dim]{code}: {msg}[/dim]")
    if report["passed"]:
        console.print("[bold green]PASS[/bold green]: every SLO holds")
    else:
        console.print("[bold red]FAIL[/bold red]: " + "; ".join(report["failures"]))
