"""Replicas per version: fixed by default, or autoscaled by Ray Serve between CHIMERA_REPLICAS_MIN and
_MAX (chimera.settings.ReplicaScaling). Under load a version grows to at least two replicas and, when
the load stops, shrinks back to its minimum, with no failed call during either (a light trickle of
calls keeps running while replicas are removed)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from chimera.settings import ReplicaScaling, Settings
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from registry import Registry
from replicas.deployment import _app_details, app_name, version_app
from tests.harness import GatewayThread, poll_until, small_onnx

GOOD = [0.5, -0.25, 1.0, 0.0]


def test_scaling_settings_from_the_environment() -> None:
    assert Settings.from_env({}).ray.scaling == ReplicaScaling()
    assert ReplicaScaling().serve_options() == {"num_replicas": 1}
    s = Settings.from_env({"CHIMERA_REPLICAS_MIN": "2", "CHIMERA_REPLICAS_MAX": "6",
                           "CHIMERA_REPLICA_TARGET_ONGOING": "1.5",
                           "CHIMERA_REPLICA_DOWNSCALE_DELAY_S": "60"})
    config = s.ray.scaling.serve_options()["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"],
            config["downscale_delay_s"], config["upscale_delay_s"]) == (2, 6, 1.5, 60.0, 30.0)
    assert Settings.from_env({"CHIMERA_REPLICAS_MIN": "3"}).ray.scaling.serve_options() == {"num_replicas": 3}
    for env, named in [({"CHIMERA_REPLICAS_MIN": "3", "CHIMERA_REPLICAS_MAX": "2"}, "CHIMERA_REPLICAS_MAX"),
                       ({"CHIMERA_REPLICAS_MIN": "0"}, "CHIMERA_REPLICAS_MIN"),
                       ({"CHIMERA_REPLICAS_MAX": "many"}, "CHIMERA_REPLICAS_MAX"),
                       ({"CHIMERA_REPLICA_TARGET_ONGOING": "0"}, "CHIMERA_REPLICA_TARGET_ONGOING")]:
        with pytest.raises(ValueError, match=named):
            Settings.from_env(env)
    # The scaling is part of the fingerprint: a gateway with other scaling redeploys, one with the same
    # scaling uses the running application (replicas.deployment).
    fixed = version_app("sqlite:////tmp/x.db", "m", 1)
    scaled = version_app("sqlite:////tmp/x.db", "m", 1, scaling=ReplicaScaling(max_replicas=3))
    prints = [a._bound_deployment._deployment_config.user_config["fingerprint"] for a in (fixed, scaled)]
    assert prints[0] != prints[1]


def running_replicas(model: str, version: int) -> int:
    details = _app_details(app_name(model, version)) or {}
    replicas = ((details.get("deployments") or {}).get("scorer") or {}).get("replicas") or []
    return sum(1 for r in replicas if str(getattr(r.get("state"), "value", r.get("state"))) == "RUNNING")


@pytest.mark.usefixtures("ray_cluster")
def test_a_loaded_version_scales_up_and_back_down_without_a_failed_call(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "auto" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=3)
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    # Short delays so the test sees both directions in about a minute (production keeps Ray's defaults).
    # The gateway's micro-batcher turns many calls into about one Ray call in flight per version, so Serve
    # sees ~1.0-1.4 ongoing requests under this load: a target of 1.0 flapped between 1 and 2 replicas
    # (fresh-clone run, 2026-12-03); 0.5 asks for 2-3 under load and 1 for the trickle.
    scaling = ReplicaScaling(min_replicas=1, max_replicas=3, target_ongoing_requests=0.5, upscale_delay_s=1.0,
                             downscale_delay_s=4.0, look_back_s=2.0)
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, replica_scaling=scaling).start()
    failures: list[str] = []
    answered = [0]
    heavy, light = threading.Event(), threading.Event()

    def client(gate: threading.Event, pause: float) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            stub = pb_grpc.PredictionServiceStub(ch)
            while gate.is_set():
                try:
                    stub.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=10)
                    answered[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                time.sleep(pause)

    try:
        assert poll_until(lambda: running_replicas(model, 1) == 1, 120)
        heavy.set()
        light.set()
        threads = [threading.Thread(target=client, args=(heavy, 0.0)) for _ in range(24)]
        threads.append(threading.Thread(target=client, args=(light, 0.05)))
        for t in threads:
            t.start()
        scaled_up = poll_until(lambda: running_replicas(model, 1) >= 2, 120, every=0.5)
        peak = running_replicas(model, 1)
        heavy.clear()  # the load stops; the trickle goes on while replicas are removed
        scaled_down = poll_until(lambda: running_replicas(model, 1) == 1, 120, every=0.5)
        time.sleep(2.0)  # calls right after the removal still answer
        light.clear()
        for t in threads:
            t.join(30)
        assert scaled_up, f"never more than one replica ({answered[0]} calls answered)"
        assert scaled_down, f"still {running_replicas(model, 1)} replicas after the load stopped"
        assert failures == [], failures[:5]
        assert answered[0] > 100 and peak >= 2
    finally:
        heavy.clear()
        light.clear()
        gw.stop()
        reg.dispose()
