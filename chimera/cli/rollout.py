"""Rollout commands: `canary set|shadow`, `rollout status|scaling`, `promote`, `rollback` (admin calls
to a gateway's RolloutService), `analyze` (recompute a stored decision from the registry) and `simulate`
(the decision code on simulated outcome streams)."""

from __future__ import annotations

import sys
from typing import Annotated

import grpc
import typer
from rich.table import Table

from chimera.cli import views
from chimera.cli.shared import (
    DEFAULT_TARGET,
    TargetOpt,
    admin_metadata,
    load_settings,
    open_registry,
    rollout_stub,
    rpc,
)
from chimera.cli.views import fmt
from rollout.scenarios import SCENARIOS

canary_app = typer.Typer(help="Canary traffic.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollout state and decisions.", no_args_is_help=True)


def canary_weights(current: dict[int, int], version: int, percent: int) -> dict[int, int]:
    """The new split: `version` at `percent`, the heaviest other version absorbs the difference."""
    from rollout import splits

    try:
        return splits.set_weight(current, version, percent)
    except splits.SplitError as exc:
        raise typer.BadParameter(str(exc)) from None


@canary_app.command("set")
def canary_set(
    model: str,
    version: Annotated[int, typer.Option(help="canary version")],
    percent: Annotated[int, typer.Option(help="canary weight 0..100")],
    target: TargetOpt = DEFAULT_TARGET,
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Give VERSION PERCENT of the traffic; the current main version takes the rest."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    stub = rollout_stub(target, settings)
    md = admin_metadata(settings)
    try:
        split = stub.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), metadata=md, timeout=10)
        weights = {w.version: w.weight for w in split.weights}
        weights = canary_weights(weights, version, percent)
        new = stub.SetTrafficSplit(
            rpb.SetTrafficSplitRequest(
                model=model,
                expected_revision=split.revision,
                reason=reason or f"canary set {version}={percent}",
                weights=[rpb.VersionWeight(version=v, weight=w) for v, w in sorted(weights.items())],
            ),
            metadata=md,
            timeout=30,
        )
    except grpc.RpcError as exc:
        views.fail(f"{exc.code().name}: {exc.details()}")
    views.console.print(
        f"{model} split revision {new.revision}: "
        + ", ".join(f"v{w.version}={w.weight}%" for w in new.weights)
    )


@canary_app.command("shadow")
def canary_shadow(
    model: str,
    version: Annotated[int, typer.Option(help="version to mirror on live traffic (0: stop)")],
    target: TargetOpt = DEFAULT_TARGET,
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Mirror VERSION on live traffic: scored and logged, never returned to callers."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    split = rpc(rollout_stub(target, settings).SetShadow,
                rpb.SetShadowRequest(model=model, version=version, reason=reason), settings)
    views.console.print(
        f"{model}: shadow {'v' + str(split.shadow_version) if split.shadow_version else 'off'} "
        f"(split revision {split.revision})"
    )


@rollout_app.command("status")
def rollout_status(
    model: str,
    target: TargetOpt = DEFAULT_TARGET,
    decisions: Annotated[int, typer.Option(help="recent decisions to show")] = 5,
) -> None:
    """Versions, weights, counts and metric per arm, p-value and the last decisions."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    st = rpc(rollout_stub(target, settings).GetRolloutStatus,
             rpb.GetRolloutStatusRequest(model=model, decisions=decisions), settings)
    last = st.decisions[0] if st.decisions else None
    table = Table(
        title=f"{st.model} — metric {st.metric}, split revision {st.revision}"
        + (f", canary since {st.started_at}" if st.started_at else "")
    )
    for col in ("version", "status", "role", "weight %", "requests", "outcomes", st.metric):
        table.add_column(col, justify="right" if col not in ("status", "role") else "left")
    for a in st.arms:
        table.add_row(
            str(a.version),
            a.status,
            a.role,
            str(a.weight),
            str(a.requests) if a.role else "-",
            str(a.outcomes) if a.role else "-",
            fmt(a.metric_value) if a.role else "-",
        )
    views.console.print(table)
    if last is not None:
        views.console.print(
            f"last decision: [bold]{last.action}[/bold] v{last.canary_version} vs v{last.baseline_version} "
            f"p={fmt(last.p_value)} ({last.test or 'manual'}) at {last.created_at}: {last.reason}"
        )
    if st.decisions:
        hist = Table("id", "at", "action", "canary", "p-value", "n base", "n canary", "mean base",
                     "mean canary", "weight", title="recent decisions")
        for d in st.decisions:
            hist.add_row(
                str(d.id),
                d.created_at[:19],
                d.action,
                f"v{d.canary_version}",
                fmt(d.p_value),
                str(d.n_baseline),
                str(d.n_canary),
                fmt(d.mean_baseline),
                fmt(d.mean_canary),
                f"{d.weight_before}→{d.weight_after}",
            )
        views.console.print(hist)
    if st.HasField("scaling"):
        print_scaling(st.scaling)


def print_scaling(sc: object) -> None:
    """The model's replica fields (unset: the gateway's process setting) and, per version, the bounds it
    runs with and Serve's RUNNING replica count."""
    from chimera.v1 import rollout_pb2 as rpb

    assert isinstance(sc, rpb.Scaling)
    p = sc.policy
    names = {"replicas_min": "min", "replicas_max": "max", "canary_replicas_max": "canary max",
             "target_ongoing_requests": "target ongoing", "upscale_delay_s": "upscale delay s",
             "downscale_delay_s": "downscale delay s"}
    own = ", ".join(f"{label} {getattr(p, f):g}" for f, label in names.items() if p.HasField(f))
    views.console.print(f"replicas policy: {own or 'process settings (CHIMERA_REPLICAS_*)'}")
    if not sc.versions:
        return
    table = Table("version", "role", "min", "max", "target ongoing", "up s", "down s", "running",
                  title=f"{sc.model} replicas")
    for v in sc.versions:
        table.add_row(f"v{v.version}", v.role, str(v.replicas_min), str(v.replicas_max),
                      f"{v.target_ongoing_requests:g}", f"{v.upscale_delay_s:g}", f"{v.downscale_delay_s:g}",
                      str(v.replicas) if v.replicas >= 0 else "-")
    views.console.print(table)


@rollout_app.command("scaling")
def rollout_scaling(
    model: str,
    replicas_min: Annotated[int | None, typer.Option("--min", help="production replicas at least")] = None,
    replicas_max: Annotated[int | None, typer.Option("--max", help="production replicas at most")] = None,
    canary_max: Annotated[int | None, typer.Option("--canary-max", help="replicas at most for every version "
                                                   "but production (canary, shadow, standby)")] = None,
    target_ongoing: Annotated[float | None, typer.Option("--target-ongoing", help="Ray calls in flight "
                                                         "per replica to aim for")] = None,
    upscale_delay: Annotated[float | None, typer.Option("--upscale-delay", help="seconds")] = None,
    downscale_delay: Annotated[float | None, typer.Option("--downscale-delay", help="seconds")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="back to the process settings first")] = False,
    target: TargetOpt = DEFAULT_TARGET,
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Show MODEL's replicas per version, or change its replica scaling at run time (part of its rollout
    policy; applied in place, no replica restarts). Options not given keep their value."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    stub = rollout_stub(target, settings)
    fields = {"replicas_min": replicas_min, "replicas_max": replicas_max, "canary_replicas_max": canary_max,
              "target_ongoing_requests": target_ongoing, "upscale_delay_s": upscale_delay,
              "downscale_delay_s": downscale_delay}
    given = {k: v for k, v in fields.items() if v is not None}
    if not given and not reset:
        sc = rpc(stub.GetScaling, rpb.GetScalingRequest(model=model), settings)
    else:
        sc = rpc(stub.SetScaling, rpb.SetScalingRequest(model=model, scaling=rpb.ScalingPolicy(**given),
                                                         reset=reset, reason=reason), settings)
    print_scaling(sc)


def promote(
    model: str,
    version: Annotated[int, typer.Option(help="version to give 100 %")],
    target: TargetOpt = DEFAULT_TARGET,
    reason: Annotated[str, typer.Option()] = "",
    force: Annotated[bool, typer.Option(help="skip the load-test gate (audited)")] = False,
) -> None:
    """Promote VERSION to production (needs a recent passing load test unless --force)."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    request = rpb.PromoteRequest(model=model, version=version, reason=reason, force=force)
    try:
        split = rollout_stub(target, settings).Promote(request, metadata=admin_metadata(settings), timeout=30)
    except grpc.RpcError as exc:
        refused = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not force
        hint = "; or skip the gate with --force (recorded as forced in the audit log)" if refused else ""
        views.fail(f"{exc.code().name}: {exc.details()}{hint}")
    forced = " without the load-test gate (forced, audited)" if force else ""
    views.console.print(f"{model}: v{version} promoted{forced} (split revision {split.revision})")


def rollback(
    model: str,
    version: Annotated[int, typer.Option(help="version to roll back (default: the canary)")] = 0,
    target: TargetOpt = DEFAULT_TARGET,
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Roll the canary back (or, with no canary, return to the standby version)."""
    from chimera.v1 import rollout_pb2 as rpb

    settings = load_settings()
    split = rpc(rollout_stub(target, settings).Rollback,
                rpb.RollbackRequest(model=model, version=version, reason=reason), settings)
    views.console.print(
        f"{model}: split revision {split.revision}: "
        + ", ".join(f"v{w.version}={w.weight}%" for w in split.weights)
    )


def analyze(
    model: str,
    decision: Annotated[int | None, typer.Option(help="decision id (default: the latest)")] = None,
) -> None:
    """Recompute a stored decision from the logged rows in CHIMERA_REGISTRY_URL and compare.

    Reads the registry directly rather than asking a gateway: an auditor should not have to trust the
    process that made the decision."""
    from registry.rollouts import decisions
    from rollout.analysis import recompute

    reg = open_registry()
    if decision is None:
        rows = [r for r in decisions(reg, model, limit=50) if r["test"]]
        if not rows:
            views.fail(f"no statistical decisions stored for {model!r}")
        decision = rows[0]["id"]
    result = recompute(reg, decision)
    stored, d = result.stored, result.decision
    table = Table(
        "quantity",
        "stored",
        "recomputed",
        "|diff|",
        title=f"decision {decision}: {stored['action']} v{stored['canary_version']} "
        f"vs v{stored['baseline_version']} ({stored['metric']}, {stored['details'].get('test')})",
    )
    diffs = result.differences()
    for key, value in diffs.items():
        s_val, r_val = result.values(key)
        table.add_row(key, fmt(s_val, ".10g"), fmt(r_val, ".10g"), fmt(value, ".2e"))
    views.console.print(table)
    views.console.print(
        f"window {stored['details']['window']['since']} … {stored['details']['window']['until']}; "
        f"recomputed action: {d.action}"
    )
    if max(diffs.values()) > 1e-9:
        views.fail("recomputation differs from the stored decision by more than 1e-9")


def simulate(
    scenario: Annotated[str, typer.Option(help=f"one of rollout.scenarios ({', '.join(SCENARIOS)}) or "
                                          "all")] = "all",
    runs: Annotated[int | None, typer.Option(help="runs per scenario (default 1000)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(help="processes (the runs are independent)")] = 1,
    covariate: Annotated[bool, typer.Option(help="the default policy's covariate adjustment; --no-covariate: "
                                            "off, as covariate: \"\" in a rollout config")] = True,
    path: Annotated[str, typer.Option(help="incremental (fast), controller (the live controller's look on "
                                      "every row so far) or checked (both, exit 2 where they disagree)")
                    ] = "incremental",
    as_json: Annotated[bool, typer.Option("--json", help="JSON output (the only format)")] = True,
) -> None:
    """Run the rollout controller's decision path (row builder, look, split arithmetic) on simulated
    traffic; prints JSON with rates and 95 % intervals. Exits 1 when an acceptance check fails, 2 when
    --path checked finds the controller's look and the simulator's disagreeing."""
    del as_json  # the report is JSON whether or not --json is given
    if runs is not None and runs < 1:
        views.fail(f"--runs: must be at least 1, got {runs}", 2)
    from rollout.simulate import PATHS
    from rollout.simulate import main as simulate_main

    if path not in PATHS:
        views.fail(f"--path: one of {', '.join(PATHS)}, got {path!r}", 2)
    argv = ["--scenario", scenario, "--seed", str(seed), "--workers", str(workers), "--path", path]
    argv += ["--runs", str(runs)] if runs is not None else []
    argv += [] if covariate else ["--no-covariate"]
    sys.exit(simulate_main(argv))
