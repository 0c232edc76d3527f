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
        float, typer.Option(help="seconds between rollout-controller looks (0: no controller here)")
    ] = 2.0,
    event_loop: Annotated[
        str, typer.Option("--loop", help="event loop: asyncio, or uvloop (~10 % more req/s here, but a "
                          "call arriving as shutdown starts can be CANCELLED instead of drained)")
    ] = "asyncio",
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
    settings = load_settings()
    _check_security(settings, host, insecure)
    import asyncio

    from gateway.server import GatewayConfig, ensure_ray, serve_forever

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
        "replica_cpus": replica_cpus,
        "promotion_loadtest_max_age_s": promotion_loadtest_max_age,
        "log_features_sample": log_features_sample,
    }
    # Options left unset (None) fall back to the settings; replica_cpus 0 did too, as it always has.
    config = GatewayConfig.from_settings(settings, **{k: v for k, v in options.items()
                                                      if v is not None and (k != "replica_cpus" or v)})
    main = _exit_when_stopped(serve_forever(config))
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


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
    except BaseException:
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
