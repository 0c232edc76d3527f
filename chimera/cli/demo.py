"""`chimera demo`: the command only; the demo's job is chimera.demo, which never imports the CLI."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from chimera.cli import views
from chimera.cli.shared import load_settings


def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo keeps its registry and files")] = Path(
        "chimera-demo"
    ),
    requests: Annotated[int, typer.Option(help="Predict calls to send")] = 3000,
) -> None:
    """The main job on embedded defaults: train, publish, serve 90/10, score, record outcomes."""
    from chimera.demo import run_demo

    sys.exit(run_demo(workdir, requests=requests, console=views.console, settings=load_settings()))
