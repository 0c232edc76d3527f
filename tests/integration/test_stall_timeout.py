"""CHIMERA_REPLICA_STALL_TIMEOUT_S: how long a scoring call may go unanswered before it fails UNAVAILABLE
and its version is marked down (so its rows fail over). It counts the queueing at the replica too, so a
model whose calls are slow under load needs it raised; until it is, every call fails with a message that
says how long the gateway waited (chimera.settings.GatewaySettings)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from chimera.settings import DEFAULT_REPLICA_STALL_TIMEOUT_S, Settings
from chimera.v1 import prediction_pb2 as pb
from gateway.config import GatewayConfig
from gateway.serving.replica_pool import BatchConfig
from tests.harness import GatewayThread, served_model, slow_onnx


def test_the_stall_timeout_is_read_from_the_environment_and_bad_values_name_the_variable() -> None:
    assert Settings.from_env({}).gateway.replica_stall_timeout_s == DEFAULT_REPLICA_STALL_TIMEOUT_S == 3.0
    assert GatewayConfig.from_settings(Settings.from_env({})).batch == BatchConfig()
    config = GatewayConfig.from_settings(Settings.from_env({"CHIMERA_REPLICA_STALL_TIMEOUT_S": "10",
                                                            "CHIMERA_LOCAL_REPLICA_CHANNEL": "0"}))
    assert (config.batch.stall_timeout_s, config.batch.local_channel) == (10.0, False)
    for bad in ("0", "-1", "nan", "inf", "31", "soon"):  # 31: over the 30 s call timeout that bounds it
        with pytest.raises(ValueError, match="^CHIMERA_REPLICA_STALL_TIMEOUT_S: "):
            Settings.from_env({"CHIMERA_REPLICA_STALL_TIMEOUT_S": bad})


@pytest.mark.usefixtures("ray_cluster")
def test_a_model_slower_than_the_stall_timeout_fails_unavailable_until_the_timeout_is_raised(
        tmp_path: Path) -> None:
    # ~0.13 s of replica CPU a call (two 1300 x 1300 matrix products); scores a constant 0.5.
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg, model, _ = served_model(url, "stall", onnx=slow_onnx(1300))
    row = pb.PredictRequest(model=model, dense=[0.1, 0.2, 0.3, 0.4])
    try:
        short = GatewayThread(url, tmp_path, controller_interval_s=0,
                              batch=BatchConfig(stall_timeout_s=0.05)).start()
        try:
            with pytest.raises(grpc.RpcError) as err:
                short.predict.Predict(row, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no answer within 0.05 s" in (err.value.details() or ""), err.value.details()
            assert short.gateway is not None and short.gateway.version_health.is_down(model, 1)
        finally:
            short.stop(undeploy=False)  # the next gateway adopts the running version
        raised = GatewayThread(url, tmp_path, controller_interval_s=0,
                               batch=BatchConfig(stall_timeout_s=2.0)).start()
        try:
            scores = [raised.predict.Predict(row, timeout=10).score for _ in range(5)]
            assert scores == pytest.approx([0.5] * 5)
        finally:
            raised.stop()
    finally:
        reg.dispose()
