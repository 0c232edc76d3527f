"""Closed-loop gRPC load client for `chimera bench`: N concurrent callers, each sending its next call
as soon as the previous one is answered, spread over worker processes (grpc.aio), latency recorded in
HDR histograms (microseconds, 3 significant digits) and merged exactly in the parent.

The same client measures every server in the benchmark (Ray Serve's own gRPC proxy and Chimera's
gateway), so their numbers compare like for like:
- requests are serialized once up front and sent as bytes; responses come back as bytes and only a
  sample is parsed and checked, so the client spends its CPU on gRPC, not on protobuf;
- the client runs in its own processes, never in the server's;
- only calls that start after the warm-up and end before the window closes count.

Closed loop means throughput = concurrency / latency: it finds what a server sustains at a given
concurrency, which is what the benchmark compares. (Open-loop load with coordinated-omission-free
latency is loadtest/runner.py's job.)"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

Kind = Literal["predict", "batch", "packed", "stream"]  # packed: PredictBatch with a DenseMatrix
PREDICT = "/chimera.v1.PredictionService/Predict"
PREDICT_BATCH = "/chimera.v1.PredictionService/PredictBatch"
PREDICT_STREAM = "/chimera.v1.PredictionService/PredictStream"
HIST_MAX_US = 60_000_000
MAX_MESSAGE = 64 * 1024 * 1024
CHECK_EVERY = 97  # parse and check one response in this many


@dataclass(frozen=True)
class LoadSpec:
    """One closed-loop measurement. Plain data: it is pickled to the worker processes."""

    target: str
    kind: Kind
    concurrency: int
    duration_s: float
    model: str
    rows: tuple[tuple[float, ...], ...]  # feature rows to cycle through
    feature_names: tuple[str, ...] = ()  # non-empty: send features by name; empty: dense
    warmup_s: float = 1.0
    batch_rows: int = 256  # rows per PredictBatch request
    metadata: tuple[tuple[str, str], ...] = ()
    processes: int = 0  # 0: one per 32 callers, at most 2
    timeout_s: float = 30.0
    n_keys: int = 100_000  # routing keys cycle through user-0..user-{n_keys-1}
    seed: int = 0
    rate: float = 0.0  # > 0: callers pace themselves to this total rate (requests/s); 0: flat out
    # Go client: connections (ClientConns) the callers share round-robin; the Python client has one
    # channel per worker process. Several gateway processes on one port are spread by connection.
    connections: int = 1


@dataclass
class LoadResult:
    kind: str
    concurrency: int
    requests: int  # calls completed OK inside the measurement window
    rows: int  # rows scored by those calls
    errors: int
    error_codes: dict[str, int]
    window_s: float
    rps: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------- payloads
def _requests(spec: LoadSpec, worker: int, n: int) -> list[bytes]:
    """`n` serialized requests for one worker: rows and routing keys cycle, ids left empty (the
    server makes them)."""
    from chimera.v1 import prediction_pb2 as pb

    def one(i: int) -> Any:
        row = spec.rows[i % len(spec.rows)]
        key = f"user-{(i * 7919 + worker * 104729 + spec.seed) % spec.n_keys}"
        if spec.feature_names:
            return pb.PredictRequest(model=spec.model, routing_key=key,
                                     features=dict(zip(spec.feature_names, row, strict=True)))
        return pb.PredictRequest(model=spec.model, routing_key=key, dense=row)

    out: list[bytes] = []
    for j in range(n):
        if spec.kind == "packed":
            idx = [j * spec.batch_rows + k for k in range(spec.batch_rows)]
            x = np.array([spec.rows[i % len(spec.rows)] for i in idx], dtype="<f4")
            keys = [f"user-{(i * 7919 + worker * 104729 + spec.seed) % spec.n_keys}" for i in idx]
            out.append(pb.PredictBatchRequest(model=spec.model, matrix=pb.DenseMatrix(
                f32=x.tobytes(), cols=x.shape[1], routing_keys=keys)).SerializeToString())
        elif spec.kind == "batch":
            base = j * spec.batch_rows
            out.append(pb.PredictBatchRequest(
                model=spec.model, rows=[one(base + k) for k in range(spec.batch_rows)]).SerializeToString())
        else:
            out.append(one(j).SerializeToString())
    return out


def _check(kind: str, data: bytes, batch_rows: int) -> None:
    from chimera.v1 import prediction_pb2 as pb

    if kind == "packed":
        resp = pb.PredictBatchResponse.FromString(data)
        if len(resp.scores) != batch_rows or not all(0.0 <= s <= 1.0 for s in resp.scores):
            raise ValueError(f"bad packed PredictBatch response: {len(resp.scores)} scores")
    elif kind == "batch":
        resp = pb.PredictBatchResponse.FromString(data)
        if len(resp.results) != batch_rows or not all(0.0 <= r.score <= 1.0 for r in resp.results):
            raise ValueError(f"bad PredictBatch response: {len(resp.results)} results")
    elif kind == "stream":
        s = pb.PredictStreamResponse.FromString(data)
        if s.WhichOneof("result") != "prediction" or not 0.0 <= s.prediction.score <= 1.0:
            raise ValueError(f"bad PredictStream response: {s}")
    else:
        r = pb.PredictResponse.FromString(data)
        if not 0.0 <= r.score <= 1.0 or not r.request_id:
            raise ValueError(f"bad Predict response: {r}")


# --------------------------------------------------------------------------- worker process
def _worker_main(spec: LoadSpec, index: int, callers: int, conn: Connection) -> None:
    try:
        result = asyncio.run(_worker(spec, index, callers, conn))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("done", result))


async def _worker(spec: LoadSpec, index: int, callers: int, conn: Connection) -> dict[str, Any]:
    n_payloads = 64 if spec.kind in ("batch", "packed") else 2048
    payloads = _requests(spec, index, n_payloads)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE)]
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    codes: Counter[str] = Counter()
    done = 0
    rows_per_call = spec.batch_rows if spec.kind in ("batch", "packed") else 1
    md = spec.metadata or None
    async with grpc.aio.insecure_channel(spec.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        # Parent starts everyone at the same wall-clock time once all workers are connected.
        conn.send(("ready", os.getpid()))
        start_at: float = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        measure_from = start_at + spec.warmup_s
        stop_at = measure_from + spec.duration_s
        await asyncio.sleep(max(0.0, start_at - time.time()))

        if spec.kind == "stream":
            call = channel.stream_stream(PREDICT_STREAM)
        else:
            call = channel.unary_unary(PREDICT_BATCH if spec.kind in ("batch", "packed") else PREDICT)

        # Pacing (soak): caller c sends its k-th call at start_at + (k + c / callers) / per_caller_rate.
        per_caller = spec.rate / spec.concurrency if spec.rate > 0 else 0.0

        async def unary_caller(c: int) -> None:
            nonlocal done
            i = c
            n = len(payloads)
            timeout = spec.timeout_s or None
            k = 0
            while True:
                t0 = time.time()
                if per_caller:
                    due = start_at + (k + c / callers) / per_caller
                    k += 1
                    if due > t0:
                        await asyncio.sleep(due - t0)
                        t0 = time.time()
                if t0 >= stop_at:
                    return
                try:
                    data = await call(payloads[i % n], timeout=timeout, metadata=md)
                    ok = True
                except grpc.RpcError as exc:
                    ok = False
                    code = exc.code().name if exc.code() is not None else "UNKNOWN"
                t1 = time.time()
                if t0 >= measure_from and t1 <= stop_at:
                    if ok:
                        hist.record_value(min(max(int((t1 - t0) * 1e6), 1), HIST_MAX_US))
                        done += 1
                        if done % CHECK_EVERY == 0:
                            _check(spec.kind, data, spec.batch_rows)
                    else:
                        codes[code] += 1
                i += callers

        async def stream_caller(c: int) -> None:
            """Ping-pong on one bidirectional stream: one message in flight per caller."""
            nonlocal done
            stream = call(timeout=spec.warmup_s + spec.duration_s + 60, metadata=md)
            i = c
            n = len(payloads)
            try:
                while True:
                    t0 = time.time()
                    if t0 >= stop_at:
                        break
                    await stream.write(payloads[i % n])
                    data = await stream.read()
                    t1 = time.time()
                    if data is grpc.aio.EOF:
                        codes["EOF"] += 1
                        return
                    if t0 >= measure_from and t1 <= stop_at:
                        hist.record_value(min(max(int((t1 - t0) * 1e6), 1), HIST_MAX_US))
                        done += 1
                        if done % CHECK_EVERY == 0:
                            _check(spec.kind, data, spec.batch_rows)
                    i += callers
                await stream.done_writing()
                while await stream.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError as exc:
                codes[exc.code().name if exc.code() is not None else "UNKNOWN"] += 1

        caller = stream_caller if spec.kind == "stream" else unary_caller
        await asyncio.gather(*(caller(c) for c in range(callers)))
    return {"hist": hist.encode(), "done": done, "rows": done * rows_per_call, "codes": dict(codes)}


# --------------------------------------------------------------------------- parent
def run(spec: LoadSpec) -> LoadResult:
    """Run one closed-loop measurement and return merged results."""
    procs = spec.processes or max(1, min(2, spec.concurrency // 32))
    procs = min(procs, spec.concurrency)
    shares = [spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    workers: list[tuple[Any, Connection]] = []
    try:
        for i, share in enumerate(shares):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(spec, i, share, child), daemon=True,
                            name=f"chimera-bench-client-{i}")
            p.start()
            workers.append((p, parent))
        for _, conn in workers:
            if not conn.poll(90):
                raise RuntimeError("load client worker did not connect within 90 s")
            tag, info = conn.recv()
            if tag != "ready":
                raise RuntimeError(f"load client worker failed: {info}")
        start_at = time.time() + 0.2
        for _, conn in workers:
            conn.send(start_at)
        merged = HdrHistogram(1, HIST_MAX_US, 3)
        done = rows = 0
        codes: Counter[str] = Counter()
        deadline = start_at + spec.warmup_s + spec.duration_s + spec.timeout_s + 60
        for _, conn in workers:
            if not conn.poll(max(1.0, deadline - time.time())):
                raise RuntimeError("load client worker did not finish in time")
            tag, info = conn.recv()
            if tag != "done":
                raise RuntimeError(f"load client worker failed: {info}")
            merged.add(HdrHistogram.decode(info["hist"]))
            done += info["done"]
            rows += info["rows"]
            codes.update(info["codes"])
    finally:
        for p, conn in workers:
            p.join(10)
            if p.is_alive():
                p.kill()  # our own child, by handle
            conn.close()
    window = spec.duration_s
    return LoadResult(
        kind=spec.kind, concurrency=spec.concurrency, requests=done, rows=rows, errors=sum(codes.values()),
        error_codes=dict(codes), window_s=window, rps=done / window, rows_per_s=rows / window,
        p50_ms=merged.get_value_at_percentile(50) / 1e3 if done else float("nan"),
        p90_ms=merged.get_value_at_percentile(90) / 1e3 if done else float("nan"),
        p99_ms=merged.get_value_at_percentile(99) / 1e3 if done else float("nan"),
        max_ms=merged.get_max_value() / 1e3 if done else float("nan"),
    )
