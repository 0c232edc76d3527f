"""One load-generating worker process: a grpc.aio client firing its share of the open-loop schedule.

Why processes: one Python event loop tops out at a few thousand unary calls/s, and the parent must
stay free to supervise, so the target rate is spread over several processes (see runner.py).

Why latency counts from the intended send time: a closed-loop client (send, wait, send) stops sending
while the server stalls, so the stall shows up as one slow request instead of every request that
*should* have been sent during it (coordinated omission). Here every arrival is scheduled up front;
its latency is `completion - intended time`, so time spent waiting for a stalled server, for a
concurrency-limit slot, or for a busy client loop all counts.

Concurrency limit: when `concurrency_limit` calls are in flight, a due arrival is *not* dropped; it
waits for a slot and its latency still counts from its intended time (the wait shows as send lag).
If by its turn it is older than the request timeout it is never sent and counts as a client-side
DEADLINE_EXCEEDED error (`never_sent`). Every call's deadline is the timeout minus that wait, so
no request is ever reported faster than it was served.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import grpc

from chimera.client import aio_channel
from loadtest.histogram import SERIES_SIG_FIGS, encode, new_histogram, record_seconds
from loadtest.schedule import Arrival, worker_schedule

WRONG_VERSION = "WRONG_VERSION"  # a pinned request answered by another version: the pin was ignored
CLIENT_ERROR = "CLIENT_ERROR"  # the client failed to issue the call (not a gRPC status)
MAX_MESSAGE = 300
PREDICT_METHOD = "/chimera.v1.PredictionService/Predict"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker needs; pickled to the child process (spawn), so plain data only."""

    index: int
    n_workers: int
    target: str
    model: str
    version: int  # 0: routed by the split
    rate: float  # the *total* target rate; this worker takes its share of the schedule
    warmup_s: float
    duration_s: float
    arrival: Arrival
    rows: tuple[dict[str, float], ...]
    metadata: tuple[tuple[str, str], ...] = ()
    concurrency_limit: int = 0  # this worker's share; 0: unlimited
    timeout_s: float = 10.0
    bucket_s: float = 1.0
    seed: int = 0
    connect_timeout_s: float = 30.0


@dataclass
class WorkerResult:
    """Raw per-worker counts and encoded histograms; runner.merge_results combines them."""

    index: int
    hist: str = ""  # latency of OK responses to measured arrivals (µs, HDR, encoded)
    send_lag: str = ""  # actual send - intended send, measured arrivals
    scheduled: int = 0
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_messages: dict[str, str] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    never_sent: int = 0
    window_completed: int = 0  # completions (any code) inside the measured window, by completion time
    window_ok: int = 0
    peak_in_flight: int = 0
    # Time series over the whole run (warmup included), bucket k = [k*bucket_s, (k+1)*bucket_s):
    series_scheduled: dict[int, int] = field(default_factory=dict)  # by intended time
    series_errors: dict[int, int] = field(default_factory=dict)  # by intended time
    series_hist: dict[int, str] = field(default_factory=dict)  # OK latency by intended time
    series_completed: dict[int, int] = field(default_factory=dict)  # by completion time
    series_ok: dict[int, int] = field(default_factory=dict)  # by completion time
    started_epoch: float = 0.0


class _Recorder:
    """Counts for one worker. Hot path: a few dict/int operations and one histogram record."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.result = WorkerResult(index=spec.index)
        self.hist = new_histogram()
        self.send_lag = new_histogram()
        self.series_hist: dict[int, Any] = {}
        self.in_flight = 0

    def bucket(self, offset: float) -> int:
        return max(0, int(offset // self.spec.bucket_s))

    def scheduled(self, offset: float) -> None:
        r = self.result
        b = self.bucket(offset)
        r.series_scheduled[b] = r.series_scheduled.get(b, 0) + 1
        if offset >= self.spec.warmup_s:
            r.scheduled += 1

    def finished(self, offset: float, send_offset: float | None, done_offset: float, code: str,
                 version: int, message: str = "") -> None:
        r = self.result
        spec = self.spec
        measured = offset >= spec.warmup_s
        latency = done_offset - offset
        b = self.bucket(offset)
        if code == "OK":
            h = self.series_hist.get(b)
            if h is None:
                h = self.series_hist[b] = new_histogram(SERIES_SIG_FIGS)
            record_seconds(h, latency)
        else:
            r.series_errors[b] = r.series_errors.get(b, 0) + 1
        cb = self.bucket(done_offset)
        r.series_completed[cb] = r.series_completed.get(cb, 0) + 1
        if code == "OK":
            r.series_ok[cb] = r.series_ok.get(cb, 0) + 1
        if spec.warmup_s <= done_offset <= spec.warmup_s + spec.duration_s:
            r.window_completed += 1
            if code == "OK":
                r.window_ok += 1
        if not measured:
            return
        if send_offset is not None:
            r.sent += 1
            record_seconds(self.send_lag, send_offset - offset)
        else:
            r.never_sent += 1
        if code == "OK":
            r.ok += 1
            record_seconds(self.hist, latency)
            r.versions[version] = r.versions.get(version, 0) + 1
        else:
            r.errors[code] = r.errors.get(code, 0) + 1
            if code not in r.error_messages:
                r.error_messages[code] = (message or code)[:MAX_MESSAGE]

    def finish(self) -> WorkerResult:
        r = self.result
        r.hist = encode(self.hist)
        r.send_lag = encode(self.send_lag)
        r.series_hist = {b: encode(h) for b, h in self.series_hist.items()}
        return r


async def run_worker(spec: WorkerSpec, start_epoch: float | None = None,
                     on_ready: Any = None, wait_go: Any = None) -> WorkerResult:
    """Connect, report ready, wait for the common start time, fire the schedule, drain.

    `on_ready()` is called once connected; `wait_go()` (blocking, run in a thread) returns the
    common start time as a Unix epoch. Tests may instead pass `start_epoch` directly."""
    from chimera.v1 import prediction_pb2 as pb

    if not spec.rows:
        raise ValueError("rows: no payload rows")
    # Serialized once: the client's CPU goes to gRPC, not to building protobufs per call. Responses are
    # parsed (the answering version is checked against the pin).
    requests = [pb.PredictRequest(model=spec.model, version=spec.version, features=row).SerializeToString()
                for row in spec.rows]
    rec = _Recorder(spec)
    metadata = tuple(spec.metadata) or None
    sem = asyncio.Semaphore(spec.concurrency_limit) if spec.concurrency_limit > 0 else None
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
               ("grpc.enable_retries", 0)]
    async with aio_channel(spec.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), spec.connect_timeout_s)
        predict = channel.unary_unary(PREDICT_METHOD, request_serializer=None,
                                      response_deserializer=pb.PredictResponse.FromString)
        if on_ready is not None:
            on_ready()
        if start_epoch is None:
            start_epoch = await asyncio.to_thread(wait_go)
        loop = asyncio.get_running_loop()
        # loop.time() is monotonic; anchor the shared wall-clock start time to it once.
        t0 = loop.time() + (float(start_epoch) - time.time())
        rec.result.started_epoch = float(start_epoch)

        async def fire(offset: float, request: Any) -> None:
            send_offset: float | None = None
            version = 0
            message = ""
            if sem is not None:
                await sem.acquire()
            try:
                now = loop.time() - t0
                remaining = spec.timeout_s - (now - offset)
                if remaining <= 0:
                    code = "DEADLINE_EXCEEDED"
                    message = ("client-side: by its turn the arrival was older than the timeout (waiting for "
                               "a concurrency-limit slot, or the client fell behind); never sent")
                else:
                    send_offset = now
                    rec.in_flight += 1
                    if rec.in_flight > rec.result.peak_in_flight:
                        rec.result.peak_in_flight = rec.in_flight
                    try:
                        resp = await predict(request, metadata=metadata, timeout=remaining)
                        version = resp.version
                        code = "OK"
                        if spec.version and version != spec.version:
                            code = WRONG_VERSION
                            message = f"pinned version {spec.version}, answered by version {version}"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                        message = exc.details() or ""
                    except Exception as exc:  # a client bug must not kill the whole run
                        code = CLIENT_ERROR
                        message = f"{type(exc).__name__}: {exc}"
                    finally:
                        rec.in_flight -= 1
            finally:
                if sem is not None:
                    sem.release()
            rec.finished(offset, send_offset, loop.time() - t0, code, version, message)

        tasks: set[asyncio.Task[None]] = set()
        total_s = spec.warmup_s + spec.duration_s
        burst = 0
        for k, offset in enumerate(worker_schedule(spec.rate, total_s, spec.index, spec.n_workers,
                                                   spec.arrival, spec.seed)):
            delay = t0 + offset - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
                burst = 0
            else:
                burst += 1
                if burst % 64 == 0:  # behind schedule: still let responses be processed
                    await asyncio.sleep(0)
            rec.scheduled(offset)
            task = loop.create_task(fire(offset, requests[(k * spec.n_workers + spec.index) % len(requests)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
    return rec.finish()


# ---------------------------------------------------------------- process protocol
# Workers are started as `python -m loadtest.worker` (not multiprocessing): multiprocessing's spawn
# re-imports the caller's __main__ in every child, which breaks any script without a main guard,
# and fork is unsafe in a process holding gRPC state. The protocol is length-prefixed pickles over
# the child's stdin/stdout (parent and child are the same trusted program):
#   parent -> child: WorkerSpec, later the start time (float, Unix epoch)
#   child -> parent: ("ready", index), then ("ok", index, WorkerResult) or ("error", index, message)

def write_message(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("!Q", len(data)))
    stream.write(data)
    stream.flush()


def read_message(stream: BinaryIO) -> Any:
    """The next message; EOFError when the other side closed the pipe."""
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("pipe closed")
    (n,) = struct.unpack("!Q", header)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("pipe closed mid-message")
    return pickle.loads(data)


def worker_main() -> None:
    """Process entry point. Always writes exactly one final message ("ok" or "error")."""
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (ours or a library's) must not corrupt the protocol stream
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    spec: WorkerSpec = read_message(proto_in)

    def on_ready() -> None:
        write_message(proto_out, ("ready", spec.index))

    def wait_go() -> float:
        return float(read_message(proto_in))

    try:
        result = asyncio.run(run_worker(spec, on_ready=on_ready, wait_go=wait_go))
        write_message(proto_out, ("ok", spec.index, result))
    except BaseException as exc:  # report, never leave the parent guessing
        msg = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            msg = f"could not connect to {spec.target} within {spec.connect_timeout_s:g} s"
        elif isinstance(exc, EOFError):
            msg = "the parent went away before the start signal"
        write_message(proto_out, ("error", spec.index, msg))


def bucket_width(total_s: float, max_buckets: int = 600) -> float:
    """1-second buckets up to 10 minutes; wider ones beyond, so the series stays plottable and small."""
    return float(max(1, math.ceil(total_s / max_buckets)))


if __name__ == "__main__":
    # Run the copy imported as `loadtest.worker`, so pickled results name that module, not __main__.
    from loadtest.worker import worker_main as _entry

    _entry()
