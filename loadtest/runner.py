"""Run an open-loop load test: spread the schedule over worker processes, start them on one shared
clock, merge what they measured.

Workers are fresh interpreters (`python -m loadtest.worker`, see worker.py for why not
multiprocessing). They connect first, report ready, and only then does the parent pick a start time a
moment in the future, so process start-up never eats into the schedule.
"""

from __future__ import annotations

import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from chimera.client import channel as channel_for
from loadtest.histogram import SERIES_SIG_FIGS, merge, summary_ms
from loadtest.schedule import ARRIVALS, Arrival, expected_arrivals
from loadtest.worker import WorkerResult, WorkerSpec, bucket_width, read_message, write_message

# What one worker process sustains comfortably (grpc.aio unary calls, 2-core machine, leaving room for
# the event loop to stay on schedule); more rate than this per worker adds a worker, up to the CPUs.
RPS_PER_WORKER = 1500.0
START_DELAY_S = 0.25  # lead time between "go" and the first arrival, so every worker is waiting
PRIME_TIMEOUT_S = 180.0  # generous: a pinned candidate may be deployed by the priming call itself


class LoadTestError(RuntimeError):
    """The run could not be carried out (unreachable target, rejected priming call, crashed worker)."""


@dataclass(frozen=True)
class LoadTestConfig:
    target: str
    model: str
    rps: float
    duration_s: float
    version: int = 0  # 0: routed by the split; otherwise pinned (needs the admin token in metadata)
    warmup_s: float = 0.0
    arrival: Arrival = "constant"
    concurrency_limit: int = 0  # total across workers; 0: unlimited
    workers: int = 0  # 0: auto (rate / RPS_PER_WORKER, at most the CPU count)
    timeout_s: float = 10.0
    metadata: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    prime: bool = True  # one call before the clock starts: fail fast, deploy a pinned version
    connect_timeout_s: float = 15.0

    def validate(self) -> None:
        if not self.target:
            raise ValueError("--target: required (host:port)")
        if not self.model:
            raise ValueError("--model: required")
        if not (self.rps > 0 and math.isfinite(self.rps)):
            raise ValueError(f"--rps: must be > 0, got {self.rps}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"--duration: must be > 0, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup: must be >= 0, got {self.warmup_s}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"--arrival: must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.concurrency_limit < 0:
            raise ValueError("--concurrency-limit: must be >= 0")
        if self.version < 0:
            raise ValueError("--version: must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("--timeout: must be > 0")
        if self.workers < 0:
            raise ValueError("--workers: must be >= 0")

    def n_workers(self) -> int:
        n = self.workers or min(os.cpu_count() or 1, math.ceil(self.rps / RPS_PER_WORKER))
        n = max(1, n)
        if self.concurrency_limit:
            n = min(n, self.concurrency_limit)  # every worker needs at least one slot
        # A worker with no arrivals would only cost a process.
        return max(1, min(n, expected_arrivals(self.rps, self.warmup_s + self.duration_s)))


@dataclass
class LoadTestResult:
    """Merged measurements of one run. Counts cover the measured window (after warmup) unless named
    `series_*` (whole run, for plots)."""

    config: LoadTestConfig
    workers: int
    started_at: datetime
    finished_at: datetime
    hist: HdrHistogram
    send_lag: HdrHistogram
    scheduled: int
    sent: int
    ok: int
    errors: dict[str, int]
    error_messages: dict[str, str]
    versions: dict[int, int]
    never_sent: int
    window_completed: int
    window_ok: int
    peak_in_flight: int
    bucket_s: float
    series: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def completed(self) -> int:
        return self.ok + self.error_count

    @property
    def error_rate(self) -> float:
        """Errors over measured arrivals (an arrival with no answer is an error, so it counts)."""
        return self.error_count / self.scheduled if self.scheduled else 0.0

    @property
    def achieved_rps(self) -> float:
        """Responses (any status) completed inside the measured window, per second. In steady state
        warmup responses completing early in the window make up for measured ones completing after
        it; with no warmup the figure reads low by about (typical latency / duration)."""
        return self.window_completed / self.config.duration_s

    @property
    def ok_rps(self) -> float:
        return self.window_ok / self.config.duration_s

    @property
    def achieved_ratio(self) -> float:
        return self.achieved_rps / self.config.rps

    def latency_ms(self) -> dict[str, float | int | None]:
        return summary_ms(self.hist)


def prime(config: LoadTestConfig, row: dict[str, float]) -> int:
    """One blocking Predict before the clock starts. Why: a wrong target, model, token or payload
    then fails in a second with the server's own message instead of as 100 % errors, and a pinned
    candidate the gateway deploys on first use is up before anything is measured. Returns the
    version that answered."""
    from chimera.v1 import prediction_pb2 as pb
    from chimera.v1 import prediction_pb2_grpc as pb_grpc

    request = pb.PredictRequest(model=config.model, version=config.version, features=row)
    with channel_for(config.target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=config.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise LoadTestError(f"cannot connect to {config.target} within {config.connect_timeout_s:g} s") \
                from None
        stub = pb_grpc.PredictionServiceStub(channel)
        try:
            # Generous deadline: a pinned candidate may be deployed by this very call.
            resp = stub.Predict(request, metadata=config.metadata or None,
                                timeout=max(config.timeout_s, PRIME_TIMEOUT_S))
        except grpc.RpcError as exc:
            raise LoadTestError(f"priming request to {config.target} failed: "
                                f"{exc.code().name}: {exc.details()}") from None
    if config.version and resp.version != config.version:
        raise LoadTestError(f"the gateway ignored the pinned version: asked for {config.version}, "
                            f"answered by {resp.version}")
    return resp.version


def _shares(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def worker_specs(config: LoadTestConfig, rows: Sequence[dict[str, float]]) -> list[WorkerSpec]:
    n = config.n_workers()
    limits = _shares(config.concurrency_limit, n) if config.concurrency_limit else [0] * n
    bucket = bucket_width(config.warmup_s + config.duration_s)
    return [WorkerSpec(index=i, n_workers=n, target=config.target, model=config.model, version=config.version,
                       rate=config.rps, warmup_s=config.warmup_s, duration_s=config.duration_s,
                       arrival=config.arrival, rows=tuple(rows), metadata=config.metadata,
                       concurrency_limit=limits[i], timeout_s=config.timeout_s, bucket_s=bucket,
                       seed=config.seed, connect_timeout_s=config.connect_timeout_s)
            for i in range(n)]


class _Worker:
    """One worker process and a thread that turns its protocol stream into queue items."""

    def __init__(self, spec: WorkerSpec, events: queue.Queue[tuple[int, Any]]) -> None:
        self.spec = spec
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        write_message(self.proc.stdin, spec)
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True,
                                        name=f"loadtest-worker-{spec.index}")
        self._thread.start()

    def _read(self, events: queue.Queue[tuple[int, Any]]) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                events.put((self.spec.index, read_message(self.proc.stdout)))
        except (EOFError, OSError):
            events.put((self.spec.index, ("exit", self.spec.index, self.proc.wait())))

    def go(self, start_epoch: float) -> None:
        assert self.proc.stdin is not None
        write_message(self.proc.stdin, start_epoch)

    def stderr_tail(self, n: int = 800) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return text[-n:]

    def stop(self, grace_s: float) -> None:
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.stderr.close()


def run_load_test(config: LoadTestConfig, rows: Sequence[dict[str, float]]) -> LoadTestResult:
    """Run the whole test and return merged results. Raises LoadTestError when it cannot run."""
    config.validate()
    if not rows:
        raise LoadTestError("no payload rows")
    if config.prime:
        prime(config, rows[0])
    specs = worker_specs(config, rows)
    events: queue.Queue[tuple[int, Any]] = queue.Queue()
    workers = [_Worker(s, events) for s in specs]
    results: dict[int, WorkerResult] = {}

    def next_event(deadline: float, what: str) -> tuple[str, int, Any]:
        try:
            _, msg = events.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            raise LoadTestError(what) from None
        kind, index = msg[0], msg[1]
        if kind == "error":
            raise LoadTestError(f"worker {index} failed: {msg[2]}")
        if kind == "exit":
            tail = workers[index].stderr_tail()
            raise LoadTestError(f"worker {index} exited with code {msg[2]}" + (f": {tail}" if tail else ""))
        return kind, index, msg[2] if len(msg) > 2 else None

    try:
        deadline = time.monotonic() + specs[0].connect_timeout_s + 60.0
        ready: set[int] = set()
        while len(ready) < len(specs):
            kind, index, _ = next_event(deadline, f"only {len(ready)} of {len(specs)} workers connected "
                                                  f"to {config.target} in time")
            if kind == "ready":
                ready.add(index)
        start_epoch = time.time() + START_DELAY_S
        for w in workers:
            w.go(start_epoch)
        started_at = datetime.fromtimestamp(start_epoch, UTC)
        deadline = time.monotonic() + START_DELAY_S + config.warmup_s + config.duration_s + \
            config.timeout_s + 60.0
        while len(results) < len(specs):
            kind, index, payload = next_event(deadline, f"{len(specs) - len(results)} worker(s) did not "
                                                        f"finish in time")
            if kind == "ok":
                results[index] = payload
        finished_at = datetime.now(UTC)
    finally:
        done = len(results) == len(specs)
        for w in workers:
            w.stop(grace_s=10.0 if done else 0.0)
    return merge_results(config, [results[i] for i in sorted(results)], started_at, finished_at,
                         specs[0].bucket_s)


def merge_results(config: LoadTestConfig, parts: Sequence[WorkerResult], started_at: datetime,
                  finished_at: datetime, bucket_s: float) -> LoadTestResult:
    """Sum the counts and merge the HDR histograms of every worker."""
    def add(dst: dict[Any, int], src: dict[Any, int]) -> None:
        for k, v in src.items():
            dst[k] = dst.get(k, 0) + v

    errors: dict[str, int] = {}
    messages: dict[str, str] = {}
    versions: dict[int, int] = {}
    for p in parts:
        add(errors, p.errors)
        add(versions, p.versions)
        for k, v in p.error_messages.items():
            messages.setdefault(k, v)
    return LoadTestResult(
        config=config, workers=len(parts), started_at=started_at, finished_at=finished_at,
        hist=merge(p.hist for p in parts), send_lag=merge(p.send_lag for p in parts),
        scheduled=sum(p.scheduled for p in parts), sent=sum(p.sent for p in parts),
        ok=sum(p.ok for p in parts), errors=dict(sorted(errors.items())), error_messages=messages,
        versions=dict(sorted(versions.items())), never_sent=sum(p.never_sent for p in parts),
        window_completed=sum(p.window_completed for p in parts), window_ok=sum(p.window_ok for p in parts),
        peak_in_flight=sum(p.peak_in_flight for p in parts), bucket_s=bucket_s,
        series=_merge_series(parts, bucket_s),
    )


def _merge_series(parts: Sequence[WorkerResult], bucket_s: float) -> dict[str, list[Any]]:
    """Per-bucket scheduled/completed/ok/errors and OK-latency p50/p99/max over the whole run."""
    keys = set()
    for p in parts:
        keys |= set(p.series_scheduled) | set(p.series_completed)
    n = (max(keys) + 1) if keys else 0
    out: dict[str, list[Any]] = {k: [] for k in ("t_s", "scheduled", "completed", "ok", "errors",
                                                 "throughput_rps", "p50_ms", "p99_ms", "max_ms")}
    for b in range(n):
        hist = merge((p.series_hist.get(b, "") for p in parts), SERIES_SIG_FIGS)
        completed = sum(p.series_completed.get(b, 0) for p in parts)
        out["t_s"].append(round(b * bucket_s, 3))
        out["scheduled"].append(sum(p.series_scheduled.get(b, 0) for p in parts))
        out["completed"].append(completed)
        out["ok"].append(sum(p.series_ok.get(b, 0) for p in parts))
        out["errors"].append(sum(p.series_errors.get(b, 0) for p in parts))
        out["throughput_rps"].append(round(completed / bucket_s, 3))
        s = summary_ms(hist)
        out["p50_ms"].append(s["p50"])
        out["p99_ms"].append(s["p99"])
        out["max_ms"].append(s["max"])
    return out

