"""The local channel between the gateway and a replica on its Ray node (replicas.local_channel,
gateway.serving.local_path) with real Ray Serve replicas: idle calls take it and score exactly what
onnxruntime scores, a caller without the replica's key gets nothing, and a killed replica sends the
calls through Ray Serve until the replacement's channel is found. Both registry backends."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from chimera.v1 import prediction_pb2 as pb
from replicas.local_channel import LocalChannel, LocalChannelError
from tests.conftest import BACKENDS, one_version_gateway
from tests.harness import GatewayThread, replica_pids, wait_for

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


@pytest.fixture(scope="module", params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A one-version model behind a running gateway (one gateway per backend: replicas cost seconds)."""
    yield from one_version_gateway(request, tmp_path_factory, "lc", seed=3)


def calls(gw: GatewayThread, model: str, path: str) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(
        "chimera_replica_calls_total", {"model": model, "version": "1", "path": path})
    return value or 0.0


def local_status(gw: GatewayThread) -> set[str]:
    return {p.status for p in gw.gateway.pool._local_paths}


def predict(gw: GatewayThread, model: str, row: np.ndarray, timeout: float = 10) -> pb.PredictResponse:
    return gw.predict.Predict(pb.PredictRequest(model=model, routing_key=uuid.uuid4().hex,
                                                dense=row.tolist()), timeout=timeout)


def test_idle_calls_take_the_local_channel_and_score_what_onnxruntime_scores(served) -> None:
    gw, model, onnx = served
    predict(gw, model, np.zeros(4))  # the version's replicas are deployed on first use
    wait_for(lambda: local_status(gw) == {"connected"}, 30, "the local channel")
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(5).normal(size=(40, 4)).astype(np.float32)
    expected = session.run(None, {session.get_inputs()[0].name: rows})[1][:, 1]
    before_local, before_serve = calls(gw, model, "local"), calls(gw, model, "serve")
    scores = [predict(gw, model, row).score for row in rows]  # one at a time: the gateway is idle
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert calls(gw, model, "local") - before_local == len(rows)
    assert calls(gw, model, "serve") == before_serve


def test_a_version_with_one_fixed_replica_gets_every_call_over_the_channel_under_load(served) -> None:
    gw, model, _ = served
    predict(gw, model, np.zeros(4))
    wait_for(lambda: len(gw.gateway.pool._local_paths[0]._idle) == gw.gateway.pool.batch.max_inflight, 30,
             "a connection per call in flight")
    before_local, before_serve = calls(gw, model, "local"), calls(gw, model, "serve")
    rows = np.random.default_rng(9).normal(size=(8, 50, 4))

    def caller(block: np.ndarray) -> list[float]:
        return [predict(gw, model, row).score for row in block]

    threads_out: list[list[float]] = [[] for _ in rows]
    threads = [threading.Thread(target=lambda i=i: threads_out.__setitem__(i, caller(rows[i])))
               for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(len(o) for o in threads_out) == rows.shape[0] * rows.shape[1]
    assert calls(gw, model, "serve") == before_serve  # one replica, fixed: Serve is never needed
    assert calls(gw, model, "local") > before_local


def test_the_replicas_channel_is_loopback_only_and_refuses_a_caller_without_its_key(served) -> None:
    from ray import serve

    from replicas.deployment import app_name

    gw, model, _ = served
    predict(gw, model, np.zeros(4))
    where = serve.get_app_handle(app_name(model, 1)).local_endpoint.remote().result(timeout_s=30)
    (pid,) = replica_pids(model, 1)
    listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == where["port"]]
    assert [a.ip for a in listening] == ["127.0.0.1"]

    async def hostile() -> None:
        with pytest.raises(LocalChannelError, match="not the replica"):
            await LocalChannel.connect(where["port"], os.urandom(32))
        reader, writer = await asyncio.open_connection("127.0.0.1", where["port"])
        writer.write(b"\x00" * 64 + b"\xff" * 64)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    asyncio.run(hostile())
    before = calls(gw, model, "local")
    predict(gw, model, np.ones(4))  # the gateway's own channel still serves
    assert calls(gw, model, "local") == before + 1


def test_a_killed_replica_sends_calls_through_serve_until_its_replacements_channel_is_found(served) -> None:
    gw, model, _ = served
    predict(gw, model, np.zeros(4))
    wait_for(lambda: local_status(gw) == {"connected"}, 30, "the local channel")
    (pid,) = replica_pids(model, 1)
    answered: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answered.append(predict(gw, model, np.full(4, 0.5), timeout=5).score)
            except grpc.RpcError as exc:
                errors.append(exc.code().name)
                time.sleep(0.05)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_for(lambda: len(answered) > 20, 30, "answers before the kill")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: replica_pids(model, 1) - {pid}, 90, "Ray Serve's replacement replica")
        wait_for(lambda: local_status(gw) == {"connected"} and calls(gw, model, "local_broken") >= 1, 90,
                 "the channel broken, then found again")
        mark = calls(gw, model, "local")
        wait_for(lambda: calls(gw, model, "local") > mark + 20, 30, "calls on the new channel")
    finally:
        stop.set()
        worker.join(30)
    # The only replica killed: what a caller may see is UNAVAILABLE (retryable), never another code.
    assert set(errors) <= {"UNAVAILABLE"}, errors
    assert len(set(answered)) == 1  # every answer is the model's score for the row, before and after
