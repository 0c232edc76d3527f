"""`chimera` command line (Typer): the composition root. Commands are thin: they read settings, parse
options and call the packages. One module per family of commands:

    registry.py  db upgrade, models list|show         serving.py   serve (workers.py: --processes N)
    rollout.py   canary set|shadow, rollout status, promote, rollback, analyze, simulate
    training.py  train, retrain, drift, scheduler      perf.py      loadtest, bench
    demo.py      demo (the job itself is chimera.demo, which never imports this package)
    shadow.py    shadow report                         log.py       log bench|prune|export
    shared.py    settings, registry, admin RPC          views.py     console, errors, table cells

Commands are registered here, in the order `chimera --help` lists them."""

from __future__ import annotations

import sys

import typer

from chimera.cli import views
from chimera.cli.demo import demo
from chimera.cli.log import log_app
from chimera.cli.perf import bench, loadtest
from chimera.cli.registry import db_app, models_app
from chimera.cli.rollout import analyze, canary_app, canary_weights, promote, rollback, rollout_app, simulate
from chimera.cli.serving import serve
from chimera.cli.shadow import shadow_app
from chimera.cli.training import drift, retrain, scheduler, train

__all__ = ["app", "canary_weights", "main", "scheduler", "serve"]

app = typer.Typer(
    help="Chimera: gRPC model-serving gateway with canary routing.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(rollout_app, name="rollout")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(canary_app, name="canary")
app.add_typer(log_app, name="log")
app.add_typer(shadow_app, name="shadow")
for command in (train, serve, promote, rollback, analyze, loadtest, demo, simulate, bench, retrain, drift,
                scheduler):
    app.command()(command)


def main() -> None:
    """The `chimera` command: registry errors (database unreachable, schema missing) end with one line
    naming the problem instead of a traceback; the URL's password is never printed."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        app()
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        views.console.print(f"[red]error:[/red] registry: {first} (check CHIMERA_REGISTRY_URL; a new "
                            "database needs `chimera db upgrade`)")
        sys.exit(1)
