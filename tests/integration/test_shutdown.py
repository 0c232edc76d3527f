"""SIGTERM (or Ctrl-C's SIGINT) to a `chimera serve` process under load: health turns NOT_SERVING first
(while calls are still answered), in-flight calls finish, the prediction log is flushed (rows ==
successful responses), and the process exits within its grace period. On both event loops `chimera serve`
offers (`--loop`): uvloop, the default, and asyncio's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from loadtest.ports import free_port as _free_port
from registry import Registry
from registry.models import Prediction
from tests.harness import small_onnx

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
GRACE_S = 6.0
DRAIN_S = 1.0


@pytest.mark.parametrize(("sig", "loop"), [(signal.SIGTERM, None), (signal.SIGINT, "asyncio")],
                         ids=["SIGTERM, default loop (uvloop)", "SIGINT (Ctrl-C), asyncio loop"])
def test_sigterm_under_load_drains_finishes_flushes_and_exits_in_time(tmp_path: Path, sig: int,
                                                                      loop: str | None) -> None:
    import ray

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "sd" + uuid.uuid4().hex[:6]
    onnx, _ = small_onnx(seed=3)
    reg.publish_version(model, onnx, [f"f{i}" for i in range(4)])
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    port = _free_port()
    env = {**os.environ, "CHIMERA_REGISTRY_URL": url, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "CHIMERA_REPLICA_NUM_CPUS": "0.1"}
    env.pop("CHIMERA_PREDICT_TOKEN", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chimera", "serve", "--port", str(port), "--metrics-port", "0",
             "--host", "127.0.0.1", "--controller-interval", "0", "--grace", str(GRACE_S),
             "--drain-delay", str(DRAIN_S), *(["--loop", loop] if loop else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=180)
        stub = pb_grpc.PredictionServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        ok_ids: list[str] = []
        errors: list[tuple[float, str]] = []
        health_seen: list[tuple[float, str]] = []
        stream_ids: list[str] = []
        stop = threading.Event()
        sigterm_at: list[float] = []

        def unary(worker: int) -> None:
            # One channel per worker: calls on a fresh connection after the port closes fail fast.
            i = 0
            while not stop.is_set():
                rid = f"u{worker}-{i}"
                i += 1
                try:
                    resp = stub.Predict(pb.PredictRequest(model=model, request_id=rid, routing_key=rid,
                                                          dense=[0.1, 0.2, 0.3, 0.4]), timeout=10)
                    ok_ids.append(resp.request_id)
                except grpc.RpcError as exc:
                    errors.append((time.monotonic(), exc.code().name))
                    time.sleep(0.02)

        def watch_health() -> None:
            while not stop.is_set():
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service="chimera.v1.PredictionService"), timeout=1)
                    health_seen.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(
                        status.status)))
                except grpc.RpcError as exc:
                    health_seen.append((time.monotonic(), exc.code().name))
                time.sleep(0.02)

        def stream_rows():
            # Opened before SIGTERM and still sending rows for 2.5 s after it: an in-flight call.
            n = 0
            while not sigterm_at or time.monotonic() - sigterm_at[0] < 2.5:
                yield pb.PredictRequest(model=model, request_id=f"s{n}", dense=[0.5, 0.5, 0.5, 0.5])
                n += 1
                time.sleep(0.01)

        def stream() -> None:
            for resp in stub.PredictStream(stream_rows(), timeout=30):
                assert resp.WhichOneof("result") == "prediction", resp
                stream_ids.append(resp.request_id)

        threads = [threading.Thread(target=unary, args=(w,)) for w in range(3)]
        threads += [threading.Thread(target=watch_health), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        assert ok_ids and not errors, errors[:5]
        sigterm_at.append(time.monotonic())
        proc.send_signal(sig)
        rc = proc.wait(timeout=GRACE_S + 30)
        exited = time.monotonic() - sigterm_at[0]
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert rc == 0, log_path.read_text()[-3000:]
        # Exit within the grace period (plus a little for the interpreter and Ray to tear down).
        assert exited <= GRACE_S + 3.0, f"exited {exited:.1f} s after SIGTERM"
        # Health said NOT_SERVING before anything refused a call.
        after = [(t, s) for t, s in health_seen if t >= sigterm_at[0]]
        first_bad = next(s for _, s in after if s != "SERVING")
        assert first_bad == "NOT_SERVING", after[:20]
        not_serving_at = next(t for t, s in after if s == "NOT_SERVING")
        assert all(t > not_serving_at for t, _ in errors), (errors[:5], not_serving_at)
        # Calls kept being answered during the drain delay; refused ones were refused cleanly.
        assert any(True for _ in ok_ids)
        assert {code for _, code in errors} <= {"UNAVAILABLE"}, errors[:10]
        # The in-flight stream was answered to its end (rows sent up to 2.5 s after SIGTERM).
        assert len(stream_ids) > 100 and len(set(stream_ids)) == len(stream_ids)
        # Every answered prediction is in the database: the log was flushed before exit.
        with reg.engine.connect() as c:
            stored = set(c.execute(select(Prediction.request_id).where(Prediction.model == model)).scalars())
        answered = set(ok_ids) | set(stream_ids)
        assert stored == answered, (len(stored), len(answered), sorted(answered - stored)[:5])
        text = log_path.read_text()
        assert "shutting down" in text
        assert f", event loop {loop or 'uvloop'}" in text  # the loop this case is about
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        from replicas.deployment import undeploy_version

        undeploy_version(model, 1)
        reg.dispose()
