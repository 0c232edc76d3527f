"""TLS and mutual TLS on the gateway, with certificates generated here; the CLI and the load tester
dial with the same settings (CHIMERA_TLS_* environment). Server-only TLS (a server certificate, no
client CA): any client that trusts the gateway's CA is served, with or without a certificate of its own;
plaintext and clients trusting another CA are refused."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from chimera.client import ClientTLS, channel
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from registry import Registry
from tests.certs import make_certs
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def mtls_gateway(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tls")
    certs = make_certs(tmp / "certs")
    url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "tls" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=3)
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp, tls_cert=certs.server_cert, tls_key=certs.server_key,
                       tls_client_ca=certs.ca, controller_interval_s=0).start()
    yield gw, certs, model, url
    gw.stop()
    reg.dispose()


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory):
    """Server-only TLS: tls_cert + tls_key, no tls_client_ca (so client certificates are not asked for)."""
    tmp = tmp_path_factory.mktemp("server-tls")
    certs = make_certs(tmp / "certs")
    url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "stls" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=4)
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp, tls_cert=certs.server_cert, tls_key=certs.server_key,
                       controller_interval_s=0).start()
    yield gw, certs, model
    gw.stop()
    reg.dispose()


def _predict(ch: grpc.Channel, model: str) -> pb.PredictResponse:
    return pb_grpc.PredictionServiceStub(ch).Predict(pb.PredictRequest(model=model, dense=[1, 2, 3, 4]),
                                                     timeout=10)


def test_mutual_tls_client_is_served(mtls_gateway) -> None:
    gw, certs, model, _ = mtls_gateway
    tls = ClientTLS(certs.ca, certs.client_cert, certs.client_key)
    with channel(f"localhost:{gw.port}", tls=tls) as ch:
        assert _predict(ch, model).version == 1


@pytest.mark.parametrize("kind", ["plaintext", "tls-without-client-cert", "untrusted-server-ca"])
def test_clients_without_the_right_credentials_are_refused(mtls_gateway, kind: str) -> None:
    gw, certs, model, _ = mtls_gateway
    if kind == "plaintext":
        ch = grpc.insecure_channel(f"localhost:{gw.port}")
    elif kind == "tls-without-client-cert":
        ch = channel(f"localhost:{gw.port}", tls=ClientTLS(certs.ca))
    else:
        wrong_ca = ClientTLS(certs.other_ca, certs.client_cert, certs.client_key)
        ch = channel(f"localhost:{gw.port}", tls=wrong_ca)
    with ch, pytest.raises(grpc.RpcError) as err:
        _predict(ch, model)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("kind", ["ca-only", "with-client-cert"])
def test_server_tls_serves_clients_that_trust_its_ca(tls_gateway, kind: str) -> None:
    gw, certs, model = tls_gateway
    tls = ClientTLS(certs.ca)
    if kind == "with-client-cert":  # not asked for, so harmless
        tls = ClientTLS(certs.ca, certs.client_cert, certs.client_key)
    with channel(f"localhost:{gw.port}", tls=tls) as ch:
        assert _predict(ch, model).version == 1
    # The server name is checked against the certificate: 127.0.0.1 is in its SANs too.
    with channel(f"127.0.0.1:{gw.port}", tls=ClientTLS(certs.ca)) as ch:
        assert _predict(ch, model).version == 1


@pytest.mark.parametrize("kind", ["plaintext", "untrusted-server-ca"])
def test_server_tls_refuses_plaintext_and_untrusting_clients(tls_gateway, kind: str) -> None:
    gw, certs, model = tls_gateway
    if kind == "plaintext":
        ch = grpc.insecure_channel(f"localhost:{gw.port}")
    else:
        ch = channel(f"localhost:{gw.port}", tls=ClientTLS(certs.other_ca))
    with ch, pytest.raises(grpc.RpcError) as err:
        _predict(ch, model)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The refusals cost the gateway nothing: a trusting client is still served.
    with channel(f"localhost:{gw.port}", tls=ClientTLS(certs.ca)) as ok:
        assert _predict(ok, model).version == 1


def test_cli_and_loadtest_use_the_same_tls_settings(mtls_gateway, tmp_path: Path, monkeypatch) -> None:
    from chimera.cli import app

    gw, certs, model, url = mtls_gateway
    env = {"CHIMERA_TLS_CA": str(certs.ca), "CHIMERA_TLS_CLIENT_CERT": str(certs.client_cert),
           "CHIMERA_TLS_CLIENT_KEY": str(certs.client_key), "CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN,
           "CHIMERA_REGISTRY_URL": url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    status = runner.invoke(app, ["rollout", "status", model, "--target", f"localhost:{gw.port}"])
    assert status.exit_code == 0, status.output
    assert model in status.output and "split revision 1" in status.output
    report = tmp_path / "lt.json"
    lt = runner.invoke(app, ["loadtest", "--target", f"localhost:{gw.port}", "--model", model, "--rps", "20",
                             "--duration", "2", "--warmup", "0.5", "--no-store", "--report", str(report),
                             "--max-error-rate", "0"])
    assert lt.exit_code == 0, lt.output
    assert report.exists()
    monkeypatch.delenv("CHIMERA_TLS_CLIENT_CERT")
    half = runner.invoke(app, ["rollout", "status", model, "--target", f"localhost:{gw.port}"])
    assert half.exit_code != 0 and "give both or neither" in str(half.exception)
    monkeypatch.delenv("CHIMERA_TLS_CLIENT_KEY")
    refused = runner.invoke(app, ["rollout", "status", model, "--target", f"localhost:{gw.port}"])
    assert refused.exit_code != 0 and "UNAVAILABLE" in refused.output
