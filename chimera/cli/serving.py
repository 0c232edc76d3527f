"""`chimera serve`: the gateway process, configured from chimera.settings with the command's options
on top. (Named serving, not serve: `chimera.cli.serve` is the command function itself, which deploy
checks read the defaults of.)"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Annotated, Any

import typer

from chimera.cli import views
from chimera.cli.shared import load_settings, open_registry
from chimera.settings import Settings

log = logging.getLogger(__name__)


def serve(
    port: Annotated[int, typer.Option(help="gRPC port")] = 50051,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: off)")] = 9090,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0: every interface; needs TLS and "
                                      "tokens, or --insecure)")] = "127.0.0.1",
    replica_cpus: Annotated[float | None, typer.Option(help="CPUs per replica")] = None,
    grace: Annotated[
        float, typer.Option(help="seconds from SIGTERM to exit: drain, let in-flight calls finish")
    ] = 10.0,
    drain_delay: Annotated[
        float, typer.Option(help="seconds new calls are still taken after health turns NOT_SERVING")
    ] = 1.0,
    controller_interval: Annotated[
        float, typer.Option(help="seconds between rollout-controller looks; after a round of looks over 1 s, "
                            "long enough that looking is at most 10 % of the time (0: no controller here)")
    ] = 2.0,
    controller_process: Annotated[
        bool | None, typer.Option("--controller-process/--controller-in-process",
                                  help="run the rollout controller's looks in a child process, or in a "
                                  "thread of the gateway (default: a child process on PostgreSQL, a thread "
                                  "on SQLite)")
    ] = None,
    event_loop: Annotated[
        str, typer.Option("--loop", help="event loop: uvloop (the default: ~10 % more req/s at c=64 here) "
                          "or asyncio (the standard library's)")
    ] = "uvloop",
    promotion_loadtest_max_age: Annotated[
        float | None,
        typer.Option(help="seconds a passing load test stays good for promotion "
                     "(default CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S, else 86400)"),
    ] = None,
    log_features_sample: Annotated[
        float | None,
        typer.Option(help="fraction 0..1 of predictions logged with their feature row "
                     "(default CHIMERA_LOG_FEATURES_SAMPLE, else 1)"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="serve a non-loopback address in plaintext with tokens, or "
                           "with predictions/outcomes open, because something in front terminates TLS or "
                           "authenticates callers (logged as a warning at start)")
    ] = False,
    processes: Annotated[
        int, typer.Option(help="gateway processes sharing the port (SO_REUSEPORT; the kernel spreads "
                          "connections, not calls); more than 1 pays only with the cores for them")
    ] = 1,
    worker: Annotated[
        int | None, typer.Option(hidden=True, help="set by --processes: this worker's index")
    ] = None,
) -> None:
    """Deploy replicas for every weighted version and run the gateway until Ctrl-C / SIGTERM.
    CHIMERA_PREDICT_TOKEN, when set, is required on every PredictionService call;
    CHIMERA_OUTCOMES_TOKEN, when set, on RecordOutcome(s) instead;
    CHIMERA_TRACES_EXPORTER (console, otlp) turns on OpenTelemetry spans.
    Refuses to start with a placeholder or weak token, and on a non-loopback address in plaintext with
    tokens or with predictions/outcomes open, unless --insecure (chimera.security)."""
    from chimera.settings import parse_log_features_sample, parse_promotion_loadtest_max_age

    if event_loop not in ("uvloop", "asyncio"):
        raise typer.BadParameter("--loop must be uvloop or asyncio")
    try:  # an option overrides its environment variable; a bad value of either fails here
        if promotion_loadtest_max_age is not None:
            parse_promotion_loadtest_max_age(promotion_loadtest_max_age, "--promotion-loadtest-max-age")
        if log_features_sample is not None:
            parse_log_features_sample(log_features_sample, "--log-features-sample")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if processes < 1:
        raise typer.BadParameter(f"--processes must be at least 1, got {processes}")
    if processes > 1 and (worker is not None or port == 0):
        raise typer.BadParameter("--processes needs a fixed --port (not 0) and sets --worker itself")
    settings = load_settings()
    _check_security(settings, host, insecure)
    if processes > 1:
        options = {"--port": port, "--host": host, "--grace": grace, "--drain-delay": drain_delay,
                   "--loop": event_loop, "--replica-cpus": replica_cpus,
                   "--promotion-loadtest-max-age": promotion_loadtest_max_age,
                   "--log-features-sample": log_features_sample}
        if controller_process is not None:
            options["--controller-process" if controller_process else "--controller-in-process"] = True
        sys.exit(_supervise(settings, processes, options, metrics_port, controller_interval, insecure))
    import asyncio

    from gateway.server import GatewayConfig, PortTaken, ensure_ray, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    open_registry(settings).upgrade()
    ensure_ray(settings.ray.address, settings.ray.num_cpus)
    options = {
        "port": port,
        "host": host,
        "metrics_port": metrics_port or None,
        "grace_period_s": grace,
        "drain_delay_s": drain_delay,
        "controller_interval_s": controller_interval,
        "controller_process": controller_process,
        "replica_cpus": replica_cpus,
        "promotion_loadtest_max_age_s": promotion_loadtest_max_age,
        "log_features_sample": log_features_sample,
        "worker": worker,
        "reuse_port": True if worker is not None else None,
    }
    # Options left unset (None) fall back to the settings; replica_cpus 0 did too, as it always has.
    config = GatewayConfig.from_settings(settings, **{k: v for k, v in options.items()
                                                      if v is not None and (k != "replica_cpus" or v)})
    main = _exit_when_stopped(serve_forever(config))
    # uvloop by default: ~10 % more unary req/s at c=64 for ~10 % less CPU a call (docs/performance.md,
    # "The event loop"). It was not the default while a call arriving as the drain ended could be
    # answered CANCELLED on it; gateway.drain's quiet gap and hold fixed that on both loops
    # (tests/integration/test_drain.py runs every stop on both; test_shutdown.py one signal on each).
    try:
        if event_loop == "uvloop":
            import uvloop

            uvloop.run(main)
        else:
            asyncio.run(main)
    except PortTaken as exc:
        views.fail(str(exc), 1)


def _supervise(settings: Settings, processes: int, options: dict[str, Any], metrics_port: int,
               controller_interval: float, insecure: bool) -> int:
    """`--processes N`: run N workers (chimera.cli.workers) with these options; the registry's schema is
    upgraded once here, and a local Ray (no RAY_ADDRESS) is started here for all of them to join.

    The port is checked free here, before anything starts: the workers bind it with SO_REUSEPORT, which
    the kernel grants to any other process of the same user that bound it so too (another `chimera serve
    --processes N` still running, say). Unchecked, the new workers would silently share the port with it,
    each answering some of the connections."""
    from chimera.cli.workers import Workers
    from gateway.server import PortTaken, check_port_free, ensure_ray

    try:
        check_port_free(str(options["--host"]), int(options["--port"]))
    except PortTaken as exc:
        views.fail(str(exc), 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    open_registry(settings).upgrade()
    env = dict(os.environ)
    if not settings.ray.address:
        import ray

        ensure_ray(None, settings.ray.num_cpus)
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    def command(i: int) -> list[str]:
        argv = [sys.executable, "-m", "chimera", "serve", "--worker", str(i),
                "--metrics-port", str(metrics_port + i if metrics_port else 0),
                "--controller-interval", str(controller_interval if i == 0 else 0)]
        for flag, value in options.items():
            if value is True:  # a flag without a value
                argv.append(flag)
            elif value is not None:
                argv += [flag, str(value)]
        return argv + (["--insecure"] if insecure else [])

    return Workers(processes, command, env, stop_timeout_s=float(options["--grace"]) + EXIT_WAIT_S + 5).run()


EXIT_WAIT_S = 2.0  # once the gateway has stopped, the longest the process waits for leftover threads


async def _exit_when_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway; once it has stopped (every answered row inserted or spilled, outcomes likewise),
    make sure the process ends within EXIT_WAIT_S.

    Why: after the coroutine returns, asyncio.run joins the default thread pool and the interpreter
    joins every non-daemon thread. A worker thread still inside a database read (a split check, the
    replica-scaling watch) on a hung PostgreSQL holds that join for the driver's whole query timeout
    (60 s by default): found by tests/integration/test_hung_postgres.py's SIGTERM test, which saw the
    exit wait 60 s when such a read was in flight as the database hung. Those reads matter to nobody
    once the gateway has stopped, so a daemon watchdog ends the process with the gateway's exit status
    if the normal exit has not happened by then. Nothing durable is skipped: gateway.stop() returned."""
    code = 1
    try:
        await main
        code = 0
    except BaseException as exc:
        from gateway.server import PortTaken  # loaded already: main is serve_forever's

        if isinstance(exc, PortTaken):  # the operator's to fix: serve() prints it as one line
            log.error("the gateway did not start: %s", exc)
        else:
            log.exception("the gateway stopped with an error")
        raise
    finally:
        threading.Thread(target=_exit_after, args=(EXIT_WAIT_S, code), name="chimera-exit-watchdog",
                         daemon=True).start()


def _exit_after(delay_s: float, code: int) -> None:
    time.sleep(delay_s)
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon
             and t is not threading.main_thread()]
    if not stuck:  # only the interpreter's own exit work (atexit handlers) is left: let it finish
        return
    sys.stderr.write(f"chimera serve: exiting without waiting for {len(stuck)} thread(s) still in a call "
                     f"(a database that does not answer?): {', '.join(stuck[:5])}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _check_security(settings: Settings, host: str, insecure: bool) -> None:
    """chimera.security's start-up rules, before anything starts: refusals end the command (exit 2)
    with every problem listed; waived problems and tokens sent in clear text on loopback are warned."""
    from chimera.security import ServeSecurity, StartupRefused, check_startup, is_loopback

    tls = settings.tls.cert is not None and settings.tls.key is not None
    security = ServeSecurity(host=host, tls=tls, client_certs=tls and settings.tls.client_ca is not None,
                             admin_token=settings.auth.admin_token, predict_token=settings.auth.predict_token,
                             outcomes_token=settings.auth.outcomes_token, insecure=insecure)
    try:
        warnings = check_startup(security)
    except StartupRefused as exc:
        views.fail(str(exc), 2)
    if not tls and is_loopback(host) and any(t is not None for t in security.tokens().values()):
        warnings.append(f"tokens are configured but {host} is served in plaintext: any process on this "
                        "machine that can read loopback traffic sees them; set CHIMERA_TLS_CERT and "
                        "CHIMERA_TLS_KEY unless this is a sidecar or a test")
    for warning in warnings:
        logging.getLogger("chimera.serve").warning("%s", warning)
        views.console.print(f"[yellow]warning:[/yellow] {warning}")
