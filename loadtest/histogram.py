"""HDR histogram helpers: one unit (microseconds), one range, and encode/decode for shipping
per-worker histograms to the parent process.

Why HDR: percentiles of a merged run must be exact to the stated precision however many workers
recorded them; averaging per-worker percentiles is wrong, merging histograms is right. Encoded HDR
histograms are small (compressed, only non-zero buckets) and stay in the JSON report so anyone can
recompute any percentile later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: nothing a load test measures is longer
SIG_FIGS = 3  # 0.1 % value precision for the run's main histograms
SERIES_SIG_FIGS = 2  # 1 % for the per-second histograms: ~8x smaller, plenty for a time plot

SUMMARY_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9),
)
# Points of the percentile curve in the report and the plot: dense towards the tail.
CURVE_PERCENTILES: tuple[float, ...] = (
    0.0, 10.0, 25.0, 50.0, 75.0, 80.0, 90.0, 95.0, 97.0, 98.0, 99.0, 99.5, 99.7, 99.8, 99.9, 99.95,
    99.97, 99.99, 99.995, 99.999, 100.0,
)


def new_histogram(sig_figs: int = SIG_FIGS) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, sig_figs)


def record_seconds(hist: HdrHistogram, seconds: float) -> None:
    """Record a duration, clamped into the histogram's range (never silently dropped)."""
    us = int(round(seconds * 1e6))
    hist.record_value(min(max(us, LOWEST_US), HIGHEST_US))


def encode(hist: HdrHistogram) -> str:
    """Base64 text (HdrHistogram's standard compressed encoding), safe for JSON and pickling."""
    raw = hist.encode()
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


def decode(text: str) -> HdrHistogram:
    return HdrHistogram.decode(text.encode("ascii"))


def merge(encoded: Iterable[str], sig_figs: int = SIG_FIGS) -> HdrHistogram:
    """One histogram holding every value of the encoded ones (empty encodings are skipped)."""
    out = new_histogram(sig_figs)
    for text in encoded:
        if text:
            out.add(decode(text))
    return out


def ms(us: float) -> float:
    return round(us / 1000.0, 4)


def summary_ms(hist: HdrHistogram) -> dict[str, float | int | None]:
    """count, min, mean, p50, p90, p99, p99.9, max in milliseconds (None when nothing was recorded)."""
    n = hist.get_total_count()
    out: dict[str, float | int | None] = {"count": n}
    if n == 0:
        out.update({k: None for k in ("min", "mean", *(name for name, _ in SUMMARY_PERCENTILES), "max")})
        return out
    out["min"] = ms(hist.get_min_value())
    out["mean"] = ms(hist.get_mean_value())
    for name, p in SUMMARY_PERCENTILES:
        out[name] = ms(hist.get_value_at_percentile(p))
    out["max"] = ms(hist.get_max_value())
    return out


def percentile_curve_ms(hist: HdrHistogram,
                        percentiles: Sequence[float] = CURVE_PERCENTILES) -> list[list[float]]:
    """[[percentile, latency_ms], ...] for the report and the plot; empty when nothing was recorded."""
    if hist.get_total_count() == 0:
        return []
    return [[p, ms(hist.get_value_at_percentile(p))] for p in percentiles]


def count_above_ms(hist: HdrHistogram, threshold_ms: float) -> int:
    """How many recorded values exceed threshold_ms (to the histogram's precision)."""
    limit = int(threshold_ms * 1000)
    total = 0
    for item in hist.get_recorded_iterator():
        if item.value_iterated_to > limit:
            total += item.count_at_value_iterated_to
    return total

