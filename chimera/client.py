"""Client-side helpers shared by the CLI, the load tester and the demo: channels (plaintext, TLS or
mutual TLS) and the metadata admin and Predict calls carry to a remote gateway.

Everything here takes its settings (chimera.settings.ClientTlsSettings, AuthSettings) as arguments;
a caller that passes none gets the process's own, read through chimera.settings, so the CLI and the
load tester dial with the same CHIMERA_TLS_* and tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from chimera.settings import AuthSettings, ClientTlsSettings
from chimera.v1 import rollout_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
ChannelOptions = Sequence[tuple[str, object]]
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ClientTLS:
    """`ca` turns TLS on (trust roots for the gateway's certificate); a client certificate and key on
    top make it mutual TLS. `server_name` overrides the name checked against the certificate (e.g.
    when dialling an IP address)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_settings(cls, settings: ClientTlsSettings | None = None) -> ClientTLS | None:
        """None (plaintext) when no CA is set (CHIMERA_TLS_CA). `settings` None: the process's own."""
        s = ClientTlsSettings.from_env() if settings is None else settings
        if s.ca is None:
            return None
        if (s.cert is None) != (s.key is None):
            # grpc aborts the whole process on a key without its certificate: refuse it here.
            raise ValueError("CHIMERA_TLS_CLIENT_CERT and CHIMERA_TLS_CLIENT_KEY: give both or neither")
        return cls(s.ca, s.cert, s.key, s.server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("client TLS: a certificate needs its key and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(target: str, options: ChannelOptions = (), tls: ClientTLS | None = None) -> grpc.Channel:
    """A channel to `target`: with `tls`, else as the process's client TLS settings say."""
    tls = tls or ClientTLS.from_settings()
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(target: str, options: ChannelOptions = (), tls: ClientTLS | None = None) -> grpc.aio.Channel:
    """The asyncio counterpart of `channel`."""
    tls = tls or ClientTLS.from_settings()
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def admin_metadata(token: str | None = None, actor: str | None = None,
                   auth: AuthSettings | None = None) -> Metadata:
    """Bearer admin token and the actor the audit log records. `token`/`actor` win over `auth`
    (None: the process's settings); no token at all ends the command with a message."""
    auth = AuthSettings.from_env() if auth is None else auth
    token = token or auth.admin_token
    if not token:
        raise SystemExit("CHIMERA_ADMIN_TOKEN is not set: admin commands need the gateway's admin token")
    return (("authorization", f"Bearer {token}"), ("x-chimera-actor", actor or auth.actor or "cli"))


def predict_metadata(token: str | None = None, auth: AuthSettings | None = None) -> Metadata:
    """What a PredictionService call sends when the gateway requires a Predict token
    (CHIMERA_PREDICT_TOKEN); nothing when none is set."""
    token = token or (AuthSettings.from_env() if auth is None else auth).predict_token
    return (("authorization", f"Bearer {token}"),) if token else ()


def rollout_stub(target: str, tls: ClientTLS | None = None) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(channel(target, tls=tls))
