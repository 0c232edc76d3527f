"""Replicas declared by the cluster (deploy/ray/serve-config.yaml under KubeRay, or `serve deploy`): the
gateway uses the declared application as it is, on the real Ray cluster. The application is declared
through Ray Serve's declarative API (what `serve deploy` and KubeRay call) with the config's import
path, replicas.deployment:build_app, and two replicas; the gateway must neither redeploy it (same
replica processes, still two) nor delete it when it stops."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from replicas.deployment import app_name
from tests.harness import GatewayThread, small_onnx
from tests.integration.test_replica_faults import replica_pids

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


def test_replica_reads_the_registry_password_from_its_environment(postgres) -> None:  # noqa: ANN001
    """The registry password never rides in a replica's actor arguments (Ray shows those to whoever
    reaches its dashboard): with the URL only in the Serve config's args, the replica is refused with
    what to set, although this test PostgreSQL (trust authentication) would accept any password, so
    a password in the arguments would have let it start. With CHIMERA_REGISTRY_URL in the Ray
    environment (what deploy/k8s and compose give the Ray nodes) the same application serves."""
    from ray import serve
    from sqlalchemy.engine import make_url

    from replicas.deployment import DeclaredAppError, declared_app

    url = make_url(postgres.create_database()).set(password="pw-not-for-ray").render_as_string(
        hide_password=False)
    reg = Registry(url)
    reg.upgrade()
    model = "secret" + uuid.uuid4().hex[:6]
    data, names = small_onnx(seed=5)
    reg.publish_version(model, data, names, status="production")
    name = app_name(model, 1)
    scorer = {"name": "scorer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    try:
        declare([{"name": name, "route_prefix": None, "import_path": "replicas.deployment:build_app",
                  "args": {"model": model, "version": 1, "registry_url": url}, "deployments": [scorer]}])
        with pytest.raises(DeclaredAppError):
            declared_app(model, 1, timeout_s=180)
        message = str(app_details(name)["deployments"]["scorer"]["message"])  # the replica's exception
        assert "set CHIMERA_REGISTRY_URL" in message and "pw-not-for-ray" not in message, message
        serve.delete(name)
        # The Ray environment holds the full URL: the replica takes the password from there.
        declare([{"name": name, "route_prefix": None, "import_path": "replicas.deployment:build_app",
                  "runtime_env": {"env_vars": {"CHIMERA_REGISTRY_URL": url}},
                  "args": {"model": model, "version": 1}, "deployments": [scorer]}])
        assert declared_app(model, 1, timeout_s=180)
        scores = serve.get_app_handle(name).score.remote(np.zeros((2, len(names)), dtype=np.float32)).result(
            timeout_s=60)
        assert len(scores) == 2
    finally:
        serve.delete(name)
        reg.dispose()
