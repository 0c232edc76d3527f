"""Bearer-token checks for the admin API (and pinned-version predictions), and the optional token
that every PredictionService call must carry (GatewayConfig.predict_token / CHIMERA_PREDICT_TOKEN).
Tokens are compared in constant time; header values are never logged."""

from __future__ import annotations

import hmac

import grpc

ACTOR_HEADER = "x-chimera-actor"


class AuthError(RuntimeError):
    """Missing or wrong credentials (gRPC UNAUTHENTICATED)."""


class PermissionError_(RuntimeError):
    """Authenticated, but not allowed to do this (gRPC PERMISSION_DENIED)."""


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        value = item.value
        out[item.key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def _bearer(context: grpc.aio.ServicerContext, what: str) -> tuple[bytes, dict[str, str]]:
    """The token of 'authorization: Bearer <token>' (raises AuthError when missing or malformed)."""
    md = _metadata(context)
    header = md.get("authorization", "")
    if not header:
        raise AuthError(f"authorization: missing; send 'authorization: Bearer <{what}>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("authorization: malformed; expected 'Bearer <token>'")
    return token.strip().encode("utf-8", "replace"), md


def _printable(text: str) -> str:
    """Header text that goes into the audit log: no control characters (no forged log lines)."""
    return "".join(c for c in text if c.isprintable())


class TokenAuth:
    """Any of `tokens` (e.g. the Predict token and the admin token) lets a call through."""

    def __init__(self, *tokens: str | None, what: str = "CHIMERA_PREDICT_TOKEN") -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)
        if not self._tokens:
            raise ValueError("TokenAuth needs at least one token")
        self.what = what

    def check(self, context: grpc.aio.ServicerContext) -> None:
        token, _ = _bearer(context, self.what)
        ok = False
        for expected in self._tokens:  # every token is compared: the time does not tell which matched
            ok |= hmac.compare_digest(token, expected)
        if not ok:
            raise AuthError("authorization: invalid token")


class AdminAuth:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def actor(self, context: grpc.aio.ServicerContext) -> str:
        """Check the token (constant-time) and return who is acting, for the audit log."""
        if self._token is None:
            raise PermissionError_("admin API is disabled on this gateway: set CHIMERA_ADMIN_TOKEN")
        token, md = _bearer(context, "CHIMERA_ADMIN_TOKEN")
        if not hmac.compare_digest(token, self._token):
            raise AuthError("authorization: invalid token")
        return _printable(md.get(ACTOR_HEADER, "admin"))[:128] or "admin"
