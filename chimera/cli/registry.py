"""`chimera db upgrade`, `chimera models list|show`: the registry, read and migrated directly."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from chimera.cli import views
from chimera.cli.shared import load_settings, open_registry

db_app = typer.Typer(help="Registry database.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models and versions.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations to CHIMERA_REGISTRY_URL (default: ./chimera.db)."""
    settings = load_settings()
    open_registry(settings).upgrade()
    views.console.print(f"registry at {views.safe_url(settings.registry.url)} is up to date")


@models_app.command("list")
def models_list() -> None:
    """Models with their versions and current weights."""
    reg = open_registry()
    table = Table("model", "metric", "revision", "version", "status", "weight", "auc", "created")
    for m in reg.list_models():
        for v in m.versions:
            auc = v.metrics.get("auc")
            table.add_row(
                m.name,
                m.metric,
                str(m.split.revision),
                str(v.version),
                v.status,
                str(m.split.weights.get(v.version, 0)),
                f"{auc:.4f}" if auc else "-",
                v.created_at.strftime("%Y-%m-%d %H:%M"),
            )
    views.console.print(table)


@models_app.command("show")
def models_show(model: str, version: Annotated[int | None, typer.Option()] = None) -> None:
    """One model (or one version) in full, as JSON."""
    from registry import NotFoundError

    reg = open_registry()
    try:
        info = reg.get_model(model)
    except NotFoundError as exc:
        views.fail(str(exc))
    versions = [v for v in info.versions if version is None or v.version == version]
    if version is not None and not versions:
        views.fail(f"version: model {model!r} has no version {version}")
    out = {
        "model": info.name,
        "metric": info.metric,
        "split": {"revision": info.split.revision, "weights": dict(info.split.weights)},
        "versions": [
            {
                "version": v.version,
                "status": v.status,
                "sha256": v.sha256,
                "features": list(v.feature_names),
                "metrics": dict(v.metrics),
                "params": dict(v.params),
                "data_hash": v.data_hash,
                "parent_version": v.parent_version,
                "size_bytes": v.size_bytes,
                "created_at": v.created_at.isoformat(),
            }
            for v in versions
        ],
    }
    views.console.print_json(json.dumps(out, default=str))
