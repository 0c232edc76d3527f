"""Run a real gateway (grpc.aio + Ray Serve replicas) in a background thread with its own event
loop, and talk to it over loopback gRPC like a customer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from chimera.v1 import prediction_pb2_grpc, rollout_pb2_grpc
from gateway.replica_pool import BatchConfig
from gateway.server import Gateway, GatewayConfig

ADMIN_TOKEN = "test-admin-token"


def small_onnx(n_features: int = 4, seed: int = 0, flip: bool = False) -> tuple[bytes, list[str]]:
    """A real (tiny) logistic-regression ONNX model with a plain probabilities output."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, n_features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    if flip:
        y = 1 - y
    clf = LogisticRegression().fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}},
                  final_types=None).SerializeToString()
    return onx, [f"f{i}" for i in range(n_features)]


class GatewayThread:
    def __init__(self, registry_url: str, tmp: Path, **overrides: Any) -> None:
        overrides.setdefault("drain_delay_s", 0.0)  # no load balancer to tell in tests
        self.config = GatewayConfig(registry_url=registry_url, port=0, admin_token=ADMIN_TOKEN,
                                    replica_cpus=0.1, spill_dir=tmp / "spill",
                                    batch=overrides.pop("batch", BatchConfig()), **overrides)
        self.loop = asyncio.new_event_loop()
        self.gateway: Gateway | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> GatewayThread:
        self._thread.start()
        self.gateway = Gateway(self.config)
        self.port = self.run(self.gateway.start(), timeout=180)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.predict = prediction_pb2_grpc.PredictionServiceStub(self.channel)
        self.rollout = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        return self

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, undeploy: bool = True) -> None:
        if self.gateway is not None:
            apps = self.gateway.pool.ready_versions()
            self.channel.close()
            self.run(self.gateway.stop(grace=2), timeout=60)
            if undeploy:
                from replicas.deployment import undeploy_version

                for model, version in apps:
                    undeploy_version(model, version)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
