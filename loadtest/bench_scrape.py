"""What `chimera bench` reads from the gateway besides latencies: its Prometheus counters (rows per Ray
call, prediction-log counters) before and after each case, and how many predictions it logged."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

SCRAPED = ("chimera_batch_size_rows_sum", "chimera_batch_size_rows_count",
           "chimera_prediction_log_inserted_rows", "chimera_prediction_log_spilled_rows",
           "chimera_prediction_log_backpressure_rows", "chimera_prediction_log_queue_depth")


class MetricsScrape:
    """Reads the gateway's Prometheus endpoint: rows per Ray call and prediction-log counters."""

    def __init__(self, ports: int | Sequence[int] | None) -> None:
        # Several ports: the workers of `chimera serve --processes N`, whose counters are summed.
        self.ports = [] if not ports else [ports] if isinstance(ports, int) else list(ports)

    def sample(self) -> dict[str, float]:
        import urllib.request

        out: dict[str, float] = {}
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return {}  # a worker not answering: no sample rather than a partial sum
            for line in text.splitlines():
                if line.startswith("#") or " " not in line:
                    continue
                name, value = line.rsplit(" ", 1)
                base = name.split("{", 1)[0]
                if base in SCRAPED:
                    out[base] = out.get(base, 0.0) + float(value)
        return out

    def wait_log_drained(self, below: float = 2048, timeout_s: float = 120.0) -> float:
        """Wait until the prediction log's queue holds fewer than `below` rows; returns the seconds
        waited. The bench calls it before each gateway case: a case that answers rows faster than the
        log writes them (PredictBatch does, on SQLite) leaves a queue that would otherwise drain during
        the next case and be charged to it. The wait is reported per case, so the writer's own rate
        stays visible (rows queued at the end of a case / seconds to drain)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            depth = self.sample().get("chimera_prediction_log_queue_depth")
            if depth is None or depth < below:
                break
            time.sleep(0.2)
        return time.monotonic() - start

    def wait_log_settled(self, timeout_s: float = 120.0, step_s: float = 0.2) -> dict[str, float]:
        """Wait until every row a case answered is in the database: the log's queue is empty and its
        inserted count did not move between two samples `step_s` apart (a batch the writer has taken
        off the queue is not in the depth yet not inserted either). Returns the last sample. The bench
        reads the gateway's CPU after this, so a case's CPU per row includes writing its rows even
        when the writer lags behind the case (PredictBatch on SQLite)."""
        deadline = time.monotonic() + timeout_s
        last = self.sample()
        while time.monotonic() < deadline:
            time.sleep(step_s)
            now = self.sample()
            key = "chimera_prediction_log_inserted_rows"
            if (not now or (now.get("chimera_prediction_log_queue_depth", 0.0) == 0
                            and now.get(key) == last.get(key))):
                return now
            last = now
        return last

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        calls = after.get("chimera_batch_size_rows_count", 0) - before.get("chimera_batch_size_rows_count", 0)
        rows = after.get("chimera_batch_size_rows_sum", 0) - before.get("chimera_batch_size_rows_sum", 0)
        return {"ray_calls": calls, "rows_per_ray_call": rows / calls if calls else 0.0,
                "log_inserted_total": after.get("chimera_prediction_log_inserted_rows", 0.0),
                "log_spilled_total": after.get("chimera_prediction_log_spilled_rows", 0.0),
                "log_backpressure_total": after.get("chimera_prediction_log_backpressure_rows", 0.0),
                "log_queue_depth": after.get("chimera_prediction_log_queue_depth", 0.0)}


def gateway_cpu(before: dict[str, float], settled: dict[str, float], cpu_s: float) -> dict[str, Any]:
    """The gateway's CPU per answered row over one case: CPU seconds from just before the load to the
    moment its rows were all written (`MetricsScrape.wait_log_settled`), over the predictions the log
    inserted in that time (every answered row is logged once, warm-up included, so numerator and
    denominator cover the same work). Throughput on two shared cores swings ±20 % from run to run;
    the CPU a row costs moves far less, so it is what tells whether the gateway's code got dearer
    (issue 13's before/after). It includes what the gateway does while idle in that window (the split
    watch, metrics), a few percent at c=1 and negligible under load."""
    key = "chimera_prediction_log_inserted_rows"
    rows = settled.get(key, 0.0) - before.get(key, 0.0) if key in settled and key in before else 0.0
    return {"gateway_cpu_s": round(cpu_s, 3), "rows_logged": int(rows),
            "gateway_cpu_us_per_row": round(cpu_s / rows * 1e6, 2) if rows > 0 else None}


def count_logged(reg: Any, model: str) -> int | None:
    """Rows of `model` in the predictions table (None when the count cannot be read)."""
    try:
        from sqlalchemy import func, select

        from registry.models import Prediction

        with reg.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Prediction)
                                    .where(Prediction.model == model)).scalar_one())
    except Exception:
        return None
