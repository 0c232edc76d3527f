"""The Open Inference Protocol v2 (gateway/api/oip.py), checked with a client nobody here wrote: the
`tritonclient[grpc]` package, in its own venv (`.venv-oip/` at the repo root, made once and kept;
tritonclient pins protobuf below 7, which the product's generated stubs need, so it cannot share the
product's venv: ../shared/FACTS.md). A small client script runs in a subprocess with that venv's
Python and reports JSON; the assertions run here, against the registry and Predict.

On SQLite and PostgreSQL, one gateway, a 90/10 split of two versions that score differently:
ServerLive/Ready/Metadata, ModelReady, ModelMetadata (the tensors README documents), the service in
health and reflection, ModelInfer of 2,000 rows with one routing key per row (the BYTES input) and a
single row with the `routing_key` and `request_id` parameters; scores and versions equal Predict's
for the same rows and keys; the canary's share is within a binomial tolerance; every answered row is
logged once and outcomes recorded with the returned request ids join to them; a pinned version needs
the admin token; bad tensors get INVALID_ARGUMENT naming the field, an unknown model NOT_FOUND."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-oip"
READY_MARK = VENV / ".tritonclient-ok"
N_ROWS = 2000
N_FEATURES = 4
CANARY = 10  # percent

# Runs in .venv-oip: tritonclient only (no product code). Reads {"url", "model", ...} on stdin.
CLIENT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

spec = json.load(sys.stdin)
c = tc.InferenceServerClient(url=spec["url"])
model = spec["model"]
out = {}


def status(call):
    try:
        call()
        return ["OK", ""]
    except InferenceServerException as e:
        return [str(e.status()).rpartition(".")[2], e.message() or ""]


def fp32_input(x, name="input"):
    t = tc.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t


def bytes_input(name, values):
    t = tc.InferInput(name, [len(values)], "BYTES")
    t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
    return t


if spec["action"] == "serve":
    out["live"] = c.is_server_live()
    out["ready"] = c.is_server_ready()
    out["server"] = c.get_server_metadata(as_json=True)
    out["model_ready"] = c.is_model_ready(model)
    out["unknown_ready"] = c.is_model_ready("no-such-model")
    out["metadata"] = c.get_model_metadata(model, as_json=True)
    rows = np.asarray(spec["rows"], dtype=np.float32)
    keys = spec["keys"]
    scores, versions, ids = [], [], []
    for lo in range(0, len(rows), 500):  # raw_input_contents, as tritonclient sends tensors
        r = c.infer(model, [fp32_input(rows[lo:lo + 500]), bytes_input("routing_key", keys[lo:lo + 500])],
                    request_id=f"call-{lo}")
        assert r.get_response().id == f"call-{lo}"
        scores += r.as_numpy("score").tolist()
        versions += r.as_numpy("version").tolist()
        ids += [b.decode() for b in r.as_numpy("request_id").tolist()]
    out.update(scores=scores, versions=versions, request_ids=ids)
    # One row with the routing key and request id as request parameters; only the score asked for.
    r = c.infer(model, [fp32_input(rows[:1])], parameters={"routing_key": keys[0],
                                                           "request_id": spec["single_id"]},
                outputs=[tc.InferRequestedOutput("score")])
    resp = r.get_response(as_json=True)
    out["single"] = {"score": r.as_numpy("score").tolist(), "outputs": [o["name"] for o in resp["outputs"]],
                     "parameters": resp.get("parameters", {}), "model_version": resp.get("model_version", "")}
    # The same rows as typed contents (fp32_contents), through tritonclient's own protobuf stubs.
    import grpc
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(spec["url"]))
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="input", datatype="FP32", shape=[3, rows.shape[1]])
    t.contents.fp32_contents.extend(rows[:3].ravel().tolist())
    k = req.inputs.add(name="routing_key", datatype="BYTES", shape=[3])
    k.contents.bytes_contents.extend([s.encode() for s in keys[:3]])
    typed = stub.ModelInfer(req, timeout=30)
    out["typed_scores"] = np.frombuffer(typed.raw_output_contents[0], "<f4").tolist()
    # Pinning a version: refused without the admin token, served with it.
    pin = lambda headers: c.infer(model, [fp32_input(rows[:2])], model_version="2", headers=headers)
    out["pin_no_token"] = status(lambda: pin(None))
    pinned = pin({"authorization": "Bearer " + spec["admin_token"]})
    out["pinned_versions"] = pinned.as_numpy("version").tolist()
    out["pinned_model_version"] = pinned.get_response().model_version

elif spec["action"] == "bad":
    good = np.zeros((2, spec["n_features"]), dtype=np.float32)
    key2 = bytes_input("routing_key", ["a", "b"])
    fp64 = tc.InferInput("input", [2, spec["n_features"]], "FP64")
    fp64.set_data_from_numpy(good.astype(np.float64))
    cases = {
        "datatype": lambda: c.infer(model, [fp64]),
        "shape_width": lambda: c.infer(model, [fp32_input(np.zeros((2, spec["n_features"] + 1)))]),
        "shape_rank": lambda: c.infer(model, [fp32_input(np.zeros(spec["n_features"]))]),
        "missing_input": lambda: c.infer(model, [key2]),
        "unknown_input": lambda: c.infer(model, [fp32_input(good), fp32_input(good, "extra")]),
        "keys_shape": lambda: c.infer(model, [fp32_input(good), bytes_input("routing_key", ["a"])]),
        "nul_key": lambda: c.infer(model, [fp32_input(good)], parameters={"routing_key": "a\x00b"}),
        "nul_id": lambda: c.infer(model, [fp32_input(good[:1])], parameters={"request_id": "x\x00"}),
        "int_key": lambda: c.infer(model, [fp32_input(good)], parameters={"routing_key": 7}),
        "two_keys": lambda: c.infer(model, [fp32_input(good), key2], parameters={"routing_key": "k"}),
        "nan": lambda: c.infer(model, [fp32_input(np.full((1, spec["n_features"]), np.nan))]),
        "bad_version": lambda: c.infer(model, [fp32_input(good)], model_version="latest"),
        "unknown_output": lambda: c.infer(model, [fp32_input(good)], outputs=[tc.InferRequestedOutput("x")]),
        "unknown_model": lambda: c.infer("no-such-model", [fp32_input(good)]),
        "unknown_model_metadata": lambda: c.get_model_metadata("no-such-model"),
    }
    out = {name: status(call) for name, call in cases.items()}
    # Hand-made requests a well-behaved client would not send: raw size and count mismatches.
    import grpc
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(spec["url"]))
    def raw(shape, data, n_raw=1):
        req = service_pb2.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=shape)
        req.raw_input_contents.extend([data] * n_raw)
        try:
            stub.ModelInfer(req, timeout=30)
            return ["OK", ""]
        except grpc.RpcError as e:
            return [e.code().name, e.details() or ""]
    out["raw_size"] = raw([2, spec["n_features"]], good.tobytes()[:-4])
    out["raw_count"] = raw([2, spec["n_features"]], good.tobytes(), n_raw=2)
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, spec["n_features"]])
    t.contents.fp32_contents.extend([0.0] * 3)
    try:
        stub.ModelInfer(req, timeout=30)
        out["typed_count"] = ["OK", ""]
    except grpc.RpcError as e:
        out["typed_count"] = [e.code().name, e.details() or ""]
    out["still_serves"] = c.infer(model, [fp32_input(good)]).as_numpy("score").tolist()

print(json.dumps(out))
'''


def _pip_unreachable(output: str) -> bool:
    signs = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
             "Failed to establish a new connection", "Max retries exceeded", "No matching distribution found")
    return any(s in output for s in signs)


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The Python of `.venv-oip` with tritonclient[grpc] installed (made on first use, ~90 s; kept for
    later sessions). Skips only when the package index cannot be reached."""
    python = VENV / "bin" / "python"
    if READY_MARK.exists() and python.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "tritonclient[grpc]"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        output = pip.stdout + pip.stderr
        if _pip_unreachable(output):
            pytest.skip("tritonclient[grpc] could not be installed (package index unreachable): "
                        f"{output[-500:]}")
        raise AssertionError(f"pip install tritonclient[grpc] failed:\n{output[-3000:]}")
    subprocess.run([str(python), "-c", "import tritonclient.grpc"], check=True, timeout=60)
    READY_MARK.touch()
    return python


def same(expected: object) -> object:
    """Equal to float32 rounding: onnxruntime scores a row a few ULPs differently depending on the
    micro-batch it lands in (measured 1.2e-6 relative), while the two versions here differ by far more."""
    return pytest.approx(expected, rel=1e-5, abs=1e-7)


def run_client(python: Path, spec: dict) -> dict:
    proc = subprocess.run([str(python), "-c", CLIENT], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"client failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A model with versions 1 (baseline) and 2 (a canary whose labels are flipped, so the two score
    the same row differently) on a 90/10 split, behind one gateway."""
    tmp = tmp_path_factory.mktemp("oip")
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    model = "oip" + uuid.uuid4().hex[:8]
    for seed, flip in ((7, False), (8, True)):
        onnx, names = small_onnx(N_FEATURES, seed=seed, flip=flip)
        reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100 - CANARY, 2: CANARY}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp, controller_interval_s=0).start()
    yield gw, reg, model
    gw.stop()
    reg.dispose()


def test_tritonclient_scores_like_predict_on_a_90_10_split(served, triton_python: Path) -> None:
    gw, reg, model = served
    rng = np.random.default_rng(2026)
    rows = rng.normal(size=(N_ROWS, N_FEATURES)).astype(np.float32)
    keys = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(N_ROWS)]
    single_id = "oip-single-" + uuid.uuid4().hex[:8]
    out = run_client(triton_python, {"action": "serve", "url": gw.target, "model": model,
                                     "rows": rows.tolist(), "keys": keys, "single_id": single_id,
                                     "admin_token": ADMIN_TOKEN})

    assert out["live"] is True and out["ready"] is True
    # Listed by reflection and health like Chimera's own services (grpc clients and load balancers).
    health = health_pb2_grpc.HealthStub(gw.channel).Check(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = reflection_pb2_grpc.ServerReflectionStub(gw.channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    assert "inference.GRPCInferenceService" in {x.name for r in listed
                                                for x in r.list_services_response.service}
    assert out["server"]["name"] == "chimera"
    assert out["model_ready"] is True and out["unknown_ready"] is False
    meta = out["metadata"]
    assert meta["name"] == model and meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]} == {
        "input": ("FP32", [-1, N_FEATURES]), "routing_key": ("BYTES", [-1]), "request_id": ("BYTES", [-1])}
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "score": "FP32", "version": "INT32", "request_id": "BYTES"}

    versions = out["versions"]
    ids = out["request_ids"]
    assert len(versions) == len(out["scores"]) == len(set(ids)) == N_ROWS
    # The canary's share: binomial over routing keys, 4.5 standard deviations.
    share = versions.count(2) / N_ROWS
    p = CANARY / 100
    assert abs(share - p) <= 4.5 * math.sqrt(p * (1 - p) / N_ROWS), share

    # Scores equal Predict's for the same rows and keys (same version by the sticky key).
    sample = list(range(0, N_ROWS, 25)) + [i for i, v in enumerate(versions) if v == 2][:20]
    for i in sample:
        r = gw.predict.Predict(pb.PredictRequest(model=model, routing_key=keys[i], dense=rows[i].tolist()),
                               timeout=30)
        assert r.version == versions[i], (i, r.version, versions[i])
        assert out["scores"][i] == same(r.score), (i, r.score, out["scores"][i])
    assert out["typed_scores"] == same(out["scores"][:3])  # fp32_contents and raw_input_contents agree

    single = out["single"]
    assert single["outputs"] == ["score"] and single["score"] == same(out["scores"][:1])
    assert single["parameters"]["request_id"]["string_param"] == single_id
    assert int(single["parameters"]["version"]["int64_param"]) == versions[0]
    assert single["model_version"] == str(versions[0])

    assert out["pin_no_token"][0] in ("UNAUTHENTICATED", "PERMISSION_DENIED"), out["pin_no_token"]
    assert out["pinned_versions"] == [2, 2] and out["pinned_model_version"] == "2"

    # Every answered row logged once: OIP rows (2,000 + 1 + 3 + 2 pinned) and the Predict calls.
    expected = {1: versions.count(1), 2: versions.count(2)}
    for v in [versions[0], *versions[:3], 2, 2, *(versions[i] for i in sample)]:
        expected[v] += 1
    wait_for(lambda: reg.count_predictions(model) == expected, 60, f"{expected} logged rows")
    for i in (0, sample[-1]):
        stored = reg.get_prediction(ids[i])
        assert (stored.version, stored.routing_key) == (versions[i], keys[i])
        assert stored.score == pytest.approx(out["scores"][i], abs=1e-6)
    assert reg.get_prediction(single_id).routing_key == keys[0]

    # Outcomes recorded with the returned request ids join to the logged rows.
    items = [pb.RecordOutcomeRequest(request_id=rid, value=float(v == 2))
             for rid, v in zip(ids, versions, strict=True)]
    outcomes = gw.predict.RecordOutcomes(pb.RecordOutcomesRequest(outcomes=items), timeout=60)
    assert all(s.code == 0 for s in outcomes.statuses)
    gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=single_id, value=float(versions[0] == 2)),
                             timeout=30)
    assert reg.outcome_means(model) == {v: (versions.count(v) + (versions[0] == v), float(v == 2))
                                        for v in (1, 2)}


def test_bad_tensors_are_invalid_argument(served, triton_python: Path) -> None:
    gw, _, model = served
    out = run_client(triton_python, {"action": "bad", "url": gw.target, "model": model,
                                     "n_features": N_FEATURES})
    names = {  # case -> a piece of the message naming the field
        "datatype": "inputs['input'].datatype", "shape_width": "inputs['input'].shape",
        "shape_rank": "inputs['input'].shape", "missing_input": "missing input 'input'",
        "unknown_input": "unknown input 'extra'", "keys_shape": "inputs['routing_key'].shape",
        "nul_key": "routing_key", "nul_id": "request_id", "int_key": "parameters['routing_key']",
        "two_keys": "parameters['routing_key']", "nan": "finite", "bad_version": "model_version",
        "unknown_output": "unknown output 'x'", "raw_size": "raw_input_contents",
        "raw_count": "raw_input_contents", "typed_count": "fp32_contents",
    }
    for case, field in names.items():
        code, message = out[case]
        assert code == "INVALID_ARGUMENT", (case, code, message)
        assert field in message, (case, message)
    assert out["nul_key"][1].count("NUL") == 1 and out["nul_id"][1].count("NUL") == 1
    assert out["unknown_model"][0] == "NOT_FOUND" and out["unknown_model_metadata"][0] == "NOT_FOUND"
    assert len(out["still_serves"]) == 2 and all(0.0 < s < 1.0 for s in out["still_serves"])
