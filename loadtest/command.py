"""`chimera loadtest` as a plain function: resolve the payload, run, gate on the SLOs, store the run
in the registry, write the report files. The Typer command in chimera/cli/perf.py only parses options.
Tokens, actor and registry URL come from chimera.settings (the one environment reader): `main` takes
its auth and registry sections, and reads them from the environment when the caller passes none.

Exit status: 0 every SLO holds; 3 at least one SLO failed (the reasons are printed and stored);
1 the test could not run (or a passing run could not be stored); 2 bad options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from chimera.settings import DEFAULT_SQLITE_FILE, AuthSettings, RegistrySettings
from loadtest.payload import Payload, PayloadError, from_file, from_schema
from loadtest.runner import LoadTestConfig, LoadTestError, LoadTestResult, run_load_test
from loadtest.schedule import Arrival
from loadtest.schema import SchemaError, schema_from_gateway, schema_from_registry
from loadtest.slo import EXIT_ERROR, EXIT_OK, EXIT_SLO_FAILED, EXIT_USAGE, SLO, evaluate_slo


@dataclass(frozen=True)
class LoadTestOptions:
    target: str
    model: str
    rps: float
    duration_s: float
    version: int = 0
    warmup_s: float = 1.0
    arrival: Arrival = "constant"
    concurrency_limit: int = 0
    workers: int = 0
    timeout_s: float = 10.0
    slo: SLO = SLO()
    report_path: Path | None = None
    plot_path: Path | None = None
    data_path: Path | None = None
    registry_url: str | None = None
    store: bool = True
    seed: int = 0


def resolve_registry_url(explicit: str | None, settings: RegistrySettings | None = None) -> str | None:
    """--registry-url, else CHIMERA_REGISTRY_URL (`settings.configured_url`), else the default SQLite
    file *if it exists* (the registry every other command uses by default); never creates a database."""
    if explicit:
        return explicit
    configured = (settings or RegistrySettings.from_env()).configured_url
    if configured:
        return configured
    default = Path(DEFAULT_SQLITE_FILE).resolve()
    return f"sqlite:///{default}" if default.exists() else None


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def predict_metadata(auth: AuthSettings | None = None) -> tuple[tuple[str, str], ...]:
    """Unpinned runs send the gateway's Predict token when one is set (CHIMERA_PREDICT_TOKEN)."""
    from chimera.client import predict_metadata as for_predict

    return for_predict(auth=auth)


def admin_metadata(auth: AuthSettings | None = None) -> tuple[tuple[str, str], ...]:
    """The admin token (CHIMERA_ADMIN_TOKEN) and actor (CHIMERA_ACTOR, else the login name) a pinned
    run sends; nothing without a token."""
    auth = auth or AuthSettings.from_env()
    if not auth.admin_token:
        return ()
    actor = auth.actor or "loadtest"
    return (("authorization", f"Bearer {auth.admin_token}"), ("x-chimera-actor", f"loadtest:{actor}"[:128]))


def build_payload(opts: LoadTestOptions, registry_url: str | None,
                  metadata: tuple[tuple[str, str], ...]) -> Payload:
    """Feature names from the registry (or the gateway); rows from --data or generated."""
    names: tuple[str, ...] | None = None
    if registry_url:
        try:
            names = schema_from_registry(registry_url, opts.model, opts.version or None)
        except SchemaError:
            raise  # the registry answered: unknown model/version, or ambiguous schema
        except Exception as exc:  # database unreachable or not migrated: the gateway may still tell us
            if not metadata:
                raise SchemaError(f"cannot read the feature schema from the registry "
                                  f"{safe_url(registry_url)}: {type(exc).__name__}: {exc}") from None
    if names is None and metadata:
        try:
            names = schema_from_gateway(opts.target, opts.model, opts.version or None, metadata)
        except SchemaError:
            if opts.data_path is None:
                raise  # with --data the file's own columns will do
    if opts.data_path is not None:
        return from_file(opts.data_path, names, seed=opts.seed)
    if names is None:
        raise SchemaError("no feature schema: give --data FILE, or --registry-url / CHIMERA_REGISTRY_URL, "
                          "or CHIMERA_ADMIN_TOKEN so the schema can be read from the gateway")
    return from_schema(names, seed=opts.seed)


def recorded_version(result: LoadTestResult) -> int:
    """The version a run is stored against: the pinned one; unpinned, the only version that answered;
    0 (routed, matches no promotion check) when several did or none answered."""
    if result.config.version:
        return result.config.version
    if len(result.versions) == 1:
        return next(iter(result.versions))
    return 0


def store_run(registry_url: str, report: dict[str, Any], version: int) -> int:
    from registry import Registry
    from registry.loadtests import record_load_test

    reg = Registry(registry_url)
    try:
        rec = record_load_test(reg, report["model"], version, target=report["target"],
                               passed=report["passed"], failures=report["failures"], slo=report["slo"],
                               report=report)
        return rec.id
    finally:
        reg.dispose()


def main(opts: LoadTestOptions, console: Console | None = None, *, auth: AuthSettings | None = None,
         registry: RegistrySettings | None = None) -> int:
    """Run `opts` and return the exit status. `auth` / `registry`: chimera.settings sections (None:
    read from the environment now)."""
    from loadtest.report import build_report, git_revision, render_table, write_json

    console = console or Console()
    auth = auth or AuthSettings.from_env()

    def fail(message: str, code: int) -> int:
        console.print(f"[red]error:[/red] {message}")
        return code

    metadata = admin_metadata(auth)
    if opts.version and not metadata:
        return fail("--version pins a version, which needs the gateway's admin token: "
                    "set CHIMERA_ADMIN_TOKEN", EXIT_USAGE)
    config = LoadTestConfig(target=opts.target, model=opts.model, rps=opts.rps, duration_s=opts.duration_s,
                            version=opts.version, warmup_s=opts.warmup_s, arrival=opts.arrival,
                            concurrency_limit=opts.concurrency_limit, workers=opts.workers,
                            timeout_s=opts.timeout_s,
                            metadata=metadata if opts.version else predict_metadata(auth), seed=opts.seed)
    try:
        config.validate()
        opts.slo.validate()
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    registry_url = resolve_registry_url(opts.registry_url, registry)
    try:
        payload = build_payload(opts, registry_url, metadata)
    except (SchemaError, PayloadError) as exc:
        return fail(str(exc), EXIT_ERROR)

    which = f"v{opts.version} (pinned)" if opts.version else "routed by the split"
    console.print(f"load test: {opts.model} {which} at {opts.target}, {opts.rps:g} req/s {opts.arrival} "
                  f"for {opts.duration_s:g} s (+{opts.warmup_s:g} s warmup), payload {payload.source}")
    try:
        result = run_load_test(config, payload.rows)
    except LoadTestError as exc:
        return fail(str(exc), EXIT_ERROR)

    failures = evaluate_slo(opts.slo, latency_ms=result.latency_ms(), error_rate=result.error_rate,
                            achieved_ratio=result.achieved_ratio, target_rps=opts.rps)
    report = build_report(result, opts.slo, failures, payload_source=payload.source, git=git_revision())
    code = EXIT_OK if not failures else EXIT_SLO_FAILED

    stored_note = "not stored (no registry: give --registry-url or set CHIMERA_REGISTRY_URL)"
    if registry_url and opts.store:
        version = recorded_version(result)
        try:
            record_id = store_run(registry_url, report, version)
            report["registry"] = {"url": safe_url(registry_url), "record_id": record_id, "version": version}
            stored_note = (f"stored as load test #{record_id} of {opts.model} v{version} "
                           f"in {safe_url(registry_url)}")
        except Exception as exc:
            stored_note = f"[red]NOT stored[/red] in {safe_url(registry_url)}: {type(exc).__name__}: {exc}"
            code = code or EXIT_ERROR
    elif not opts.store:
        stored_note = "not stored (--no-store)"

    render_table(report, console)
    console.print(stored_note)
    if opts.report_path is not None:
        console.print(f"report: {write_json(report, opts.report_path)}")
    if opts.plot_path is not None:
        from loadtest.plot import PlotUnavailable, write_plot

        try:
            console.print(f"plot: {write_plot(report, opts.plot_path)}")
        except PlotUnavailable as exc:
            console.print(f"[yellow]warning:[/yellow] no plot: {exc}")
    return code
