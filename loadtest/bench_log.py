"""The prediction log's own ingest rate (issue 17): offer rows to the real writer at a fixed rate (or as
fast as it takes them) for D seconds and report what it sustained, the enqueue-to-commit latency and
the process's memory, on whatever registry the writer was built on (SQLite or PostgreSQL).

Why a bench of its own: the gateway cases of `chimera bench` measure the log only as a share of two
busy cores; the target "≥ 100k rows/s sustained for 60 s on PostgreSQL" is about the writer alone.

The writer is injected (`LogWriter`): loadtest sits below the gateway in the import floors, so the
composition root (`chimera log bench`, chimera/cli/log.py) builds a gateway.records PredictionLog and
hands it in. The bench only calls what the request path calls (`log_many` for PredictBatch blocks,
`log_one` per unary row), wraps `insert_rows` (the hook the writer exposes for tests) to see when each
batch is committed, and reads `depth` and `stats`.

What is measured, and how:
- offered rows/s: the producer (this thread, like the request path) submits every `tick_s` the rows due
  by then; `rate=0` keeps the writer's queue at `closed_depth` rows instead (its capacity).
- sustained rows/s: rows committed inside the measured window (after `warmup_s`) divided by its length.
  `sustained` is true when no row was diverted to the spill file (back-pressure) and the window
  committed at least 95 % of what was offered in it (a backlog that only grows is not sustained).
- enqueue-to-commit: the writer commits rows in the order they were queued (when nothing is spilled),
  so a tick's rows are committed once the cumulative committed count passes the tick's cumulative
  submitted count; the latency is that commit time minus the tick's *first* submit (an upper bound).
- RSS (VmRSS) sampled every second; the process's CPU and the writer thread's CPU per row; the
  machine's busy share (all cores, psutil) so a run on two shared cores says what else was running.

Request ids are random 32-hex strings (as uuid4 ids are): sequential ids would flatter the unique index."""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import psutil

MODEL = "bench-log"


class LogWriter(Protocol):
    """What the bench needs of gateway.records.prediction_log.PredictionLog."""

    insert_rows: Callable[[Sequence[Any]], int | None]
    stats: Any

    @property
    def depth(self) -> int: ...

    def start(self) -> None: ...

    def flush(self, timeout: float | None = ...) -> bool: ...

    def stop(self, timeout: float = ..., stall_s: float = ...) -> None: ...

    def log_one(self, request_id: str, model: str, version: int, routing_key: str, score: float,
                latency_ms: float, features: Any = ..., split_revision: int | None = ...,
                pinned: bool = ..., failed_version: int | None = ...) -> None: ...

    def log_many(self, request_ids: list[str], model: str, version: int, routing_keys: list[str],
                 scores: list[float], latency_ms: float, features: Any = ..., mask: Any = ...,
                 split_revision: int | None = ..., pinned: bool = ..., failed_version: Any = ...) -> None: ...


@dataclass
class LogBenchSpec:
    rate: float = 0.0  # offered rows/s; 0: as fast as the writer takes them (queue held at closed_depth)
    duration_s: float = 60.0  # measured seconds
    warmup_s: float = 5.0  # unmeasured seconds before
    block: int = 256  # rows per log_many record (a PredictBatch version group); 1: log_one per row
    features: int = 32  # feature width (every row logged with its features); 0: none
    tick_s: float = 0.01
    closed_depth: int = 20_000  # rate=0: rows kept queued
    drain_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class LogBenchResult:
    backend: str
    spec: dict[str, Any]
    offered_rps: float = 0.0  # in the measured window
    sustained_rps: float = 0.0  # committed in the measured window / its length
    sustained: bool = False
    submitted: int = 0
    committed: int = 0
    spilled: int = 0
    backpressure: int = 0
    dead_letter: int = 0
    max_depth: int = 0
    drain_s: float = 0.0  # after the last submit, until every row was committed
    latency_ms: dict[str, float] = field(default_factory=dict)  # enqueue-to-commit p50/p99/max
    rss_mb: dict[str, float] = field(default_factory=dict)  # start, max, end
    cpu_us_per_row: dict[str, float] = field(default_factory=dict)  # process, writer thread
    machine_busy: float = 0.0  # share of all cores busy during the window (everything on the machine)
    batches: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Commits:
    """The insert hook: (monotonic time, cumulative rows committed) after each successful insert."""

    def __init__(self, inner: Callable[[Sequence[Any]], int | None]) -> None:
        self.inner = inner
        self.times: list[float] = []
        self.totals: list[int] = []
        self.total = 0
        self.lock = threading.Lock()

    def __call__(self, rows: Sequence[Any]) -> int | None:
        n = self.inner(rows)
        with self.lock:
            self.total += len(rows)
            self.times.append(time.monotonic())
            self.totals.append(self.total)
        return n

    def committed_by(self, t: float) -> int:
        with self.lock:
            i = bisect.bisect_right(self.times, t)
            return self.totals[i - 1] if i else 0


def _rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def _thread_cpu_s(native_id: int | None) -> float:
    """user + system CPU seconds of one thread of this process, 0 when unknown."""
    if native_id is None:
        return 0.0
    try:
        for t in psutil.Process().threads():
            if t.id == native_id:
                return float(t.user_time + t.system_time)
    except psutil.Error:
        pass
    return 0.0


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot (idle and I/O wait are not busy)."""
    t = psutil.cpu_times()
    total = float(sum(t))
    return total - t.idle - getattr(t, "iowait", 0.0), total


class _Rows:
    """Pre-built pieces for the producer: random ids are made per block (cheap: one urandom call),
    keys, scores and feature matrices are cycled from a pool."""

    def __init__(self, spec: LogBenchSpec) -> None:
        rng = np.random.default_rng(spec.seed)
        self.block = max(1, spec.block)
        pool = 64
        self.keys = [[f"user-{k}" for k in rng.integers(0, 1_000_000, self.block)] for _ in range(pool)]
        self.scores = [rng.random(self.block).tolist() for _ in range(pool)]
        self.features = ([rng.standard_normal((self.block, spec.features), dtype=np.float32)
                          for _ in range(pool)] if spec.features > 0 else [None] * pool)
        self.i = 0

    def ids(self, n: int) -> list[str]:
        text = os.urandom(16 * n).hex()
        return [text[j:j + 32] for j in range(0, 32 * n, 32)]

    def submit(self, writer: LogWriter, n: int) -> None:
        """Submit n rows: whole blocks through log_many, or one log_one per row (block=1)."""
        while n > 0:
            k = min(n, self.block)
            p = self.i % len(self.keys)
            self.i += 1
            ids = self.ids(k)
            feats = self.features[p]
            if self.block == 1:
                writer.log_one(ids[0], MODEL, 1, self.keys[p][0], self.scores[p][0], 1.0,
                               features=None if feats is None else feats[0], split_revision=1)
            else:
                writer.log_many(ids, MODEL, 1, self.keys[p][:k], self.scores[p][:k], 1.0,
                                features=None if feats is None else feats[:k], mask=True, split_revision=1)
            n -= k


def run_log_bench(writer: LogWriter, spec: LogBenchSpec, backend: str,
                  progress: Callable[[str], None] | None = None) -> LogBenchResult:
    """Drive a started-here writer (it must not be started yet) and return what it sustained. The
    writer is stopped at the end; the rows stay in its registry (the caller removes them)."""
    say = progress or (lambda _msg: None)
    result = LogBenchResult(backend=backend, spec=asdict(spec))
    commits = _Commits(writer.insert_rows)
    writer.insert_rows = commits
    rows = _Rows(spec)
    writer.start()
    thread = getattr(writer, "_thread", None)
    writer_tid = getattr(thread, "native_id", None)
    ticks_t: list[float] = []  # first submit time of each tick
    ticks_total: list[int] = []  # cumulative rows submitted at the end of the tick
    submitted = 0
    rss_start = rss_max = _rss_mb()
    t0 = time.monotonic()
    w0, w1 = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s
    window: dict[str, Any] = {}
    next_rss = t0 + 1.0
    next_say = t0 + 5.0
    now = t0
    while now < w1:
        if not window and now >= w0:
            window.update(submitted=submitted, cpu=time.process_time(), wcpu=_thread_cpu_s(writer_tid),
                          jiffies=_machine_cpu())
        if spec.rate > 0:
            due = int(spec.rate * (now - t0)) - submitted
        else:
            due = spec.closed_depth - writer.depth
            due -= due % rows.block if due > rows.block else 0
        if due > 0:
            ticks_t.append(time.monotonic())
            rows.submit(writer, due)
            submitted += due
            ticks_total.append(submitted)
        depth = writer.depth
        result.max_depth = max(result.max_depth, depth)
        now = time.monotonic()
        if now >= next_rss:
            rss_max = max(rss_max, _rss_mb())
            next_rss = now + 1.0
        if now >= next_say:
            say(f"  {now - t0:5.1f} s: {submitted:,} rows offered, {commits.total:,} committed, "
                f"queue {depth:,}")
            next_say = now + 5.0
        time.sleep(max(0.0, spec.tick_s - (time.monotonic() - now)))
        now = time.monotonic()
    end = {"submitted": submitted, "cpu": time.process_time(), "wcpu": _thread_cpu_s(writer_tid),
           "jiffies": _machine_cpu(), "committed": commits.committed_by(w1)}
    if not window:  # no warm-up tick happened (duration too short to matter)
        window.update(submitted=0, cpu=0.0, wcpu=0.0, jiffies=(0.0, 0.0))
    t_last = time.monotonic()
    flushed = writer.flush(spec.drain_timeout_s)
    result.drain_s = time.monotonic() - t_last
    if not flushed:
        result.notes.append(f"the writer did not drain within {spec.drain_timeout_s:.0f} s")
    rss_max = max(rss_max, _rss_mb())
    writer.stop()

    committed_in_window = end["committed"] - commits.committed_by(w0)
    offered_in_window = end["submitted"] - window["submitted"]
    stats = writer.stats
    result.submitted = submitted
    result.committed = commits.total
    result.spilled = int(stats.spilled)
    result.backpressure = int(stats.backpressure)
    store = getattr(writer, "store", None)
    result.dead_letter = sum(getattr(store, "dead_letter", {}).values()) if store is not None else 0
    result.batches = len(commits.times)
    result.offered_rps = offered_in_window / spec.duration_s
    result.sustained_rps = committed_in_window / spec.duration_s
    result.sustained = (result.spilled == 0 and committed_in_window >= 0.95 * offered_in_window
                        and flushed)
    rows_for_cpu = max(1, committed_in_window)
    result.cpu_us_per_row = {
        "process": round((end["cpu"] - window["cpu"]) / rows_for_cpu * 1e6, 2),
        "writer_thread": round((end["wcpu"] - window["wcpu"]) / rows_for_cpu * 1e6, 2),
    }
    busy = end["jiffies"][0] - window["jiffies"][0]
    total = end["jiffies"][1] - window["jiffies"][1]
    result.machine_busy = round(busy / total, 3) if total > 0 else 0.0
    result.rss_mb = {"start": round(rss_start, 1), "max": round(rss_max, 1), "end": round(_rss_mb(), 1)}
    result.latency_ms = _latencies(ticks_t, ticks_total, commits, w0, w1) if result.spilled == 0 else {}
    if result.spilled:
        result.notes.append(f"{result.spilled:,} rows went to the spill file (back-pressure "
                            f"{result.backpressure:,}): not sustained, latency not measured")
    return result


def _latencies(ticks_t: list[float], ticks_total: list[int], commits: _Commits, w0: float,
               w1: float) -> dict[str, float]:
    """Enqueue-to-commit per tick of the measured window (see the module docstring)."""
    with commits.lock:
        times, totals = list(commits.times), list(commits.totals)
    lat: list[float] = []
    for t, total in zip(ticks_t, ticks_total, strict=True):
        if t < w0 or t > w1:
            continue
        i = bisect.bisect_left(totals, total)
        if i < len(times):
            lat.append((times[i] - t) * 1000.0)
    if not lat:
        return {}
    a = np.asarray(lat)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
            "max": round(float(a.max()), 1), "ticks": float(len(a))}


# Issue 17's ingest target: at least this many rows/s sustained for at least this long, on PostgreSQL.
TARGET_PG_ROWS_PER_S = 100_000
TARGET_DURATION_S = 60.0


def target_line(r: LogBenchResult) -> str | None:
    """The issue's verdict for a PostgreSQL run (None on other backends): met only when the rate was
    sustained at or above the target over a window at least as long as the target's."""
    if r.backend != "postgresql":
        return None
    long_enough = r.spec["duration_s"] >= TARGET_DURATION_S
    met = r.sustained and long_enough and r.sustained_rps >= TARGET_PG_ROWS_PER_S
    why = "" if long_enough else f" (the run is shorter than {TARGET_DURATION_S:.0f} s)"
    return (f"  target: >= {TARGET_PG_ROWS_PER_S:,} rows/s sustained for {TARGET_DURATION_S:.0f} s on "
            f"PostgreSQL: {'met' if met else 'NOT met'}{why}")


def format_result(r: LogBenchResult) -> str:
    lat = r.latency_ms
    lat_text = (f"enqueue-to-commit p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms"
                if lat else "enqueue-to-commit not measured")
    offered = "as fast as taken" if r.spec["rate"] <= 0 else f"{r.spec['rate']:,.0f} rows/s offered"
    lines = [
        f"{r.backend}: {r.sustained_rps:,.0f} rows/s committed over {r.spec['duration_s']:.0f} s "
        f"({offered}, block {r.spec['block']}, {r.spec['features']} features) "
        f"{'SUSTAINED' if r.sustained else 'NOT sustained'}",
        f"  {lat_text}; max queue {r.max_depth:,}; drain {r.drain_s:.1f} s after the last row",
        f"  CPU {r.cpu_us_per_row.get('process', 0):.1f} us/row (writer thread "
        f"{r.cpu_us_per_row.get('writer_thread', 0):.1f}); machine busy {r.machine_busy:.0%}; "
        f"RSS {r.rss_mb.get('start', 0):.0f} -> max {r.rss_mb.get('max', 0):.0f} MiB",
        f"  submitted {r.submitted:,}, committed {r.committed:,} in {r.batches:,} batches, spilled "
        f"{r.spilled:,}, dead-lettered {r.dead_letter:,}",
    ]
    target = target_line(r)
    lines += [target] if target else []
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
