"""Replicas declared by the cluster (deploy/ray/serve-config.yaml under KubeRay, or `serve deploy`): the
gateway uses the declared application as it is, on the real Ray cluster. The application is declared
through Ray Serve's declarative API (what `serve deploy` and KubeRay call) with the config's import
path, replicas.deployment:build_app, and two replicas; the gateway must neither redeploy it (same
replica processes, still two) nor delete it when it stops."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from replicas.deployment import app_name
from tests.harness import GatewayThread, small_onnx
from tests.test_replica_faults import replica_pids

pytestmark = pytest.mark.usefixtures("ray_cluster")


def declare(apps: list[dict]) -> None:
    """Apply a multi-application Serve config, as `serve deploy` and KubeRay do."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start()
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))


def app_details(name: str) -> dict | None:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"].get(name)


def test_gateway_uses_a_declared_application_as_it_is(tmp_path: Path) -> None:
    from ray import serve

    from replicas.deployment import declared_app

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "decl" + uuid.uuid4().hex[:6]
    data, names = small_onnx(seed=4)
    reg.publish_version(model, data, names, status="production")
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    name = app_name(model, 1)
    declare([{"name": name, "route_prefix": None, "import_path": "replicas.deployment:build_app",
              "args": {"model": model, "version": 1, "registry_url": url},
              "deployments": [{"name": "scorer", "num_replicas": 2,
                               "ray_actor_options": {"num_cpus": 0.1}}]}])
    gw = None
    try:
        assert declared_app(model, 1, timeout_s=180)  # waits until RUNNING
        pids = replica_pids(model, 1)
        assert len(pids) == 2
        assert not declared_app(model, 2)  # nothing declared: the gateway deploys that one itself

        gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()
        assert gw.gateway.pool.is_declared(model, 1) and gw.gateway.pool.owned_versions() == []
        for i in range(20):
            request = pb.PredictRequest(model=model, routing_key=f"k{i}", dense=[0.1, 0.2, 0.3, 0.4])
            r = gw.predict.Predict(request, timeout=30)
            assert r.version == 1 and 0.0 <= r.score <= 1.0
        time.sleep(1.0)  # a redeploy would have started replacing replicas by now
        assert replica_pids(model, 1) == pids, "the gateway replaced the declared replicas"
        details = app_details(name)
        assert details is not None
        assert (details["source"].value, details["status"].value) == ("declarative", "RUNNING")
        gw.stop()  # undeploys what it deployed itself, and nothing that was declared
        gw = None
        assert app_details(name) is not None and replica_pids(model, 1) == pids
    finally:
        if gw is not None:
            gw.stop()
        serve.delete(name)
        reg.dispose()
