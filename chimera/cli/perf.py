"""`chimera loadtest` (open-loop load test with an SLO gate) and `chimera bench` (onnxruntime vs Ray
Serve's gRPC proxy vs the gateway): thin option parsing over the loadtest package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from chimera.cli import views
from chimera.cli.shared import DEFAULT_TARGET, TargetOpt, load_settings


def loadtest(
    model: Annotated[str, typer.Option(help="model name")],
    rps: Annotated[float, typer.Option(help="target arrival rate, requests/s")],
    duration: Annotated[float, typer.Option(help="measured seconds (after warmup)")],
    target: TargetOpt = DEFAULT_TARGET,
    version: Annotated[int, typer.Option(help="pin this version (needs CHIMERA_ADMIN_TOKEN); 0: routed")] = 0,
    warmup: Annotated[float, typer.Option(help="seconds of load before measuring")] = 1.0,
    arrival: Annotated[str, typer.Option(help="constant | poisson")] = "constant",
    concurrency_limit: Annotated[
        int, typer.Option(help="max calls in flight (0: none); over it, arrivals queue and their wait counts")
    ] = 0,
    workers: Annotated[int, typer.Option(help="worker processes (0: auto)")] = 0,
    timeout: Annotated[float, typer.Option(help="per-request deadline, seconds from intended send")] = 10.0,
    slo_p50_ms: Annotated[float | None, typer.Option(help="p50 latency SLO, ms")] = None,
    slo_p90_ms: Annotated[float | None, typer.Option(help="p90 latency SLO, ms")] = None,
    slo_p99_ms: Annotated[float | None, typer.Option(help="p99 latency SLO, ms")] = None,
    slo_p999_ms: Annotated[float | None, typer.Option(help="p99.9 latency SLO, ms")] = None,
    max_error_rate: Annotated[float, typer.Option(help="max fraction of failed requests")] = 0.01,
    min_achieved_ratio: Annotated[float, typer.Option(help="min achieved/target rate")] = 0.9,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG latency plot here")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="CSV/Parquet rows to send (default: generated from the version's feature schema)"),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(help="registry for the schema and the stored run (default CHIMERA_REGISTRY_URL)"),
    ] = None,
    store: Annotated[bool, typer.Option(help="store the run in the registry")] = True,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Open-loop load test with an SLO gate: exit 0 when every SLO holds, 3 when one fails."""
    from loadtest.command import LoadTestOptions
    from loadtest.command import main as loadtest_main
    from loadtest.slo import SLO

    opts = LoadTestOptions(
        target=target,
        model=model,
        rps=rps,
        duration_s=duration,
        version=version,
        warmup_s=warmup,
        arrival=arrival,  # type: ignore[arg-type]  # validated by the runner
        concurrency_limit=concurrency_limit,
        workers=workers,
        timeout_s=timeout,
        slo=SLO(
            p50_ms=slo_p50_ms,
            p90_ms=slo_p90_ms,
            p99_ms=slo_p99_ms,
            p99_9_ms=slo_p999_ms,
            max_error_rate=max_error_rate,
            min_achieved_ratio=min_achieved_ratio,
        ),
        report_path=report,
        plot_path=plot,
        data_path=data,
        registry_url=registry_url,
        store=store,
        seed=seed,
    )
    settings = load_settings()
    raise typer.Exit(loadtest_main(opts, views.console, auth=settings.auth, registry=settings.registry))


def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="write the JSON report here")] = None,
    duration: Annotated[float, typer.Option(help="measured seconds per case")] = 10.0,
    warmup: Annotated[float, typer.Option(help="unmeasured seconds before each case")] = 2.0,
    soak: Annotated[float, typer.Option(help="soak seconds at 70% of max throughput (0: none)")] = 0.0,
    quick: Annotated[bool, typer.Option(help="tiny durations: checks the machinery, not speed")] = False,
    profile: Annotated[float, typer.Option(help="py-spy the gateway this many seconds in one case")] = 0.0,
    profile_out: Annotated[Path | None, typer.Option(help="profile file (.svg, .json, .txt)")] = None,
    profile_case: Annotated[str, typer.Option(help="the case to profile")] = "chimera_c64",
    client: Annotated[str, typer.Option(help="load client: go (loadtest/goload) or python")] = "go",
    gateway_processes: Annotated[
        int, typer.Option(help="measure `chimera serve --processes N` (several processes, one port)")
    ] = 1,
    connections: Annotated[
        int, typer.Option(help="Go client connections for the gateway cases (spread over the processes)")
    ] = 1,
    controller_interval: Annotated[
        float, typer.Option(help="run the rollout controller in the measured gateway (s; 0: off)")
    ] = 0.0,
    registry_url: Annotated[
        str | None, typer.Option(help="registry for the gateway, e.g. PostgreSQL (default: a temp SQLite)")
    ] = None,
    gateway_loop: Annotated[
        str | None, typer.Option(help="the measured gateway's event loop: asyncio or uvloop (default: "
                                 "`chimera serve`'s)")
    ] = None,
) -> None:
    """Raw onnxruntime vs Ray Serve's gRPC proxy vs the Chimera gateway, same model, one run."""
    from loadtest.bench import main as bench_main

    argv = ["--duration", str(duration), "--warmup", str(warmup), "--soak", str(soak),
            "--profile", str(profile), "--profile-case", profile_case, "--client", client,
            "--gateway-processes", str(gateway_processes), "--connections", str(connections),
            "--controller-interval", str(controller_interval)]
    argv += ["--registry-url", registry_url] if registry_url else []
    argv += ["--gateway-loop", gateway_loop] if gateway_loop else []
    argv += ["--json", str(json_path)] if json_path else []
    argv += ["--profile-out", str(profile_out)] if profile_out else []
    argv += ["--quick"] if quick else []
    sys.exit(bench_main(argv))
