"""Run a real gateway (grpc.aio + Ray Serve replicas) in a background thread with its own event
loop, and talk to it over loopback gRPC like a customer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from chimera.v1 import prediction_pb2_grpc, rollout_pb2_grpc
from gateway.background import BackgroundGateway
from gateway.server import GatewayConfig
from gateway.serving.replica_pool import BatchConfig

ADMIN_TOKEN = "test-admin-token"


# What a Go service sets in its service config: round robin over every resolved address, and retry of
# UNAVAILABLE (the status the gateway answers while it drains, and when a version has no replica that
# answers: a call that was refused, never scored), with backoff. grpc-go applies the same JSON.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "chimera.v1.PredictionService"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}


def round_robin_channel(ports: list[int]) -> grpc.Channel:
    """One channel over several local gateways, configured as a Go client would be (SERVICE_CONFIG)."""
    return grpc.insecure_channel("ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports), options=[
        ("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG))])


def poll_until(predicate: Callable[[], object], timeout: float, every: float = 0.05) -> bool:
    """Look at `predicate` every `every` seconds until it is truthy or `timeout` seconds have passed;
    True when it became truthy (a last look is taken at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def midday() -> float:
    """Today's 12:00 UTC as epoch seconds: a created_at for rows that must take the prediction log's COPY
    path on PostgreSQL whatever the hour the suite runs (batches within 15 minutes of 00:00 UTC go by the
    INSERT that checks the neighbouring day instead: gateway.records.pg_ids)."""
    from datetime import UTC, datetime, time

    return datetime.combine(datetime.now(UTC).date(), time(12), UTC).timestamp()


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "the condition",
             every: float = 0.05) -> None:
    """`poll_until`, failing the test with what was awaited when the time runs out."""
    if not poll_until(predicate, timeout, every):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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


def slow_onnx(k: int = 520) -> bytes:
    """A 4-feature model with a 'probabilities' output [N, 2] whose every call also multiplies two k x k
    matrices scaled by the input (so onnxruntime cannot fold it away): a version slower than its
    baseline by a fixed amount per call, with the same scores as a constant 0.5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.normal(size=(k, k)).astype(np.float32) / k, "C")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    half = numpy_helper.from_array(np.full((1, 2), 0.5, np.float32), "half")
    nodes = [
        helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),
        helper.make_node("Mul", ["C", "s"], ["m"]),
        helper.make_node("MatMul", ["m", "C"], ["p1"]),
        helper.make_node("MatMul", ["p1", "C"], ["p2"]),
        helper.make_node("ReduceSum", ["p2"], ["t"], keepdims=0),
        helper.make_node("Mul", ["t", "zero"], ["t0"]),
        helper.make_node("Mul", ["input", "zero"], ["x0"]),
        helper.make_node("ReduceSum", ["x0", "axes1"], ["r0"], keepdims=1),  # [N, 1] of zeros
        helper.make_node("Add", ["r0", "half"], ["h"]),  # [N, 2] of 0.5
        helper.make_node("Add", ["h", "t0"], ["probabilities"]),
    ]
    axes1 = numpy_helper.from_array(np.array([1], np.int64), "axes1")
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[c, zero, half, axes1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class GatewayThread(BackgroundGateway):
    """The product's BackgroundGateway with test defaults (admin token, small replicas, a spill
    directory under the test's tmp) and ready-made stubs on a loopback channel."""

    def __init__(self, registry_url: str, tmp: Path, **overrides: Any) -> None:
        overrides.setdefault("drain_delay_s", 0.0)  # no load balancer to tell in tests
        # A test's versions are undeployed after its gateway (their only router) has stopped: nothing is
        # left to learn that they go, and Serve's 2 s first wait cost every test ~2 s a teardown. Versions
        # retired or scaled down while the gateway runs stop with the same short wait: the harder case
        # for the tests that assert no failed call (test_autoscaling's scale-down, the rollbacks).
        overrides.setdefault("replica_shutdown_wait_s", 0.2)
        super().__init__(GatewayConfig(registry_url=registry_url, port=overrides.pop("port", 0),
                                       admin_token=ADMIN_TOKEN,
                                       replica_cpus=0.1, spill_dir=tmp / "spill",
                                       batch=overrides.pop("batch", BatchConfig()), **overrides))

    def start(self, timeout: float = 180) -> GatewayThread:
        super().start(timeout)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.predict = prediction_pb2_grpc.PredictionServiceStub(self.channel)
        self.rollout = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        return self

    def stop(self, grace: float = 2.0, undeploy: bool = True) -> None:
        self.channel.close()
        super().stop(grace=grace, undeploy=undeploy)


class BackgroundLoad:
    """Client threads that run while the `with` block does (subclasses fill `_threads` and watch
    `_stop`): started on entry, told to stop and joined on exit."""

    _threads: list[Any]
    _stop: Any

    def __enter__(self) -> Any:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def served_model(url: str, prefix: str, seed: int = 0, onnx: bytes | None = None) -> tuple[Any, str, bytes]:
    """A migrated registry at `url` with one model (named `prefix` + random hex) whose only version, a
    small_onnx(seed=seed) or the given 4-feature `onnx` (e.g. slow_onnx()), takes 100 % of the traffic:
    what a gateway started on it deploys. Returns (the Registry, the model's name, the version's ONNX
    bytes); the caller disposes of the registry."""
    import uuid

    from registry import Registry

    reg = Registry(url)
    reg.upgrade()
    model = prefix + uuid.uuid4().hex[:8]
    small, names = small_onnx(seed=seed)
    onnx = small if onnx is None else onnx
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    return reg, model, onnx


def replica_pids(model: str, version: int) -> set[int]:
    """Pids of the version's live Ray Serve replica actors (GCS actor table; no dashboard needed)."""
    from ray._private import state

    from replicas.deployment import app_name

    prefix = f"ServeReplica:{app_name(model, version)}:"
    return {a["Pid"] for a in state.actors().values()
            if a["ActorClassName"].startswith(prefix) and a["State"] == "ALIVE" and a["Pid"]}


ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def database_down_switch(log: Any) -> threading.Event:
    """Make a PredictionLog's inserts fail as if the database were unreachable while the returned
    event is set (it starts set); clear it to bring the database back. The real insert runs after."""
    real = log.insert_rows
    down = threading.Event()
    down.set()

    def flaky(rows: Any) -> Any:
        if down.is_set():
            raise ConnectionError("database unreachable")
        return real(rows)

    log.insert_rows = flaky
    return down


def seed(reg: Any, table: str, insert: str, stamps: dict[str, Any]) -> dict[str, int]:
    """Rows from before a migration (migration tests): `insert` (raw SQL with :r for the request id and :t
    for created_at) once per (request id, created_at) of `stamps`, created_at as the backend stores it
    (SQLite: naive UTC text). Returns request id -> id of every row of `table`."""
    from sqlalchemy import text

    pg = reg.engine.dialect.name == "postgresql"
    with reg.engine.begin() as c:
        c.execute(text(insert), [{"r": r, "t": t if pg else f"{t:%Y-%m-%d %H:%M:%S.%f}"}
                                 for r, t in stamps.items()])
        return dict(c.execute(text(f"SELECT request_id, id FROM {table}")).tuples().all())


def alembic_downgrade(reg: Any, revision: str) -> None:
    """Downgrade `reg`'s database to an Alembic `revision` (migration tests: upgrade, data, downgrade)."""
    from alembic import command

    from registry.migrate import alembic_config, run_alembic

    with reg.engine.connect() as conn:
        run_alembic(alembic_config(reg.url), conn, command.downgrade, revision)
