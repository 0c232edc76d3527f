"""What the command modules share besides output: the settings, the registry, the gateway's admin API.

Every command reads its configuration through `load_settings()` (chimera.settings, the one reader of
the environment), at the time it runs, so a bad value is one line and exit status 2."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import grpc
import typer

from chimera.cli import views
from chimera.client import DEFAULT_TARGET
from chimera.settings import Settings

if TYPE_CHECKING:
    from chimera.v1.rollout_pb2_grpc import RolloutServiceStub
    from registry import Registry

TargetOpt = Annotated[str, typer.Option("--target", help="gateway host:port")]
__all__ = ["DEFAULT_TARGET", "TargetOpt", "admin_metadata", "load_settings", "open_registry", "rollout_stub",
           "rpc"]


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        views.fail(str(exc), 2)


def open_registry(settings: Settings | None = None) -> Registry:
    """The registry at CHIMERA_REGISTRY_URL (default ./chimera.db)."""
    from registry import Registry

    return Registry((settings or load_settings()).registry.url)


def rollout_stub(target: str, settings: Settings) -> RolloutServiceStub:
    """RolloutService on `target`, dialled with the client TLS settings (CHIMERA_TLS_CA, ...)."""
    from chimera.client import ClientTLS
    from chimera.client import rollout_stub as stub

    return stub(target, tls=ClientTLS.from_settings(settings.client_tls))


def admin_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The admin token and actor (CHIMERA_ADMIN_TOKEN, CHIMERA_ACTOR); no token ends the command."""
    from chimera.client import admin_metadata as metadata

    return metadata(auth=settings.auth)


def rpc(fn: Any, request: Any, settings: Settings, timeout: float = 30) -> Any:
    """One admin call; a gRPC error ends the command with its status and details."""
    try:
        return fn(request, metadata=admin_metadata(settings), timeout=timeout)
    except grpc.RpcError as exc:
        views.fail(f"{exc.code().name}: {exc.details()}")
