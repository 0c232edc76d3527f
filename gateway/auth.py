"""Bearer-token checks for the admin API (and pinned-version predictions)."""

from __future__ import annotations

import hmac

import grpc

from gateway.errors import PermissionError_

ACTOR_HEADER = "x-chimera-actor"


class AuthError(RuntimeError):
    """Missing or wrong credentials (gRPC UNAUTHENTICATED)."""


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        value = item.value
        out[item.key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


class AdminAuth:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def actor(self, context: grpc.aio.ServicerContext) -> str:
        """Check the token (constant-time) and return who is acting, for the audit log."""
        if self._token is None:
            raise PermissionError_("admin API is disabled on this gateway: set CHIMERA_ADMIN_TOKEN")
        md = _metadata(context)
        header = md.get("authorization", "")
        if not header:
            raise AuthError("authorization: missing; send 'authorization: Bearer <CHIMERA_ADMIN_TOKEN>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("authorization: malformed; expected 'Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise AuthError("authorization: invalid token")
        return md.get(ACTOR_HEADER, "admin")[:128] or "admin"
