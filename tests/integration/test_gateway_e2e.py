"""End to end over real parts: gRPC client -> gateway -> Ray Serve replica (onnxruntime) -> response."""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from registry import Registry
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_MD, GatewayThread, small_onnx

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One registry and one gateway per backend for this module: deploying replicas costs seconds."""
    tmp = tmp_path_factory.mktemp(request.param)
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    yield reg, url, tmp
    reg.dispose()


@pytest.fixture(scope="module")
def served(backend):
    """Two versions of a fresh model at 90/10, behind a running gateway."""
    registry, registry_url, tmp_path = backend
    model = "m" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    registry.publish_version(model, b1, names)
    registry.publish_version(model, b2, names)
    registry.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test")
    gw = GatewayThread(registry_url, tmp_path).start()
    yield gw, model, names
    gw.stop()


@pytest.fixture
def registry(backend) -> Registry:
    return backend[0]


def test_predict_matches_onnxruntime_on_registry_bytes(served, registry: Registry) -> None:
    gw, model, names = served
    rng = np.random.default_rng(7)
    for i in range(20):
        row = rng.normal(size=len(names))
        resp = gw.predict.Predict(pb.PredictRequest(model=model, routing_key=f"k{i}", request_id=f"r{i}",
                                                    features=dict(zip(names, row, strict=True))), timeout=30)
        assert resp.request_id == f"r{i}" and resp.model == model and resp.version in (1, 2)
        data, _ = registry.get_onnx(model, resp.version)
        sess = ort.InferenceSession(data)
        expected = sess.run(None, {sess.get_inputs()[0].name: row.astype(np.float32)[None, :]})[1][0, 1]
        assert resp.score == pytest.approx(float(expected), abs=1e-6)
        dense = gw.predict.Predict(pb.PredictRequest(model=model, routing_key=f"k{i}", dense=list(row)),
                                   timeout=30)
        assert dense.version == resp.version and dense.score == pytest.approx(resp.score, abs=1e-9)


def test_the_gateways_replica_shutdown_wait_reaches_serve(served) -> None:
    """The config's replica_shutdown_wait_s (the test harness: 0.2 s) is what Serve runs the deployed
    versions with (Ray Serve's own view of the application)."""
    from replicas.deployment import app_name
    from replicas.serve_state import app_details

    gw, model, _names = served
    for version in (1, 2):
        config = app_details(app_name(model, version))["deployments"]["scorer"]["deployment_config"]
        assert config["graceful_shutdown_wait_loop_s"] == gw.config.replica_shutdown_wait_s == 0.2


def test_split_and_stickiness_over_5000_keyed_requests(served, registry: Registry) -> None:
    from scipy.stats import binom

    gw, model, names = served
    n = 5000
    rows = [pb.PredictRequest(routing_key=f"user-{i}", dense=[0.1, 0.2, 0.3, 0.4]) for i in range(n)]
    versions = []
    for start in range(0, n, 500):
        resp = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows[start:start + 500]),
                                       timeout=60)
        versions += [r.version for r in resp.results]
    canary = versions.count(2)
    lo, hi = binom.interval(0.999, n, 0.10)
    assert lo <= canary <= hi, f"canary got {canary} of {n}, 99.9% interval [{lo}, {hi}]"
    # Same key, same version, through the unary path too.
    for i in range(0, n, 97):
        again = gw.predict.Predict(pb.PredictRequest(model=model, routing_key=f"user-{i}",
                                                     dense=[0.1, 0.2, 0.3, 0.4]), timeout=30)
        assert again.version == versions[i]


def packed(x: np.ndarray, **kwargs: object) -> pb.DenseMatrix:
    return pb.DenseMatrix(f32=x.astype("<f4").tobytes(), cols=x.shape[1], **kwargs)


def test_packed_batch_scores_routes_and_logs_like_rows(served, registry: Registry) -> None:
    gw, model, names = served
    x = np.random.default_rng(11).normal(size=(300, len(names))).astype(np.float32)
    keys = [f"pk-{i}" for i in range(len(x))]
    ids = [f"packed-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(x))]
    resp = gw.predict.PredictBatch(pb.PredictBatchRequest(
        model=model, matrix=packed(x, routing_keys=keys, request_ids=ids)), timeout=30)
    assert list(resp.request_ids) == ids and len(resp.versions) == len(resp.scores) == len(x)
    assert not resp.results
    versions = np.array(resp.versions)
    assert set(versions.tolist()) == {1, 2}
    for v in (1, 2):
        data, _ = registry.get_onnx(model, v)
        sess = ort.InferenceSession(data)
        expected = sess.run(None, {sess.get_inputs()[0].name: x[versions == v]})[1][:, 1]
        np.testing.assert_allclose(np.array(resp.scores)[versions == v], expected, atol=1e-6)
    # The same keys as message rows land on the same versions with the same scores.
    rows = [pb.PredictRequest(routing_key=k, dense=x[i].tolist()) for i, k in enumerate(keys)]
    again = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=30)
    assert [r.version for r in again.results] == versions.tolist()
    np.testing.assert_allclose([r.score for r in again.results], resp.scores, atol=1e-9)
    # Generated ids when none are given; every row is logged under its id and version.
    anon = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, matrix=packed(x[:5])), timeout=30)
    assert len(set(anon.request_ids)) == 5 and all(len(r) >= 16 for r in anon.request_ids)
    gw.gateway.log.flush()
    assert registry.get_prediction(ids[7]).version == versions[7]
    assert registry.get_prediction(anon.request_ids[3]).score == pytest.approx(anon.scores[3])


@pytest.mark.parametrize("matrix, field", [
    (pb.DenseMatrix(f32=b"\0" * 12, cols=4), "matrix.f32"),
    (pb.DenseMatrix(f32=b"", cols=4), "matrix.f32"),
    (pb.DenseMatrix(f32=b"\0" * 16, cols=0), "matrix.cols"),
    (pb.DenseMatrix(f32=b"\0" * 24, cols=3), "matrix.cols: expected 4"),
    (packed(np.array([[1, 2, 3, 4], [1, np.nan, 3, 4]])), "row 1, column 1 (f1)"),
    (packed(np.ones((2, 4)), routing_keys=["a"]), "matrix.routing_keys"),
    (packed(np.ones((2, 4)), request_ids=["a", "b", "c"]), "matrix.request_ids"),
])
def test_bad_packed_batch_gets_invalid_argument(served, matrix: pb.DenseMatrix, field: str) -> None:
    gw, model, _ = served
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, matrix=matrix), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), \
        err.value.details()


def test_packed_batch_rejects_rows_and_matrix_together_and_pins_only_for_admins(served) -> None:
    gw, model, _ = served
    both = pb.PredictBatchRequest(model=model, rows=[pb.PredictRequest(dense=[1, 2, 3, 4])],
                                  matrix=packed(np.ones((1, 4))))
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.PredictBatch(both, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rows" in err.value.details()
    pinned = pb.PredictBatchRequest(model=model, matrix=packed(np.ones((3, 4)), version=2))
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.PredictBatch(pinned, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(gw.predict.PredictBatch(pinned, metadata=ADMIN_MD, timeout=30).versions) == [2, 2, 2]


def test_predictions_are_logged_and_outcomes_recorded(served, registry: Registry) -> None:
    gw, model, names = served
    resp = gw.predict.Predict(pb.PredictRequest(model=model, routing_key="a", dense=[1, 2, 3, 4]), timeout=30)
    assert len(resp.request_id) >= 16  # generated by the gateway when the caller gives none
    # Reported immediately after Predict: the gateway flushes its log first instead of NOT_FOUND.
    gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=resp.request_id, value=1.0), timeout=30)
    gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=resp.request_id, value=1.0), timeout=30)
    stored = registry.get_prediction(resp.request_id)
    assert stored.version == resp.version and stored.score == pytest.approx(resp.score)
    assert registry.outcome_means(model) == {resp.version: (1, 1.0)}
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=resp.request_id, value=0.0), timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id="nope", value=1.0), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()


@pytest.mark.parametrize("request_kwargs, code, field", [
    ({"model": "no-such-model", "dense": [1, 2, 3, 4]}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"features": {"f0": 1, "f1": 2, "f2": 3}}, grpc.StatusCode.INVALID_ARGUMENT, "'f3'"),
    ({"features": {"f0": 1, "f1": 2, "f2": 3, "f3": 4, "zz": 1}}, grpc.StatusCode.INVALID_ARGUMENT, "'zz'"),
    ({"features": {"f0": 1, "f1": 2, "f2": 3, "bogus": 4}}, grpc.StatusCode.INVALID_ARGUMENT, "'bogus'"),
    ({"dense": [1, 2, 3]}, grpc.StatusCode.INVALID_ARGUMENT, "dense"),
    ({"dense": [1, 2, float("nan"), 4]}, grpc.StatusCode.INVALID_ARGUMENT, "dense[2]"),
    ({"features": {"f0": 1, "f1": float("inf"), "f2": 3, "f3": 4}}, grpc.StatusCode.INVALID_ARGUMENT, "'f1'"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "features"),
])
def test_bad_input_gets_clear_status(served, request_kwargs: dict, code: grpc.StatusCode, field: str) -> None:
    gw, model, _ = served
    kwargs = {"model": model, **request_kwargs}
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.Predict(pb.PredictRequest(**kwargs), timeout=30)
    assert err.value.code() == code
    assert field in err.value.details()
    # Still serving afterwards.
    assert gw.predict.Predict(pb.PredictRequest(model=model, dense=[1, 2, 3, 4]), timeout=30).score > 0


def test_admin_split_changes_need_token_and_valid_weights(served, registry: Registry) -> None:
    gw, model, _ = served
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), timeout=10,
                                   metadata=(("authorization", "Bearer wrong"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    split = gw.rollout.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), timeout=10, metadata=ADMIN_MD)
    assert {w.version: w.weight for w in split.weights} == {1: 90, 2: 10}
    for weights, field in (({1: 90, 2: 20}, "sum to 100"), ({1: 90, 7: 10}, "version 7")):
        with pytest.raises(grpc.RpcError) as err:
            gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
                model=model, expected_revision=split.revision,
                weights=[rpb.VersionWeight(version=v, weight=w) for v, w in weights.items()]),
                timeout=10, metadata=ADMIN_MD)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert dict(registry.get_split(model).weights) == {1: 90, 2: 10}
    new = gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
        model=model, expected_revision=split.revision, reason="all on v2",
        weights=[rpb.VersionWeight(version=1, weight=0), rpb.VersionWeight(version=2, weight=100)]),
        timeout=10, metadata=ADMIN_MD)
    assert new.revision == split.revision + 1
    with pytest.raises(grpc.RpcError) as err:  # the same stale revision again loses
        gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
            model=model, expected_revision=split.revision,
            weights=[rpb.VersionWeight(version=1, weight=100)]), timeout=10, metadata=ADMIN_MD)
    assert err.value.code() == grpc.StatusCode.ABORTED
    # The gateway routes by the new split within a second, without restart.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        got = {gw.predict.Predict(pb.PredictRequest(model=model, routing_key=f"x{i}", dense=[1, 2, 3, 4]),
                                  timeout=10).version for i in range(20)}
        if got == {2}:
            break
    assert got == {2}
    registry.set_split(model, {1: 90, 2: 10}, expected_revision=None, actor="test", reason="restore")


def test_health_and_reflection(served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    gw, _, _ = served
    status = health_pb2_grpc.HealthStub(gw.channel).Check(
        health_pb2.HealthCheckRequest(service="chimera.v1.PredictionService"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"chimera.v1.PredictionService", "chimera.v1.RolloutService", "grpc.health.v1.Health"} <= names
