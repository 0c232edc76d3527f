"""The Go example client (examples/go-client) built offline from Debian's Go packages, run against a live
gateway (grpc.aio + Ray Serve replicas of a real ONNX model, two versions behind a 70/30 split).

Needs golang-go, golang-google-grpc-dev, golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev,
protobuf-compiler, protoc-gen-go and protoc-gen-go-grpc; `make test` installs them (`make sysdeps`) when it
runs as root. Missing as root is a failure; missing as another user is a skip that says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "examples" / "go-client"
GO_PACKAGES = ("golang-go golang-google-grpc-dev golang-google-protobuf-dev "
               "golang-github-golang-protobuf-1-5-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc")
GOCODE = Path("/usr/share/gocode/src")


def require_go_toolchain() -> None:
    tools = ("go", "gofmt", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    missing = [t for t in tools if not shutil.which(t)]
    missing += [str(GOCODE / p) for p in ("google.golang.org/grpc", "google.golang.org/protobuf",
                                           "github.com/golang/protobuf/proto") if not (GOCODE / p).exists()]
    if not missing:
        return
    why = f"Go toolchain incomplete, missing {missing}; Debian packages: {GO_PACKAGES}"
    if os.geteuid() == 0:
        pytest.fail(f"{why}. Running as root, so `make sysdeps` (part of `make test`) should have installed "
                    "them: run `make sysdeps` and look at its output.", pytrace=False)
    pytest.skip(f"{why}. Not root, so they cannot be installed here: `sudo apt-get install {GO_PACKAGES}`")


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_go_toolchain()
    out = tmp_path_factory.mktemp("go") / "chimera-go-client"
    proc = subprocess.run([str(CLIENT_DIR / "build.sh"), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert out.is_file() and os.access(out, os.X_OK)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("goserve")
    url = f"sqlite:///{tmp / 'registry.db'}"
    registry = Registry(url)
    registry.upgrade()
    model = "go" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    registry.publish_version(model, b1, names)
    registry.publish_version(model, b2, names)
    registry.set_split(model, {1: 70, 2: 30}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp).start()
    yield gw, registry, model, names
    gw.stop()
    registry.dispose()


def run_client(binary: Path, port: int, *args: str, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "-target", f"127.0.0.1:{port}", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def parse_json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


FEATURES = {"f0": 0.3, "f1": -1.2, "f2": 0.7, "f3": 2.0}
FEATURE_ARG = ",".join(f"{k}={v}" for k, v in FEATURES.items())


def test_go_sources_are_gofmt_clean() -> None:
    require_go_toolchain()
    proc = subprocess.run(["gofmt", "-l", str(CLIENT_DIR)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_go_client_predict_batch_and_outcomes(go_client: Path, served) -> None:
    gw, registry, model, _ = served
    proc = run_client(go_client, gw.port, "-model", model, "-features", FEATURE_ARG,
                      "-routing-key", "go-user", "-batch", "5", "-outcome", "1", "-timeout", "30s", "-json")
    assert proc.returncode == 0, proc.stderr
    lines = parse_json_lines(proc.stdout)
    calls = [ln["call"] for ln in lines]
    assert calls == ["Predict"] + ["PredictBatch"] * 5 + ["RecordOutcome"] + ["RecordOutcomes"] * 5, calls

    predict = lines[0]
    assert predict["model"] == model and predict["version"] in (1, 2)
    assert 0.0 <= predict["score"] <= 1.0
    assert len(predict["request_id"]) >= 16  # made by the gateway
    # The same row from the Python client, same routing key: same version, same score.
    py = gw.predict.Predict(pb.PredictRequest(model=model, routing_key="go-user", features=FEATURES),
                            timeout=30)
    assert py.version == predict["version"]
    assert py.score == pytest.approx(predict["score"], abs=1e-9)

    batch = lines[1:6]
    assert [b["row"] for b in batch] == [0, 1, 2, 3, 4]
    for i, b in enumerate(batch):
        assert b["model"] == model and b["version"] in (1, 2) and 0.0 <= b["score"] <= 1.0
        again = gw.predict.Predict(
            pb.PredictRequest(model=model, routing_key=f"go-user-{i}", features=FEATURES), timeout=30)
        assert again.version == b["version"] and again.score == pytest.approx(b["score"], abs=1e-9)

    # The request id Predict returned was accepted by RecordOutcome, and the outcome is stored against it.
    outcome = lines[6]
    assert outcome["request_id"] == predict["request_id"] and outcome["status"] == "OK"
    stored = registry.get_prediction(predict["request_id"])
    assert stored.model == model and stored.version == predict["version"]
    assert [o["code"] for o in lines[7:]] == [0] * 5
    assert [o["request_id"] for o in lines[7:]] == [b["request_id"] for b in batch]
    assert sum(n for n, _ in registry.outcome_means(model).values()) >= 6
    # Stored with the value the Go client sent: the same value again is fine, another one conflicts.
    for rid in [predict["request_id"]] + [b["request_id"] for b in batch]:
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=1.0), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=0.0), timeout=30)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_go_client_caller_request_id_and_text_output(go_client: Path, served) -> None:
    gw, registry, model, _ = served
    rid = "go-" + uuid.uuid4().hex
    proc = run_client(go_client, gw.port, "-model", model, "-features", FEATURE_ARG, "-request-id", rid,
                      "-batch", "0", "-outcome", "0", "-timeout", "30s")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("Predict ") and f"request_id={rid}" in out[0] and f"model={model}" in out[0]
    assert out[1].startswith("RecordOutcome ") and "status=OK" in out[1]
    assert registry.get_prediction(rid).model == model


def test_go_client_pinned_version_needs_admin_token(go_client: Path, served) -> None:
    gw, _, model, _ = served
    args = ("-model", model, "-features", FEATURE_ARG, "-version", "2", "-batch", "3", "-no-outcome",
            "-timeout", "30s", "-json")
    ok = run_client(go_client, gw.port, *args, env={"CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert {ln["version"] for ln in parse_json_lines(ok.stdout)} == {2}
    denied = run_client(go_client, gw.port, *args, env={"CHIMERA_ADMIN_TOKEN": "wrong"})
    assert denied.returncode == 1 and "Predict failed: code=Unauthenticated" in denied.stderr


def test_go_client_open_inference_protocol(go_client: Path, served) -> None:
    """-oip: ServerReady, ModelMetadata and ModelInfer over inference.GRPCInferenceService (the proto in
    protos/inference, generated for Go like chimera/v1), then RecordOutcome with the returned id."""
    gw, registry, model, names = served
    rid = "go-oip-" + uuid.uuid4().hex
    dense = ",".join(f"{n}={FEATURES[n]}" for n in names)  # the schema's order
    proc = run_client(go_client, gw.port, "-oip", "-model", model, "-features", dense, "-routing-key",
                      "go-oip-user", "-request-id", rid, "-outcome", "1", "-timeout", "30s", "-json")
    assert proc.returncode == 0, proc.stderr
    lines = parse_json_lines(proc.stdout)
    assert [ln["call"] for ln in lines] == ["ModelInfer", "RecordOutcome"]
    infer = lines[0]
    assert infer["ready"] is True and infer["versions"] == ["1", "2"] and infer["width"] == len(names)
    assert infer["request_id"] == rid and infer["model"] == model
    # The same row and key through Predict: same version, same score to float32 rounding.
    py = gw.predict.Predict(pb.PredictRequest(model=model, routing_key="go-oip-user", features=FEATURES),
                            timeout=30)
    assert py.version == infer["version"]
    assert infer["score"] == pytest.approx(py.score, rel=1e-5, abs=1e-7)
    assert registry.get_prediction(rid).version == infer["version"]
    assert lines[1]["request_id"] == rid and lines[1]["status"] == "OK"
    with pytest.raises(grpc.RpcError) as err:  # the outcome is stored (as 1.0) against the OIP row
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=0.0), timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("args, expected", [
    (("-model", "no-such-model", "-features", FEATURE_ARG), "Predict failed: code=NotFound"),
    (("-features", "f0=1,f1=2,f2=3,bogus=4"), "Predict failed: code=InvalidArgument"),
    (("-features", FEATURE_ARG, "-timeout", "1ns"), "Predict failed: code=DeadlineExceeded"),
])
def test_go_client_reports_grpc_status(go_client: Path, served, args: tuple[str, ...], expected: str) -> None:
    gw, _, model, _ = served
    proc = run_client(go_client, gw.port, "-model", model, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr
