"""`chimera bench` (`make bench`): one run, one machine, one model, three ways to serve it.

  (a) raw onnxruntime (replicas.scorer.OnnxScorer, one thread) at batch 1 and batch 256;
  (b) Ray Serve's own gRPC proxy in front of one replica scoring one row per call;
  (c) Chimera's gateway as a separate `chimera serve` process, with a live 90/10 split between two
      versions of the model and prediction logging on: unary Predict at concurrency 1, 8 and 64,
      PredictBatch with 256 rows, and PredictStream.

The model is training.benchmark.benchmark_model (XGBoost, 200 trees of depth 6, 32 features, ONNX).
(b) and (c) are measured by the same closed-loop client (loadtest.closed_loop) in separate worker
processes with the same serialized requests. Ray is started here with num_cpus=2 and shut down at
the end; the gateway joins it through RAY_ADDRESS. Only processes this command started are stopped,
by pid.

Output: a table, and (`--json`) every case's rps / p50 / p99, the ratios the issue sets targets for,
and pass/fail per target. `--soak S` adds S seconds of Predict at 70 % of the measured c=64 rate and
reports the gateway's resident memory after one minute and at the end."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.closed_loop import LoadResult, LoadSpec, run

MODEL = "bench"
NATIVE_APP = "ray-native-bench"
UNARY_CONCURRENCY = (1, 8, 64)
BATCH_ROWS = 256


@dataclass
class BenchOptions:
    json_path: Path | None = None
    duration_s: float = 10.0
    warmup_s: float = 2.0
    soak_s: float = 0.0
    batch_concurrency: int = 8
    stream_concurrency: int = 64
    named_features: bool = False  # send features by name instead of dense vectors
    quick: bool = False
    registry_url: str | None = None  # default: a fresh SQLite file in the work directory
    workdir: Path | None = None
    keep_workdir: bool = False
    profile_s: float = 0.0  # > 0: py-spy the gateway for this long during the c=64 case
    profile_path: Path | None = None
    profile_case: str = "chimera_c64"  # which gateway case py-spy watches
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _percentiles(samples_s: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_onnx(onnx_bytes: bytes, x: np.ndarray, batch: int, seconds: float) -> dict[str, Any]:
    """Raw onnxruntime through the replicas' own scorer: calls per second and rows per second."""
    from replicas.scorer import OnnxScorer

    scorer = OnnxScorer(onnx_bytes, hashlib.sha256(onnx_bytes).hexdigest())
    n = len(x)
    batches = [x[(i * batch) % n:(i * batch) % n + batch] for i in range(max(1, n // batch))]
    batches = [b for b in batches if len(b) == batch] or [np.resize(x, (batch, x.shape[1]))]
    for b in batches[:20]:
        scorer.score(b)
    lat: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        scorer.score(batches[i % len(batches)])
        lat.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - started
    p50, p99 = _percentiles(lat)
    return {"kind": f"onnxruntime batch {batch}", "batch": batch, "requests": i, "rps": i / elapsed,
            "rows_per_s": i * batch / elapsed, "p50_ms": p50, "p99_ms": p99}


class MetricsScrape:
    """Reads the gateway's Prometheus endpoint: rows per Ray call and prediction-log counters."""

    def __init__(self, port: int | None) -> None:
        self.port = port

    def sample(self) -> dict[str, float]:
        if not self.port:
            return {}
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            base = name.split("{", 1)[0]
            if base in ("chimera_batch_size_rows_sum", "chimera_batch_size_rows_count",
                        "chimera_prediction_log_inserted_rows", "chimera_prediction_log_spilled_rows",
                        "chimera_prediction_log_backpressure_rows", "chimera_prediction_log_queue_depth"):
                out[base] = out.get(base, 0.0) + float(value)
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        calls = after.get("chimera_batch_size_rows_count", 0) - before.get("chimera_batch_size_rows_count", 0)
        rows = after.get("chimera_batch_size_rows_sum", 0) - before.get("chimera_batch_size_rows_sum", 0)
        return {"ray_calls": calls, "rows_per_ray_call": rows / calls if calls else 0.0,
                "log_inserted_total": after.get("chimera_prediction_log_inserted_rows", 0.0),
                "log_spilled_total": after.get("chimera_prediction_log_spilled_rows", 0.0),
                "log_backpressure_total": after.get("chimera_prediction_log_backpressure_rows", 0.0),
                "log_queue_depth": after.get("chimera_prediction_log_queue_depth", 0.0)}


# --------------------------------------------------------------------------- Ray Serve native
def _native_deployment(onnx_bytes: bytes, feature_names: list[str]) -> Any:
    """Ray Serve's documented gRPC pattern: a deployment whose method is named after the RPC, taking
    and returning the protobuf messages; Ray's proxy routes by the `application` metadata. It scores
    one row per call, with the same projection rules as the gateway. Ray Serve defaults except
    max_ongoing_requests: at the default (5) a closed loop of 64 callers makes the proxy's router back
    off for up to 0.5 s per retry (measured: 5-20 req/s), which would flatter Chimera; 128 lets the
    replica take every caller, which is Ray's best case here."""
    from ray import serve

    @serve.deployment(name="native", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
    class NativePredictor:
        def __init__(self, data: bytes, names: list[str]) -> None:
            from replicas.scorer import OnnxScorer

            self.scorer = OnnxScorer(data, hashlib.sha256(data).hexdigest())
            self.names = list(names)

        def Predict(self, request: Any) -> Any:  # noqa: N802 - the gRPC method name
            from chimera.v1 import prediction_pb2 as pb

            if request.dense:
                row = np.asarray(list(request.dense), dtype=np.float32)
            else:
                row = np.asarray([request.features[n] for n in self.names], dtype=np.float32)
            score = float(self.scorer.score(row.reshape(1, -1))[0])
            return pb.PredictResponse(request_id=request.request_id or uuid.uuid4().hex,
                                      model=request.model, version=1, score=score)

    return NativePredictor.bind(onnx_bytes, feature_names)


# --------------------------------------------------------------------------- grpc.aio echo (ceiling)
def echo_server_main(port: int) -> None:
    """A bare grpc.aio server answering Predict with a constant: the most any Python gRPC server can
    do on this machine with this client (no routing, no Ray, no logging)."""
    import asyncio

    import grpc

    from chimera.v1 import prediction_pb2 as pb
    from chimera.v1 import prediction_pb2_grpc as pb_grpc

    class Echo(pb_grpc.PredictionServiceServicer):
        async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
            return pb.PredictResponse(request_id=request.request_id or "echo", model=request.model, version=1,
                                      score=0.5)

    async def serve_echo() -> None:
        server = grpc.aio.server()
        pb_grpc.add_PredictionServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve_echo())


class EchoProcess:
    def __init__(self) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "loadtest.bench", "--echo-server", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_serving(self, timeout: float = 60.0) -> None:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            grpc.channel_ready_future(ch).result(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by handle
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --------------------------------------------------------------------------- Chimera gateway
class GatewayProcess:
    """`chimera serve` in its own process, joined to this process's Ray cluster."""

    def __init__(self, registry_url: str, ray_address: str, workdir: Path, admin_token: str) -> None:
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.log_path = workdir / "gateway.log"
        exe = Path(sys.executable).with_name("chimera")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "chimera"]
        cmd += ["serve", "--port", str(self.port), "--host", "127.0.0.1", "--metrics-port",
                str(self.metrics_port), "--controller-interval", "0", "--grace", "5"]
        env = dict(os.environ, CHIMERA_REGISTRY_URL=registry_url, RAY_ADDRESS=ray_address,
                   CHIMERA_ADMIN_TOKEN=admin_token, RAY_USAGE_STATS_ENABLED="0")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def wait_serving(self, timeout: float = 240.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log_path}:\n"
                                       + self.tail())
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service="chimera.v1.PredictionService"),
                                   timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"gateway not serving after {timeout:.0f} s; see {self.log_path}:\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (graceful: drains calls, flushes the log), then SIGKILL after 60 s. Only our pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _profile(pid: int, seconds: float, out: Path,
             log: Callable[[str], None]) -> subprocess.Popen[bytes] | None:
    """py-spy record of the gateway (if py-spy is installed): a speedscope/flamegraph file."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        log("py-spy not installed (pip install py-spy); skipping the profile")
        return None
    fmt = "speedscope" if out.suffix == ".json" else ("raw" if out.suffix == ".txt" else "flamegraph")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
           "--format", fmt, "--output", str(out), "--nonblocking", "--gil"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the run
def run_bench(opts: BenchOptions) -> dict[str, Any]:
    log = opts.log
    if opts.quick:
        opts = replace(opts, duration_s=min(opts.duration_s, 1.0), warmup_s=min(opts.warmup_s, 0.3),
                       soak_s=min(opts.soak_s, 3.0))
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="chimera-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "log"},
        "cases": {},
    }
    cases: dict[str, Any] = report["cases"]
    load_start = os.getloadavg()

    log("training the benchmark model (XGBoost, 200 trees, depth 6, 32 features) twice: v1 and v2 ...")
    from training.benchmark import benchmark_model

    onnx1, names, x = benchmark_model(0)
    onnx2, names2, _ = (onnx1, names, x) if opts.quick else benchmark_model(1)
    if list(names2) != list(names):
        raise RuntimeError("the two benchmark versions have different features")
    rows = tuple(tuple(float(v) for v in r) for r in x)

    # (a) raw onnxruntime -------------------------------------------------------------------------
    onnx_s = max(0.5, opts.duration_s / 2)
    for batch in (1, BATCH_ROWS):
        cases[f"onnx_batch{batch}"] = bench_onnx(onnx1, x, batch, onnx_s)
        log(_line(f"onnx_batch{batch}", cases[f"onnx_batch{batch}"]))

    base = LoadSpec(target="", kind="predict", concurrency=1, duration_s=opts.duration_s, model=MODEL,
                    rows=rows, feature_names=tuple(names) if opts.named_features else (),
                    warmup_s=opts.warmup_s)

    # Reference: a bare grpc.aio echo server with the same client (the ceiling for Python gRPC here).
    echo = EchoProcess()
    try:
        echo.wait_serving()
        for c in (1, 64):
            res = run(replace(base, target=f"127.0.0.1:{echo.port}", concurrency=c))
            cases[f"echo_c{c}"] = _case(f"bare grpc.aio echo server (ceiling), Predict, c={c}", res)
            log(_line(f"echo_c{c}", cases[f"echo_c{c}"]))
    finally:
        echo.stop()

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    log("starting Ray (num_cpus=2) and Serve with its gRPC proxy ...")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    gateway: GatewayProcess | None = None
    try:
        grpc_port = _free_port()
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                        "chimera.v1.prediction_pb2_grpc.add_PredictionServiceServicer_to_server"]))
        serve.run(_native_deployment(onnx1, list(names)), name=NATIVE_APP, route_prefix=f"/{NATIVE_APP}")

        # (b) Ray Serve native gRPC proxy ---------------------------------------------------------
        native = replace(base, target=f"127.0.0.1:{grpc_port}", metadata=(("application", NATIVE_APP),))
        for c in UNARY_CONCURRENCY:
            res = run(replace(native, concurrency=c))
            cases[f"ray_c{c}"] = _case(f"Ray Serve gRPC proxy, Predict, c={c}", res)
            log(_line(f"ray_c{c}", cases[f"ray_c{c}"]))
        serve.delete(NATIVE_APP)

        # (c) Chimera gateway ----------------------------------------------------------------------
        from registry import Registry

        url = opts.registry_url or f"sqlite:///{workdir / 'registry.db'}"
        reg = Registry(url)
        reg.upgrade()
        model = MODEL if opts.registry_url is None else f"{MODEL}-{uuid.uuid4().hex[:6]}"
        reg.publish_version(model, onnx1, list(names))
        reg.publish_version(model, onnx2, list(names))
        reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="chimera-bench", reason="bench 90/10")
        log("starting the gateway (`chimera serve`, separate process) with a 90/10 split ...")
        ray_address = ray.get_runtime_context().gcs_address
        gateway = GatewayProcess(url, ray_address, workdir, admin_token=uuid.uuid4().hex)
        gateway.wait_serving()
        scrape = MetricsScrape(gateway.metrics_port)
        chimera = replace(base, target=f"127.0.0.1:{gateway.port}", model=model)
        report["gateway"] = {"pid": gateway.pid, "rss_mb_after_start": rss_mb(gateway.pid)}

        def measure(name: str, title: str, spec: LoadSpec) -> LoadResult:
            before = scrape.sample()
            prof = None
            if name == opts.profile_case and opts.profile_s > 0:
                out = opts.profile_path or workdir / "gateway-profile.svg"
                prof = _profile(gateway.pid, min(opts.profile_s, opts.duration_s), out, log)
                report["profile"] = str(out)
            res = run(spec)
            if prof is not None:
                prof.wait(60)
            cases[name] = _case(title, res)
            cases[name].update(MetricsScrape.delta(before, scrape.sample()))
            log(_line(name, cases[name]))
            return res

        for c in UNARY_CONCURRENCY:
            measure(f"chimera_c{c}", f"Chimera gateway, Predict, c={c}", replace(chimera, concurrency=c))
        measure(f"chimera_batch{BATCH_ROWS}",
                f"Chimera gateway, PredictBatch {BATCH_ROWS} rows, c={opts.batch_concurrency}",
                replace(chimera, kind="batch", concurrency=opts.batch_concurrency))
        measure(f"chimera_packed{BATCH_ROWS}",
                f"Chimera gateway, PredictBatch {BATCH_ROWS} rows packed, c={opts.batch_concurrency}",
                replace(chimera, kind="packed", concurrency=opts.batch_concurrency))
        measure(f"chimera_stream_c{opts.stream_concurrency}",
                f"Chimera gateway, PredictStream ping-pong, {opts.stream_concurrency} streams",
                replace(chimera, kind="stream", concurrency=opts.stream_concurrency))
        report["gateway"]["rss_mb_after_cases"] = rss_mb(gateway.pid)

        if opts.soak_s > 0:
            report["soak"] = _soak(gateway.pid, chimera, cases["chimera_c64"]["rps"], opts, log)
        n_logged = _count_logged(reg, model)
        report["gateway"]["predictions_logged"] = n_logged
        reg.dispose()
    finally:
        if gateway is not None:
            log(f"stopping the gateway (SIGTERM, pid {gateway.pid}) ...")
            gateway.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        if not opts.keep_workdir and opts.workdir is None and not opts.profile_s:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_start"] = [round(v, 2) for v in load_start]
    report["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["ratios"], report["targets"] = _targets(cases, report.get("soak"))
    report["reference"] = {
        "chimera_rps_c64_over_echo_rps_c64": _ratio(cases["chimera_c64"]["rps"], cases["echo_c64"]["rps"]),
        "ray_rps_c64_over_echo_rps_c64": _ratio(cases["ray_c64"]["rps"], cases["echo_c64"]["rps"]),
        "chimera_stream_rps_over_ray_rps_c64": _ratio(
            cases[f"chimera_stream_c{opts.stream_concurrency}"]["rps"], cases["ray_c64"]["rps"]),
    }
    return report


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b and np.isfinite(a) and np.isfinite(b) else None


def _count_logged(reg: Any, model: str) -> int | None:
    try:
        from sqlalchemy import func, select

        from registry.models import Prediction

        with reg.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Prediction)
                                    .where(Prediction.model == model)).scalar_one())
    except Exception:
        return None


def _soak(pid: int, spec: LoadSpec, max_rps: float, opts: BenchOptions,
          log: Callable[[str], None]) -> dict[str, Any]:
    """Predict at 70 % of the measured c=64 throughput for opts.soak_s seconds; RSS after 1 min and at
    the end (in --quick, after 1/3 of the run instead of 1 min)."""
    rate = 0.7 * max_rps
    first_at = 60.0 if opts.soak_s >= 120 else opts.soak_s / 3
    log(f"soak: {opts.soak_s:.0f} s at {rate:.0f} req/s (70 % of {max_rps:.0f}) ...")
    soak_spec = replace(spec, concurrency=64, rate=rate, duration_s=opts.soak_s, warmup_s=0.0,
                        timeout_s=10.0)
    result: dict[str, Any] = {}
    samples: list[tuple[float, float]] = []

    def load() -> None:
        result["load"] = run(soak_spec)

    t = threading.Thread(target=load, name="soak-load")
    started = time.monotonic()
    t.start()
    rss_first: float | None = None
    # Sample often enough that even a seconds-long --quick soak gets its first reading in time.
    every = min(5.0, max(0.2, opts.soak_s / 20))
    startup = 2.0 if opts.soak_s >= 120 else 0.0  # the load client's own start-up
    while t.is_alive():
        t.join(every)
        elapsed = time.monotonic() - started
        try:
            rss = rss_mb(pid)
        except (OSError, RuntimeError):
            break
        samples.append((round(elapsed, 1), round(rss, 1)))
        if rss_first is None and elapsed >= first_at + startup:
            rss_first = rss
    rss_end = rss_mb(pid)
    load_res: LoadResult = result["load"]
    growth = (rss_end / rss_first - 1.0) if rss_first else None
    out = {"seconds": opts.soak_s, "target_rps": rate, "achieved_rps": load_res.rps,
           "p99_ms": load_res.p99_ms, "errors": load_res.errors, "rss_mb_first": rss_first,
           "rss_first_at_s": first_at, "rss_mb_end": rss_end, "rss_growth": growth, "rss_samples": samples}
    log(f"soak: rss {rss_first} MiB at {first_at:.0f} s -> {rss_end:.1f} MiB at the end "
        f"({(growth or 0) * 100:+.1f} %), {load_res.rps:.0f} req/s, p99 {load_res.p99_ms:.1f} ms")
    return out


def _case(title: str, res: LoadResult) -> dict[str, Any]:
    d = res.as_dict()
    d["title"] = title
    return d


def _line(name: str, case: dict[str, Any]) -> str:
    extra = ""
    if case.get("rows_per_ray_call"):
        extra = f"  rows/Ray call {case['rows_per_ray_call']:.1f}"
    if case.get("errors"):
        extra += f"  errors {case['errors']} {case.get('error_codes')}"
    return (f"  {name:22s} {case['rps']:>10.0f} req/s {case['rows_per_s']:>10.0f} rows/s "
            f"p50 {case['p50_ms']:8.2f} ms  p99 {case['p99_ms']:8.2f} ms{extra}")


TARGETS: tuple[tuple[str, str, str, float], ...] = (
    # (ratio key, what it is, comparison, bound)
    ("chimera_rps_c64_over_ray_rps_c64", "Chimera unary rps at c=64 / Ray native rps at c=64", ">=", 10.0),
    ("chimera_p99_c64_over_ray_p99_c64", "Chimera p99 at c=64 / Ray native p99 at c=64", "<=", 0.25),
    ("chimera_p50_c1_over_ray_p50_c1", "Chimera p50 at c=1 / Ray native p50 at c=1", "<=", 1.0),
    ("predictbatch_rows_per_s_over_onnx_batch256_rows_per_s",
     "PredictBatch(256, packed matrix) rows/s / raw onnxruntime batch-256 rows/s", ">=", 0.5),
    ("soak_rss_growth", "gateway RSS at the end of the soak / RSS after 1 minute - 1", "<=", 0.10),
)


def _targets(cases: dict[str, Any], soak: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    c64, r64, c1, r1 = cases["chimera_c64"], cases["ray_c64"], cases["chimera_c1"], cases["ray_c1"]
    ratios: dict[str, float | None] = {
        "chimera_rps_c64_over_ray_rps_c64": _ratio(c64["rps"], r64["rps"]),
        "chimera_p99_c64_over_ray_p99_c64": _ratio(c64["p99_ms"], r64["p99_ms"]),
        "chimera_p50_c1_over_ray_p50_c1": _ratio(c1["p50_ms"], r1["p50_ms"]),
        "predictbatch_rows_per_s_over_onnx_batch256_rows_per_s":
            _ratio(cases[f"chimera_packed{BATCH_ROWS}"]["rows_per_s"],
                   cases[f"onnx_batch{BATCH_ROWS}"]["rows_per_s"]),
        "soak_rss_growth": soak.get("rss_growth") if soak else None,
    }
    targets: dict[str, Any] = {}
    for key, what, op, bound in TARGETS:
        value = ratios[key]
        passed = None if value is None else (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"what": what, "value": None if value is None else round(value, 4),
                        "target": f"{op} {bound:g}", "pass": passed}
    return ratios, targets


def _machine() -> dict[str, Any]:
    import grpc
    import onnxruntime
    import ray

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__}


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
    lines.append(f"{'target':58s} {'value':>8s} {'bound':>8s}  result")
    for t in report["targets"].values():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        result = "not run" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"{t['what'][:58]:58s} {value:>8s} {t['target']:>8s}  {result}")
    if report.get("soak"):
        s = report["soak"]
        lines.append(f"soak: {s['seconds']:.0f} s at {s['target_rps']:.0f} req/s; "
                     f"RSS {s['rss_mb_first']} MiB -> {s['rss_mb_end']:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chimera bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each case")
    p.add_argument("--soak", type=float, default=0.0, help="soak seconds at 70%% of max (0: no soak)")
    p.add_argument("--quick", action="store_true", help="tiny durations: checks the machinery only")
    p.add_argument("--named", action="store_true", help="send features by name instead of dense vectors")
    p.add_argument("--registry-url", default=None, help="registry for the gateway (default: temp SQLite)")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the gateway for S seconds in one case")
    p.add_argument("--profile-case", default="chimera_c64", help="the case to profile (default chimera_c64)")
    p.add_argument("--profile-out", type=Path, default=None, help="profile output (.svg, .json, .txt)")
    p.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.echo_server:
        echo_server_main(a.echo_server)
        return 0
    opts = BenchOptions(json_path=a.json, duration_s=a.duration, warmup_s=a.warmup, soak_s=a.soak,
                        quick=a.quick, named_features=a.named, registry_url=a.registry_url,
                        profile_s=a.profile, profile_path=a.profile_out, profile_case=a.profile_case)
    report = run_bench(opts)
    print(format_table(report), flush=True)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {opts.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
