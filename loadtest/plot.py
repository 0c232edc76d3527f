"""PNG of a run: the latency percentile curve (HDR style, tail stretched out) and latency/throughput
over time. People spot a stall or a slow tail faster in a picture than in a table.

matplotlib is imported lazily with the Agg backend (no display needed, safe in worker-less CI)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _x(p: float) -> float:
    """Percentile -> 'nines' axis: 50 % -> 2, 90 % -> 10, 99 % -> 100, 99.9 % -> 1000 (log scale)."""
    return 1.0 / max(1e-6, 1.0 - p / 100.0)


def write_plot(report: Mapping[str, Any], path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PlotUnavailable("matplotlib is not installed: pip install matplotlib") from exc

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8.5))
    version = report.get("version")
    fig.suptitle(f"{report['model']} {'v' + str(version) if version else '(routed)'} at "
                 f"{report['target_rps']:g} req/s target, {report['achieved_rps']:g} achieved — "
                 f"{'PASS' if report['passed'] else 'FAIL'}", fontsize=11)

    curve = report.get("percentile_curve_ms") or []
    count = (report.get("latency_ms") or {}).get("count") or 0
    # Only percentiles the sample can resolve: p99.99 of 2,000 requests is just the maximum again.
    pts = [(p, v) for p, v in curve if p < 100.0 and count * (1.0 - p / 100.0) >= 1.0]
    if pts:
        ax1.plot([_x(p) for p, _ in pts], [v for _, v in pts], marker=".", color="tab:blue")
        ax1.set_xscale("log")
        ticks = [p for p in (0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999) if p <= pts[-1][0]]
        ax1.set_xticks([_x(p) for p in ticks])
        ax1.set_xticklabels([f"{p:g}%" for p in ticks])
        ax1.minorticks_off()
    slo = report.get("slo", {})
    for key, label, color in (("p50_ms", "p50 SLO", "tab:green"), ("p99_ms", "p99 SLO", "tab:red"),
                              ("p90_ms", "p90 SLO", "tab:orange"), ("p99_9_ms", "p99.9 SLO", "tab:purple")):
        if key in slo:
            ax1.axhline(slo[key], color=color, linestyle="--", linewidth=1, label=f"{label} {slo[key]:g} ms")
    ax1.set_xlabel("percentile")
    ax1.set_ylabel("latency (ms, from intended send time)")
    ax1.set_title("latency by percentile")
    ax1.grid(True, which="major", alpha=0.3)
    if slo.keys() & {"p50_ms", "p90_ms", "p99_ms", "p99_9_ms"}:
        ax1.legend(loc="upper left", fontsize=8)

    ts = report.get("timeseries") or {}
    t = list(ts.get("t_s") or [])
    if t:
        # Each value covers [t, t + bucket): repeat the last one so steps-post draws the last bucket too.
        t.append(t[-1] + float(ts.get("bucket_s") or 1.0))

        def series(key: str) -> list[float]:
            ys = [math.nan if v is None else float(v) for v in ts.get(key, [])]
            return ys + ys[-1:]

        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
            ax2.plot(t, series(key), label=label, drawstyle="steps-post")
        ax2.set_yscale("log")
        ax2.set_xlabel("seconds since start (by intended send time; throughput by completion)")
        ax2.set_ylabel("latency (ms)")
        warmup = report.get("config", {}).get("warmup_s") or 0
        if warmup:
            ax2.axvspan(0, warmup, color="grey", alpha=0.15, label="warmup")
        ax3 = ax2.twinx()
        ax3.plot(t, series("throughput_rps"), color="tab:gray", alpha=0.7, linewidth=1.5,
                 drawstyle="steps-post", label="completed req/s")
        ax3.axhline(report["target_rps"], color="black", linestyle=":", linewidth=1, label="target req/s")
        ax3.set_ylabel("req/s")
        ax3.set_ylim(bottom=0)
        lines = ax2.get_legend_handles_labels()
        lines3 = ax3.get_legend_handles_labels()
        ax2.legend(lines[0] + lines3[0], lines[1] + lines3[1], loc="upper left", fontsize=8)
    ax2.set_title("latency and throughput over time")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
