"""Shadow commands: `shadow report` (issue 18), the diff between a shadow version's scores and the
served ones on the same requests, read from the registry (no gateway needed).

The numbers are rollout.shadow_report's, the rows registry.shadow_rows'; this module only resolves the
defaults (the model's current shadow, the threshold from its rollout config), prints and plots."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from chimera.cli import views
from chimera.cli.shared import load_settings, open_registry
from chimera.cli.views import fmt

if TYPE_CHECKING:
    from registry.shadow_rows import ShadowRows
    from rollout.shadow_report import ShadowReport

shadow_app = typer.Typer(help="Shadow versions: how their scores differ from the served ones.",
                         no_args_is_help=True)
TOP_SLICES = 5  # features shown in the terminal view (all of them in --json)


def _since(text: str | None) -> datetime | None:
    """`--since`: an age (7d, 12h) back from now, or an ISO time (UTC when it has no offset)."""
    if not text:
        return None
    from training.feedback import parse_window

    try:
        return datetime.now(UTC) - parse_window(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an age (7d, 12h) or an ISO time, got {text!r}",
                                 param_hint="--since") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _threshold(config: dict[str, object]) -> float:
    """The model's `decision_threshold` (rollout config), else the policy's default (0.5)."""
    from rollout.splits import policy_from_dict

    try:
        return policy_from_dict(config).decision_threshold
    except (TypeError, ValueError) as exc:
        views.fail(f"rollout config: {exc}", 2)


@shadow_app.command("report")
def report(
    model: str,
    version: Annotated[int | None, typer.Option(help="shadow version (default: the model's current shadow)")]
    = None,
    threshold: Annotated[float | None, typer.Option(
        help="decision threshold (score ≥ t acts); default: the rollout config's decision_threshold, "
        "else 0.5")] = None,
    since: Annotated[str | None, typer.Option(help="only requests since: an age (7d, 12h) or an ISO time")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a PNG: score scatter and difference histogram")]
    = None,
) -> None:
    """Agreement of decisions at the threshold, the score difference (shadow − served), each version's
    loss where outcomes exist, and the features whose slices differ most."""
    from registry.errors import NotFoundError
    from registry.shadow_rows import shadow_rows
    from rollout.shadow_report import shadow_report

    if threshold is not None and not 0.0 < threshold < 1.0:
        raise typer.BadParameter("must be in (0, 1)", param_hint="--threshold")
    start = _since(since)
    reg = open_registry(load_settings())
    try:
        try:
            split = reg.get_split(model)
            config = reg.rollout_config(model)
        except NotFoundError as exc:
            views.fail(str(exc))
        if version is None:
            if split.shadow is None:
                views.fail(f"model {model!r} has no shadow version now: pass --version")
            version = split.shadow
        t = threshold if threshold is not None else _threshold(config)
        rows = shadow_rows(reg, model, version, since=start)
    finally:
        reg.dispose()
    result = shadow_report(rows.served, rows.shadow, threshold=t, outcomes=rows.outcome,
                           features=rows.features, feature_names=rows.feature_names)
    served_by = _served_by(rows)
    if plot is not None:
        _plot(rows, result, plot, title=f"{model}: shadow v{version}")
    if as_json:
        head = {"model": model, "version": version, "since": start.isoformat() if start else None,
                "served_versions": served_by, "plot": str(plot) if plot else None}
        typer.echo(json.dumps({**head, **result.to_dict()}, indent=2))
        return
    _print(model, version, result, served_by)
    if plot is not None:
        views.console.print(f"plot written to {plot}")


def _served_by(rows: ShadowRows) -> dict[str, int]:
    """Rows per served version: the report pairs the shadow with whichever version answered (the
    production version and a canary alike)."""
    import numpy as np

    versions, counts = np.unique(rows.served_version, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(versions, counts, strict=True)}


def _print(model: str, version: int, r: ShadowReport, served_by: dict[str, int]) -> None:
    con = views.console
    by = ", ".join(f"v{v}: {n}" for v, n in served_by.items())
    con.print(f"[bold]{model}[/bold]: shadow v{version} on {r.n_pairs} paired rows"
              + (f" (served by {by})" if by else "")
              + (f"; {r.n_dropped} without a score left out" if r.n_dropped else ""))
    if not r.n_pairs:
        con.print(r.message)
        return
    a = r.agreement
    t = Table(title=f"decisions at threshold {a.threshold:g} (agreement {fmt(a.share)})")
    t.add_column("served \\ shadow")
    t.add_column("shadow ≥ t", justify="right")
    t.add_column("shadow < t", justify="right")
    t.add_row("served ≥ t", str(a.both_positive), str(a.served_only))
    t.add_row("served < t", str(a.shadow_only), str(a.both_negative))
    con.print(t)
    d = r.difference
    t = Table(title="score difference d = shadow − served")
    for name in ("mean", "sd", *d.quantiles, "max |d|"):
        t.add_column(name, justify="right")
    t.add_row(fmt(d.mean), fmt(d.sd), *(fmt(v) for v in d.quantiles.values()), fmt(d.max_abs))
    con.print(t)
    if r.losses is not None:
        t = Table(title=f"losses on the {r.losses.n} rows with a 0/1 outcome")
        for name in ("metric", "served", "shadow", "shadow − served"):
            t.add_column(name, justify="right")
        for metric in r.losses.served:
            t.add_row(metric, fmt(r.losses.served[metric]), fmt(r.losses.shadow[metric]),
                      fmt(r.losses.difference[metric]))
        con.print(t)
    else:
        con.print("no outcomes yet: no losses")
    ranked = [s for s in r.slices if s.spread is not None][:TOP_SLICES]
    if not ranked:
        con.print("no feature slices (no features logged for these rows)")
        return
    t = Table(title=f"where they differ most (features on {r.n_with_features} rows; spread of mean |d| "
              "over quantile bins)")
    for name in ("feature", "spread", "bin", "n", "mean |d|", "agreement"):
        t.add_column(name, justify="right" if name != "feature" else "left")
    for s in ranked:
        for i, b in enumerate(s.bins):
            t.add_row(s.feature if i == 0 else "", fmt(s.spread) if i == 0 else "",
                      f"= {b.lo:.4g}" if b.lo == b.hi else f"{b.lo:.4g} … {b.hi:.4g}", str(b.n),
                      fmt(b.mean_abs_diff), fmt(b.agreement))
    con.print(t)


def _plot(rows: ShadowRows, r: ShadowReport, path: Path, *, title: str) -> None:
    """Served vs shadow score scatter (threshold lines, the diagonal) and the histogram of d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = np.isfinite(rows.served) & np.isfinite(rows.shadow)
    served, shadow = rows.served[ok], rows.shadow[ok]
    t = r.agreement.threshold
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        ax1.scatter(served, shadow, s=6, alpha=0.4)
        ax1.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax1.axvline(t, color="red", lw=0.8, ls="--")
        ax1.axhline(t, color="red", lw=0.8, ls="--")
        ax1.set(xlabel="served score", ylabel="shadow score", xlim=(0, 1), ylim=(0, 1),
                title=f"agreement at {t:g}: {fmt(r.agreement.share)} (n={r.n_pairs})")
        ax2.hist(shadow - served, bins=50)
        ax2.set(xlabel="shadow − served", ylabel="rows", title="score difference")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
