"""ONNX integrity: what scores is exactly what was published. A tampered artifact is refused by the
replica, the version is marked failed, and traffic stays on the baseline."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from chimera.v1 import prediction_pb2 as pb
from registry import Registry, ValidationError
from registry.repository import MAX_MODEL_BYTES
from replicas.scorer import IntegrityError, OnnxScorer
from tests.harness import GatewayThread, small_onnx


def test_scorer_refuses_bytes_that_do_not_match_their_sha256() -> None:
    onnx, _ = small_onnx()
    OnnxScorer(onnx, hashlib.sha256(onnx).hexdigest())
    tampered = onnx[:-1] + bytes([onnx[-1] ^ 1])
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        OnnxScorer(tampered, hashlib.sha256(onnx).hexdigest())


def test_model_size_limit(registry: Registry) -> None:
    with pytest.raises(ValidationError, match="limit"):
        registry.publish_version("big", b"\0" * (MAX_MODEL_BYTES + 1), ["a"])


@pytest.mark.usefixtures("ray_cluster")
def test_tampered_canary_is_failed_and_traffic_stays_on_baseline(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "tamper" + uuid.uuid4().hex[:6]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    reg.publish_version(model, b1, names, status="production")
    reg.publish_version(model, b2, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()
    try:
        # Someone alters v2's bytes in the database after publication (the recorded hash stays).
        with reg.engine.begin() as conn:
            conn.execute(
                text("UPDATE model_versions SET onnx = :b WHERE version = 2"), {"b": b2[:-1] + b"\x00"}
            )
        reg.set_split(model, {1: 90, 2: 10}, expected_revision=1, actor="op", reason="canary v2")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and reg.get_version(model, 2).status != "failed":
            time.sleep(0.5)
        assert reg.get_version(model, 2).status == "failed"
        assert dict(reg.get_split(model).weights) == {1: 100}
        audit = reg.audit_log(model)[-1]
        assert audit["actor"] == "gateway" and "v2 failed to start" in audit["reason"]
        versions = {
            gw.predict.Predict(
                pb.PredictRequest(model=model, routing_key=f"k{i}", dense=[1, 2, 3, 4]), timeout=10
            ).version
            for i in range(200)
        }
        assert versions == {1}
    finally:
        gw.stop()
        reg.dispose()
