"""Output shared by the command modules: the one console, one-line errors, number cells, safe URLs.

Commands print through `views.console` (looked up on this module each time, not imported by name) so a
test can swap in a wide, colourless console in one place."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

from chimera.tables import drift_table, fmt, retrain_table

console = Console()

__all__ = ["console", "drift_table", "fail", "fmt", "retrain_table", "safe_url"]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` and end the command with `code` (1: it could not be done; 2: bad input)."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def safe_url(url: str) -> str:
    """Never print a password from a database URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
