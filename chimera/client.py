"""Client-side helpers shared by the CLI, the load tester and the demo: channels (plaintext, TLS or
mutual TLS, from the environment) and admin metadata for a remote gateway."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from chimera.v1 import prediction_pb2_grpc, rollout_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
ChannelOptions = Sequence[tuple[str, object]]


@dataclass(frozen=True)
class ClientTLS:
    """CHIMERA_TLS_CA turns TLS on (trust roots for the gateway's certificate); a client certificate
    and key on top make it mutual TLS. CHIMERA_TLS_SERVER_NAME overrides the name checked against
    the certificate (e.g. when dialling an IP address)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls) -> ClientTLS | None:
        ca = os.environ.get("CHIMERA_TLS_CA")
        if not ca:
            return None
        cert, key = os.environ.get("CHIMERA_TLS_CLIENT_CERT"), os.environ.get("CHIMERA_TLS_CLIENT_KEY")
        if bool(cert) != bool(key):
            # grpc aborts the whole process on a key without its certificate: refuse it here.
            raise ValueError("CHIMERA_TLS_CLIENT_CERT and CHIMERA_TLS_CLIENT_KEY: give both or neither")
        return cls(Path(ca), Path(cert) if cert else None, Path(key) if key else None,
                   os.environ.get("CHIMERA_TLS_SERVER_NAME") or None)

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
    tls = tls or ClientTLS.from_env()
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(target: str, options: ChannelOptions = (), tls: ClientTLS | None = None) -> grpc.aio.Channel:
    tls = tls or ClientTLS.from_env()
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def admin_metadata(token: str | None = None, actor: str | None = None) -> tuple[tuple[str, str], ...]:
    token = token or os.environ.get("CHIMERA_ADMIN_TOKEN")
    if not token:
        raise SystemExit("CHIMERA_ADMIN_TOKEN is not set: admin commands need the gateway's admin token")
    md: list[tuple[str, str]] = [("authorization", f"Bearer {token}")]
    who = actor or os.environ.get("CHIMERA_ACTOR") or os.environ.get("USER") or "cli"
    md.append(("x-chimera-actor", who))
    return tuple(md)


def predict_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """What a PredictionService call sends when the gateway requires a Predict token
    (CHIMERA_PREDICT_TOKEN); nothing when none is set."""
    token = token or os.environ.get("CHIMERA_PREDICT_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()


def rollout_stub(target: str) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(channel(target))


def prediction_stub(target: str) -> prediction_pb2_grpc.PredictionServiceStub:
    return prediction_pb2_grpc.PredictionServiceStub(channel(target))
