"""Client-side helpers for the CLI: channels and admin metadata for a remote gateway."""

from __future__ import annotations

import os

import grpc

from chimera.v1 import prediction_pb2_grpc, rollout_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def admin_metadata(token: str | None = None, actor: str | None = None) -> tuple[tuple[str, str], ...]:
    token = token or os.environ.get("CHIMERA_ADMIN_TOKEN")
    if not token:
        raise SystemExit("CHIMERA_ADMIN_TOKEN is not set: admin commands need the gateway's admin token")
    md: list[tuple[str, str]] = [("authorization", f"Bearer {token}")]
    who = actor or os.environ.get("CHIMERA_ACTOR") or os.environ.get("USER") or "cli"
    md.append(("x-chimera-actor", who))
    return tuple(md)


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target)


def rollout_stub(target: str) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(channel(target))


def prediction_stub(target: str) -> prediction_pb2_grpc.PredictionServiceStub:
    return prediction_pb2_grpc.PredictionServiceStub(channel(target))
