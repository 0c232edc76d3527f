"""`chimera bench` (`make bench`): one run, one machine, one model, three ways to serve it.

  (a) raw onnxruntime (replicas.scorer.OnnxScorer, one thread) at batch 1 and batch 256;
  (b) Ray Serve's own gRPC proxy in front of one replica scoring one row per call;
  (c) Chimera's gateway as a separate `chimera serve` process, with a live 90/10 split between two
      versions of the model and prediction logging on: unary Predict at concurrency 1, 8 and 64,
      PredictBatch with 256 rows, and PredictStream.

The model is training.benchmark.benchmark_model (XGBoost, 200 trees of depth 6, 32 features, ONNX).
Every gRPC case (the do-nothing reference, (b) and (c)) is measured by the same closed-loop client
with the same requests: by default the Go client in loadtest/goload (grpc-go, one connection, one
goroutine per caller; built offline by its build.sh, see loadtest.bench_go), as Chimera's Go callers
see the gateway; with `--client python`, loadtest.closed_loop's grpc.aio worker processes. Ray is
started here with num_cpus=2 and shut down at the end; the gateway joins it through RAY_ADDRESS. Only
processes this command started are stopped, by pid.

Output: a table, and (`--json`) every case's rps / p50 / p99, the ratios issue 17 sets targets for
(against the do-nothing grpc.aio PredictionService and raw onnxruntime), pass/fail per target, and
reference ratios against Ray's proxy. `--soak S` adds S seconds of Predict at 70 % of the measured c=64
rate and reports the gateway's resident memory after one minute and at the end.

This module is the run's order and the command line; each part has its own module: bench_onnx (raw
onnxruntime), bench_go (the Go load client), bench_procs (the echo server and gateway processes),
bench_ray (Ray, Serve and the native app), bench_scrape (the gateway's metrics), bench_profile (py-spy),
bench_soak, bench_report (ratios, targets, the table)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest import bench_cpu, bench_go, bench_ray
from loadtest.bench_onnx import bench_onnx
from loadtest.bench_procs import (
    EchoProcess,
    GatewayProcess,
    TreeRay,
    echo_server_main,
    rss_mb,
    setup_registry_in,
    tree_cpu_seconds,
)
from loadtest.bench_profile import start_profile
from loadtest.bench_report import BATCH_ROWS, case, format_table, line, machine, reference, targets
from loadtest.bench_scrape import MetricsScrape, count_logged, gateway_cpu
from loadtest.bench_soak import soak
from loadtest.closed_loop import LoadResult, LoadSpec, run

MODEL = "bench"
UNARY_CONCURRENCY = (1, 8, 64)


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
    client: str = "go"  # the load client of every gRPC case: "go" (loadtest/goload) or "python"
    go_binary: Path | None = None  # a prebuilt loadtest/goload binary; None: build it when stale
    # Another checkout (with its own .venv) whose `chimera serve` is measured instead of this tree's:
    # every other part of the run (client, references, Ray, the model) stays this tree's
    # (`make bench-compare`, loadtest.bench_compare). Its registry is set up by its own code.
    gateway_tree: Path | None = None
    # `chimera serve --processes N` (chimera.cli.workers), and the Go client's connections for the
    # gateway cases: the kernel spreads connections over the processes, so N > 1 needs several.
    gateway_processes: int = 1
    connections: int = 1
    # The rollout controller in the measured gateway (0: off, as in the throughput cases): issue 17's
    # soak runs with it (it reads the prediction log the load writes).
    controller_interval_s: float = 0.0
    # `chimera serve --loop`: None runs the gateway on serve's default loop; "asyncio" or "uvloop" picks
    # one (the do-nothing reference always runs on asyncio's: the anchor does not move).
    gateway_loop: str | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    log = opts.log
    if opts.quick:
        opts = replace(opts, duration_s=min(opts.duration_s, 1.0), warmup_s=min(opts.warmup_s, 0.3),
                       soak_s=min(opts.soak_s, 3.0))
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="chimera-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "log"},
        "cases": {},
    }
    cases: dict[str, Any] = report["cases"]
    load_start = os.getloadavg()
    load, report["client"] = load_client(opts)
    log(f"load client: {report['client']['name']} ({report['client'].get('binary', 'grpc.aio workers')})")

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
        cases[f"onnx_batch{batch}"]["loadavg_1m"] = round(os.getloadavg()[0], 2)
        log(line(f"onnx_batch{batch}", cases[f"onnx_batch{batch}"]))

    base = LoadSpec(target="", kind="predict", concurrency=1, duration_s=opts.duration_s, model=MODEL,
                    rows=rows, feature_names=tuple(names) if opts.named_features else (),
                    warmup_s=opts.warmup_s)

    # The anchor of the unary targets: a do-nothing grpc.aio PredictionService with the same client
    # (the ceiling for any Python gRPC server here).
    echo = EchoProcess()
    try:
        echo.wait_serving()
        for c in (1, 64):
            res, cpu = load_with_cpu(load, replace(base, target=f"127.0.0.1:{echo.port}", concurrency=c),
                                     echo.proc.pid)
            cases[f"echo_c{c}"] = {**case(f"do-nothing grpc.aio PredictionService (ceiling), c={c}", res),
                                   "cpu": cpu}
            log(line(f"echo_c{c}", cases[f"echo_c{c}"]))
    finally:
        echo.stop()

    log("starting Ray (num_cpus=2) and Serve with its gRPC proxy ...")
    bench_ray.start_ray()
    ray_up = True
    tree_ray: TreeRay | None = None
    gateway: GatewayProcess | None = None
    try:
        grpc_port = bench_ray.start_serve()
        bench_ray.run_native_app(onnx1, list(names))

        # (b) Ray Serve native gRPC proxy ---------------------------------------------------------
        native = replace(base, target=f"127.0.0.1:{grpc_port}",
                         metadata=(("application", bench_ray.NATIVE_APP),))
        for c in UNARY_CONCURRENCY:
            res, cpu = load_with_cpu(load, replace(native, concurrency=c), None)
            cases[f"ray_c{c}"] = {**case(f"Ray Serve gRPC proxy, Predict, c={c}", res), "cpu": cpu}
            log(line(f"ray_c{c}", cases[f"ray_c{c}"]))
        # The c=1 anchor: one bare Ray Serve handle call, the gateway's handle options, no proxy.
        from chimera.v1 import prediction_pb2 as pb

        cases["ray_handle_c1"] = {**bench_ray.handle_c1(
            pb.PredictRequest(model=MODEL, dense=list(rows[0])), opts.duration_s, opts.warmup_s),
            "title": "Ray Serve handle call from a Python process (the gateway's options), c=1",
            "loadavg_1m": round(os.getloadavg()[0], 2)}
        log(line("ray_handle_c1", cases["ray_handle_c1"]))
        bench_ray.delete_native_app()

        # (c) Chimera gateway ----------------------------------------------------------------------
        from registry import Registry

        url = opts.registry_url or f"sqlite:///{workdir / 'registry.db'}"
        model = MODEL if opts.registry_url is None else f"{MODEL}-{uuid.uuid4().hex[:6]}"
        # The gateway's tree makes its own schema and publishes; this process only counts logged rows.
        setup_registry_in(opts.gateway_tree, url, model, (onnx1, onnx2), list(names), workdir)
        reg = Registry(url)
        if opts.gateway_tree is not None:
            bench_ray.stop_ray_serve()  # that tree's replicas run on a Ray its own Python started
            ray_up = False
            tree_ray = TreeRay(opts.gateway_tree)
        log(f"starting the gateway (`chimera serve` of {opts.gateway_tree or 'this tree'}, separate "
            "process) with a 90/10 split ...")
        gateway = GatewayProcess(url, tree_ray.address if tree_ray else bench_ray.gcs_address(), workdir,
                                 admin_token=uuid.uuid4().hex, tree=opts.gateway_tree,
                                 processes=opts.gateway_processes,
                                 controller_interval_s=opts.controller_interval_s,
                                 event_loop=opts.gateway_loop)
        gateway.wait_serving()
        scrape = MetricsScrape(gateway.metrics_ports)
        chimera = replace(base, target=f"127.0.0.1:{gateway.port}", model=model,
                          connections=opts.connections)
        report["gateway"] = {"pid": gateway.pid, "rss_mb_after_start": rss_mb(gateway.pid),
                             "event_loop": opts.gateway_loop or "serve's default"}

        def measure(name: str, title: str, spec: LoadSpec) -> LoadResult:
            assert gateway is not None
            drain_s = scrape.wait_log_drained()
            before = scrape.sample()
            cpu_before = tree_cpu_seconds(gateway.pid)
            prof = None
            if name == opts.profile_case and opts.profile_s > 0:
                out = opts.profile_path or workdir / "gateway-profile.svg"
                prof = start_profile(gateway.pid, min(opts.profile_s, opts.duration_s), out, log)
                report["profile"] = str(out)
            res, cpu = load_with_cpu(load, spec, gateway.pid)
            if prof is not None:
                prof.wait(60)
            cases[name] = {**case(title, res), "cpu": cpu}
            cases[name].update(MetricsScrape.delta(before, scrape.sample()))
            cases[name]["log_drain_before_s"] = round(drain_s, 2)
            cases[name].update(gateway_cpu(before, scrape.wait_log_settled(),
                                           tree_cpu_seconds(gateway.pid) - cpu_before))
            log(line(name, cases[name]))
            return res

        for c in UNARY_CONCURRENCY:
            measure(f"chimera_c{c}", f"Chimera gateway, Predict, c={c}", replace(chimera, concurrency=c))
        if not opts.named_features:  # Go callers send named features too: what the projection costs
            measure("chimera_named_c64", "Chimera gateway, Predict, named features, c=64",
                    replace(chimera, concurrency=64, feature_names=tuple(names)))
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
            report["soak"] = soak(gateway.pid, chimera, cases["chimera_c64"]["rps"], opts.soak_s, log,
                                  runner=load)
        report["gateway"]["predictions_logged"] = count_logged(reg, model)
        reg.dispose()
    finally:
        if gateway is not None:
            log(f"stopping the gateway (SIGTERM, pid {gateway.pid}) ...")
            gateway.stop()
        if tree_ray is not None:
            tree_ray.stop()
        if ray_up:
            bench_ray.stop_ray_serve()
        if not opts.keep_workdir and opts.workdir is None and not opts.profile_s:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_start"] = [round(v, 2) for v in load_start]
    report["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["ratios"], report["targets"] = targets(cases, report.get("soak"))
    report["reference"] = reference(cases, opts.stream_concurrency)
    return report


def load_with_cpu(load: Callable[[LoadSpec], LoadResult], spec: LoadSpec,
                  server_pid: int | None) -> tuple[LoadResult, dict[str, Any]]:
    """One case's load, and where the machine's cores went while it ran (loadtest.bench_cpu: the
    server under test, replicas, Ray, client, database; warm-up included, as a steady state)."""
    before = bench_cpu.snapshot(server_pid)
    res = load(spec)
    after = bench_cpu.snapshot(server_pid)
    return res, bench_cpu.split(before, after, res.as_dict().get("rows_per_s"))


def load_client(opts: BenchOptions) -> tuple[Callable[[LoadSpec], LoadResult], dict[str, Any]]:
    """The closed-loop runner every gRPC case uses, and what to report about it. The Go client is
    built (or found up to date) here, before anything is started, so a missing toolchain fails first."""
    if opts.client == "python":
        return run, {"name": "python", "module": "loadtest.closed_loop"}
    if opts.client != "go":
        raise ValueError(f"unknown load client {opts.client!r}: go or python")
    binary = bench_go.ensure_built(opts.go_binary)

    def load(spec: LoadSpec) -> LoadResult:
        return bench_go.run_go(spec, binary)

    return load, {"name": "go", "binary": str(binary)}


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
    p.add_argument("--client", choices=("go", "python"), default="go",
                   help="load client of every gRPC case: go (loadtest/goload, default) or python (grpc.aio)")
    p.add_argument("--go-bin", type=Path, default=None,
                   help="a prebuilt loadtest/goload binary (default: build it when missing or stale)")
    p.add_argument("--gateway-tree", type=Path, default=None,
                   help="measure the `chimera serve` of this checkout (its own .venv) instead of this tree's")
    p.add_argument("--gateway-processes", type=int, default=1,
                   help="run the gateway as `chimera serve --processes N` (several processes, one port)")
    p.add_argument("--connections", type=int, default=1,
                   help="Go client connections for the gateway cases (the kernel spreads connections "
                        "over gateway processes; default 1, as a Go service with one ClientConn)")
    p.add_argument("--controller-interval", type=float, default=0.0,
                   help="run the rollout controller in the measured gateway every S seconds (0: off)")
    p.add_argument("--gateway-loop", choices=("asyncio", "uvloop"), default=None,
                   help="the measured gateway's event loop (`chimera serve --loop`; default: serve's own)")
    p.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.echo_server:
        echo_server_main(a.echo_server)
        return 0
    opts = BenchOptions(json_path=a.json, duration_s=a.duration, warmup_s=a.warmup, soak_s=a.soak,
                        quick=a.quick, named_features=a.named, registry_url=a.registry_url,
                        profile_s=a.profile, profile_path=a.profile_out, profile_case=a.profile_case,
                        client=a.client, go_binary=a.go_bin, gateway_tree=a.gateway_tree,
                        gateway_processes=a.gateway_processes, connections=a.connections,
                        controller_interval_s=a.controller_interval, gateway_loop=a.gateway_loop)
    report = run_bench(opts)
    print(format_table(report), flush=True)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {opts.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
