"""What an SRE relies on in /metrics, checked on a live gateway: every name starts with chimera_, label
values stay bounded whatever clients send, in-flight calls are counted while they run, and the README's
metrics table lists every metric the gateway exports."""

from __future__ import annotations

import queue
import re
import time
import uuid
from pathlib import Path

import grpc
import pytest

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from tests.harness import GatewayThread, small_onnx

pytestmark = pytest.mark.usefixtures("ray_cluster")
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("metrics")
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}")
    reg.upgrade()
    model = "mc" + uuid.uuid4().hex[:6]
    data, names = small_onnx(seed=4)
    reg.publish_version(model, data, names, status="production")
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(reg.url, tmp, controller_interval_s=0).start()
    try:
        yield gw, model
    finally:
        gw.stop()
        reg.dispose()


def exported_names(gw: GatewayThread) -> set[str]:
    names = set()
    for family in gw.gateway.metrics.registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_names_are_prefixed_and_model_labels_stay_bounded(live) -> None:
    gw, model = live
    gw.predict.Predict(pb.PredictRequest(model=model, dense=[0.1, 0.2, 0.3, 0.4]), timeout=10)
    for i in range(25):  # a client spraying made-up model names must not create 25 label values
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.Predict(pb.PredictRequest(model=f"nope-{i}", dense=[0.1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(n.startswith("chimera_") for n in exported_names(gw)), exported_names(gw)
    models = set()
    for family in gw.gateway.metrics.registry.collect():
        for sample in family.samples:
            if "model" in sample.labels:
                models.add(sample.labels["model"])
    assert models <= {model, "_unknown"}, models
    labels = {"model": "_unknown", "version": "", "method": "Predict", "code": "NOT_FOUND"}
    unknown = gw.gateway.metrics.registry.get_sample_value("chimera_requests_total", labels)
    assert unknown == 25


def test_inflight_counts_an_open_stream_until_it_ends(live) -> None:
    gw, model = live
    reg = gw.gateway.metrics.registry

    def inflight(method: str) -> float | None:
        return reg.get_sample_value("chimera_inflight_requests", {"method": method})

    def settles_at_zero(method: str) -> bool:
        # The server's handler ends a moment after its client has the answer: poll, do not race it.
        deadline = time.monotonic() + 5
        while inflight(method) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return inflight(method) == 0

    assert settles_at_zero("Predict") and settles_at_zero("PredictStream")
    requests: queue.Queue[pb.PredictRequest | None] = queue.Queue()

    def feed():
        while (r := requests.get()) is not None:
            yield r

    responses = gw.predict.PredictStream(feed(), timeout=30)
    requests.put(pb.PredictRequest(model=model, request_id="open-1", dense=[0.1, 0.2, 0.3, 0.4]))
    assert next(responses).request_id == "open-1"
    assert inflight("PredictStream") == 1  # open, between messages
    requests.put(None)
    assert list(responses) == []
    assert settles_at_zero("PredictStream")


def test_readme_metrics_table_lists_every_exported_metric(live) -> None:
    gw, _ = live
    documented = set(re.findall(r"^\| `(chimera_[a-z_]+)` \|", README.read_text(), flags=re.M))
    missing = exported_names(gw) - documented
    assert not missing, f"README metrics table lacks {sorted(missing)}"
