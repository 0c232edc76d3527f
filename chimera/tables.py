"""Rich tables for training results, shared by the CLI (`chimera retrain`, `chimera drift`) and the demo.

Why here and not in chimera.cli: the demo prints the same tables and must not import the CLI (the CLI
runs the demo), so the one copy lives below both. Only rich is imported; the training objects are
read by attribute, so this module stays on the ground floor."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def fmt(x: float | None, spec: str = ".4g") -> str:
    """A number for a table cell: "-" for None and NaN."""
    return "-" if x is None or x != x else format(x, spec)


def retrain_table(out: Any) -> Table:  # training.retrain.RetrainOutcome
    """Production vs candidate on the retrain holdout."""
    rows = int(out.candidate["n"])
    table = Table(title=f"{out.run.model}: holdout of run {out.run.id} ({rows} newest rows)")
    for col in ("metric", f"production v{out.production_version}", "candidate", "delta", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for c in out.comparison:
        verdict = "[red]worse[/red]" if c.worse else "[green]ok[/green]"
        table.add_row(c.metric, fmt(c.production), fmt(c.candidate), fmt(c.delta, "+.4f"), verdict)
    return table


def drift_table(report: Any, recent: str = "recent") -> Table:  # training.drift.DriftReport
    """Feature, PSI, KS statistic, p-value, flag per feature plus the score row."""
    r0, r1 = report.reference_window
    title = f"{report.model} v{report.version}: {recent} vs {report.reference_kind.replace('_', ' ')}"
    if r0 and r1:
        title += f" ({r0:%Y-%m-%d %H:%M} .. {r1:%Y-%m-%d %H:%M})"
    table = Table("feature", "PSI", "KS statistic", "p-value", "n ref", "n recent", "flag", title=title)
    for f in [*report.features, *([report.score] if report.score else [])]:
        flag = f"[red]DRIFT[/red] {f.reason}" if f.flagged else "[green]ok[/green]"
        name = "[italic]score[/italic]" if f is report.score else f.feature
        table.add_row(
            name,
            fmt(f.psi, ".3f"),
            fmt(f.ks_statistic, ".3f"),
            fmt(f.ks_pvalue, ".2g"),
            str(f.n_reference),
            str(f.n_current),
            flag,
        )
    return table
