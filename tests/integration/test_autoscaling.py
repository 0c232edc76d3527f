"""Replicas per version: fixed by default, or autoscaled by Ray Serve between CHIMERA_REPLICAS_MIN and
_MAX (chimera.settings.ReplicaScaling). Under load a version grows to at least two replicas and, when
the load stops, shrinks back to its minimum, with no failed call during either (a light trickle of
calls keeps running while replicas are removed).

Per model (issue 16): the rollout policy's replica fields give production and the canary their own
bounds, a RolloutService.SetScaling call (or `chimera rollout scaling`) changes them at run time in
place (no replica restarts, no failed call), and chimera_replicas{model,version} reports the counts."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.settings import ReplicaScaling, Settings
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from chimera.v1 import rollout_pb2 as rpb
from gateway.serving.replica_pool import BatchConfig
from registry import Registry
from replicas.deployment import app_name, version_app
from replicas.serve_state import app_details
from tests.harness import (
    ADMIN_MD,
    ADMIN_TOKEN,
    GatewayThread,
    poll_until,
    replica_pids,
    served_model,
    slow_onnx,
    small_onnx,
)

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
    # Serve wants look_back_period_s > metrics_interval_s (equal warns, and a later Ray refuses it).
    for look_back in (0.5, 2.0, 10.0, 30.0, 600.0):
        auto = ReplicaScaling(max_replicas=2, look_back_s=look_back).serve_options()["autoscaling_config"]
        assert 0 < auto["metrics_interval_s"] < auto["look_back_period_s"], auto
    for env, named in [({"CHIMERA_REPLICAS_MIN": "3", "CHIMERA_REPLICAS_MAX": "2"}, "CHIMERA_REPLICAS_MAX"),
                       ({"CHIMERA_REPLICAS_MIN": "0"}, "CHIMERA_REPLICAS_MIN"),
                       ({"CHIMERA_REPLICAS_MAX": "many"}, "CHIMERA_REPLICAS_MAX"),
                       ({"CHIMERA_REPLICA_TARGET_ONGOING": "0"}, "CHIMERA_REPLICA_TARGET_ONGOING"),
                       ({"CHIMERA_REPLICA_SHUTDOWN_WAIT_S": "0"}, "CHIMERA_REPLICA_SHUTDOWN_WAIT_S")]:
        with pytest.raises(ValueError, match=named):
            Settings.from_env(env)
    # The scaling is part of the fingerprint: a gateway with other scaling redeploys, one with the same
    # scaling uses the running application (replicas.deployment).
    fixed = version_app("sqlite:////tmp/x.db", "m", 1)
    scaled = version_app("sqlite:////tmp/x.db", "m", 1, scaling=ReplicaScaling(max_replicas=3))
    prints = [a._bound_deployment._deployment_config.user_config["fingerprint"] for a in (fixed, scaled)]
    assert prints[0] != prints[1]


def test_replica_shutdown_wait_is_serves_wait_loop_and_not_part_of_the_fingerprint() -> None:
    """CHIMERA_REPLICA_SHUTDOWN_WAIT_S: Serve's default (2 s) unless set; it reaches the deployment as
    graceful_shutdown_wait_loop_s and leaves the fingerprint alone (a gateway with another value uses
    the running application instead of replacing it)."""
    assert Settings.from_env({}).ray.replica_shutdown_wait_s == 2.0
    assert Settings.from_env({"CHIMERA_REPLICA_SHUTDOWN_WAIT_S": "0.5"}).ray.replica_shutdown_wait_s == 0.5
    default, quick = (version_app("sqlite:////tmp/x.db", "m", 1, shutdown_wait_s=w)._bound_deployment
                      ._deployment_config for w in (None, 0.2))
    assert (default.graceful_shutdown_wait_loop_s, quick.graceful_shutdown_wait_loop_s) == (2.0, 0.2)
    assert default.user_config["fingerprint"] == quick.user_config["fingerprint"]


def running_replicas(model: str, version: int) -> int:
    details = app_details(app_name(model, version)) or {}
    replicas = ((details.get("deployments") or {}).get("scorer") or {}).get("replicas") or []
    return sum(1 for r in replicas if str(getattr(r.get("state"), "value", r.get("state"))) == "RUNNING")


@pytest.mark.usefixtures("ray_cluster")
def test_a_loaded_version_scales_up_and_back_down_without_a_failed_call(tmp_path: Path) -> None:
    # Serve scales on the Ray Serve calls in flight, and the gateway sends one call at a time per
    # autoscaled version over the replica's local channel, which Serve does not see (gateway.serving.
    # local_path). With a model that scores in microseconds that local call takes most of the load: Serve
    # counted 0.54-0.69 calls under 24 busy clients here (controller log, 2026-12-08; 1.47 with the local
    # channel off), and on CI's slower machine (2026-12-07) under the 0.5 target for two minutes, so no
    # second replica. A version whose every call costs ~20 ms of the replica's CPU (slow_onnx) is the load
    # autoscaling is for: the local call is always busy and the rest go through Serve, which counts
    # 1.4-2.0 and asks for 3 replicas; for the trickle (one call every 0.25 s) it counts 0.
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg, model, _ = served_model(url, "auto", onnx=slow_onnx(700))
    # Short delays so the test sees both directions in about a minute (production keeps Ray's defaults).
    scaling = ReplicaScaling(min_replicas=1, max_replicas=3, target_ongoing_requests=0.5, upscale_delay_s=1.0,
                             downscale_delay_s=4.0, look_back_s=2.0)
    # The failed calls this test is about are the ones scaling could cause (a replica removed under a call,
    # a call routed to one still starting). A 20 ms call queued behind others on a replica starved of CPU
    # while two more start can also go 3 s unanswered: a fresh clone's run beside a second Ray cluster under
    # load failed that way (the stall timeout, UNAVAILABLE "no answer within 3 s"). Slow models are what
    # CHIMERA_REPLICA_STALL_TIMEOUT_S is raised for (README); this test raises it to 10 s.
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, replica_scaling=scaling,
                       batch=BatchConfig(stall_timeout_s=10.0)).start()
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
        threads = [threading.Thread(target=client, args=(heavy, 0.0)) for _ in range(8)]
        threads.append(threading.Thread(target=client, args=(light, 0.25)))
        for t in threads:
            t.start()
        # The scale-up is the count seen while waiting, not a second read: CI's run on 2026-12-07 saw two
        # running replicas and, at the read right after, one, which failed a `peak >= 2` read after the
        # scale-up had been seen (no call failed). Why the second replica was gone at once was not recorded;
        # the counts seen are now in the message if the scale-up or the way down fails.
        seen: list[int] = []

        def count() -> int:
            seen.append(running_replicas(model, 1))
            return seen[-1]

        scaled_up = poll_until(lambda: count() >= 2, 120, every=0.5)
        heavy.clear()  # the load stops; the trickle goes on while replicas are removed
        scaled_down = poll_until(lambda: count() == 1, 120, every=0.5)
        time.sleep(2.0)  # calls right after the removal still answer
        light.clear()
        for t in threads:
            t.join(30)
        assert scaled_up, f"never more than one replica ({answered[0]} calls answered; counts seen {seen})"
        assert scaled_down, f"still {count()} replicas after the load stopped (counts seen {seen})"
        assert failures == [], failures[:5]
        assert answered[0] > 100
    finally:
        heavy.clear()
        light.clear()
        gw.stop()
        reg.dispose()


def serve_bounds(model: str, version: int) -> tuple[int, int]:
    """(min, max) replicas of the version's application as Ray Serve holds them."""
    details = app_details(app_name(model, version)) or {}
    config = ((details.get("deployments") or {}).get("scorer") or {}).get("deployment_config") or {}
    auto = config.get("autoscaling_config")
    if auto:
        return int(auto["min_replicas"]), int(auto["max_replicas"])
    return int(config["num_replicas"]), int(config["num_replicas"])


@pytest.mark.usefixtures("ray_cluster")
def test_per_model_policy_bounds_canary_and_production_and_changes_at_run_time_in_place(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "pol" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=4)
    reg.publish_version(model, onnx, names)
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 95, 2: 5}, expected_revision=0, actor="test", status_changes={1: "production"})
    # The process setting is one fixed replica; the model's policy says 1..3 for production, 2 for a canary.
    reg.set_rollout_config(model, {"replicas_min": 1, "replicas_max": 3, "canary_replicas_max": 2,
                                   "target_ongoing_requests": 0.5, "upscale_delay_s": 1.0,
                                   "downscale_delay_s": 4.0})
    gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()
    failures: list[str] = []
    answered = [0]
    trickle = threading.Event()
    trickle.set()

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            stub = pb_grpc.PredictionServiceStub(ch)
            while trickle.is_set():
                try:
                    stub.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=10)
                    answered[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                time.sleep(0.02)

    def gauge(version: int) -> float | None:
        return gw.gateway.metrics.registry.get_sample_value("chimera_replicas",
                                                            {"model": model, "version": str(version)})

    thread = threading.Thread(target=client)
    try:
        assert (serve_bounds(model, 1), serve_bounds(model, 2)) == ((1, 3), (1, 2))
        assert poll_until(lambda: gauge(1) == 1 and gauge(2) == 1, 30), (gauge(1), gauge(2))
        # Idle: the gateway has made no Serve call of its own (the local channel is looked for at the first
        # call), so Serve's autoscaler has seen no load and no version has grown. Before this rule, the
        # start-up discovery call scaled v1 to 2 here under a loaded machine (fresh clone, 2026-12-05).
        time.sleep(3.0)  # > upscale_delay_s + Serve's metrics push: time for a wrong upscale to show
        assert {p.status for p in gw.gateway.pool._local_paths} == {"starting"}
        before = {1: replica_pids(model, 1), 2: replica_pids(model, 2)}
        assert all(len(p) == 1 for p in before.values()), before
        thread.start()
        # At run time: production keeps at least 2 replicas, a canary at most 1 (fixed).
        sc = gw.rollout.SetScaling(rpb.SetScalingRequest(
            model=model, scaling=rpb.ScalingPolicy(replicas_min=2, canary_replicas_max=1),
            reason="more headroom"), metadata=ADMIN_MD, timeout=30)
        rows = {v.version: (v.role, v.replicas_min, v.replicas_max) for v in sc.versions}
        assert rows == {1: ("production", 2, 3), 2: ("canary", 1, 1)}, rows
        assert (sc.policy.replicas_min, sc.policy.replicas_max, sc.policy.canary_replicas_max) == (2, 3, 1)
        assert poll_until(lambda: (serve_bounds(model, 1), serve_bounds(model, 2)) == ((2, 3), (1, 1)), 30,
                          every=0.25), (serve_bounds(model, 1), serve_bounds(model, 2))
        assert poll_until(lambda: running_replicas(model, 1) == 2, 120, every=0.5)
        # In place: the replicas that ran before still run (Serve added one, restarted none).
        assert before[1] < replica_pids(model, 1) and replica_pids(model, 2) == before[2]
        assert poll_until(lambda: gauge(1) == 2 and gauge(2) == 1, 30), (gauge(1), gauge(2))
        status = gw.rollout.GetRolloutStatus(rpb.GetRolloutStatusRequest(model=model), metadata=ADMIN_MD,
                                             timeout=10)
        assert {v.version: v.replicas for v in status.scaling.versions} == {1: 2, 2: 1}
        # A bad value is refused naming the field, and nothing changes; the token is required.
        for bad, named in ((rpb.ScalingPolicy(replicas_max=1), "replicas_max"),
                           (rpb.ScalingPolicy(target_ongoing_requests=float("nan")),
                            "target_ongoing_requests"),
                           (rpb.ScalingPolicy(upscale_delay_s=-1), "upscale_delay_s")):
            with pytest.raises(grpc.RpcError) as err:
                gw.rollout.SetScaling(rpb.SetScalingRequest(model=model, scaling=bad), metadata=ADMIN_MD,
                                      timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(named), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            unauthenticated = rpb.SetScalingRequest(model=model, scaling=rpb.ScalingPolicy(replicas_min=1))
            gw.rollout.SetScaling(unauthenticated, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reg.rollout_config(model)["replicas_min"] == 2
        # The CLI shows and changes the same thing: back to the process settings (one fixed replica).
        env = {"CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN}
        target = ["--target", f"127.0.0.1:{gw.port}"]
        shown = CliRunner().invoke(app, ["rollout", "scaling", model, *target], env=env)
        assert shown.exit_code == 0 and "canary max 1" in shown.output, shown.output
        reset = CliRunner().invoke(app, ["rollout", "scaling", model, "--reset", *target], env=env)
        assert reset.exit_code == 0 and "process settings" in reset.output, reset.output
        assert poll_until(lambda: (serve_bounds(model, 1), serve_bounds(model, 2)) == ((1, 1), (1, 1)), 30,
                          every=0.25), (serve_bounds(model, 1), serve_bounds(model, 2))
        assert poll_until(lambda: running_replicas(model, 1) == 1, 120, every=0.5)
        assert replica_pids(model, 2) == before[2]
        # A policy written by another gateway (here: straight into the registry) reaches Serve through
        # this gateway's scaling watch within a few seconds.
        reg.set_rollout_config(model, {**reg.rollout_config(model), "replicas_max": 2})
        assert poll_until(lambda: serve_bounds(model, 1) == (1, 2), 20, every=0.25), serve_bounds(model, 1)
        # A promotion reaches the running deployments: v2, a canary capped at one replica, takes
        # production's bounds in place (its replica keeps running), under the same trickle of calls.
        reg.set_rollout_config(model, {**reg.rollout_config(model), "canary_replicas_max": 1})
        assert poll_until(lambda: serve_bounds(model, 2) == (1, 1), 20, every=0.25), serve_bounds(model, 2)
        gw.rollout.Promote(rpb.PromoteRequest(model=model, version=2, reason="test", force=True),
                           metadata=ADMIN_MD, timeout=30)
        assert poll_until(lambda: serve_bounds(model, 2) == (1, 2), 20, every=0.25), serve_bounds(model, 2)
        assert replica_pids(model, 2) == before[2]
        time.sleep(1.0)
        trickle.clear()
        thread.join(30)
        assert failures == [], failures[:5]
        assert answered[0] > 50
    finally:
        trickle.clear()
        gw.stop()
        reg.dispose()
