"""The promotion gate through the real surfaces: the Promote RPC of a live gateway, `chimera promote`,
and the rollout controller the gateway runs, all refusing to ship a version without a recent passing
load test unless forced (and audited); plus `chimera serve` / CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S
reaching the gate.

The gateway is configured with a 10 min maximum age, so a run that is 20 min old (good under the
24 h default) proving refused shows the configured value is the one enforced. Load-test runs are
stored the way `chimera loadtest` stores them (loadtest.command.store_run); a run of a given age is
stored with record_load_test(created_at=...), the call store_run makes."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.settings import DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S, Settings
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from loadtest.command import store_run
from registry import Registry
from registry.errors import PreconditionFailed
from registry.loadtests import list_load_tests, record_load_test
from registry.models import utcnow
from registry.rollouts import decisions
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_MD, ADMIN_TOKEN, GatewayThread, small_onnx

MAX_AGE_S = 600.0  # the gateway under test: a passing run counts for 10 min
runner = CliRunner()


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            ray_cluster: None):  # a parameter, not getfixturevalue: the Ray group sees it (tests/conftest.py)
    """One registry and one live gateway per backend (deploying replicas costs seconds). The controller
    loop is off: the tests call the gateway's own controller one look at a time."""
    tmp = tmp_path_factory.mktemp("promote-" + request.param)
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    gw = GatewayThread(url, tmp, controller_interval_s=0.0, promotion_loadtest_max_age_s=MAX_AGE_S).start()
    yield gw, reg
    gw.stop()
    reg.dispose()


@pytest.fixture
def canary(backend) -> Iterator[tuple[GatewayThread, Registry, str]]:
    """A fresh model: v1 in production at 90 %, v2 a canary at 10 %."""
    gw, reg = backend
    model = "pr" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2)
    reg.publish_version(model, b1, names, status="production")
    reg.publish_version(model, b2, names, status="canary")
    reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test", reason="start canary")
    yield gw, reg, model


def wait_served(gw: GatewayThread, model: str, timeout: float = 120.0) -> None:
    """Until the gateway has picked the new model up (SQLite: by polling) and scores it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            gw.predict.Predict(pb.PredictRequest(model=model, dense=[0.1, 0.2, 0.3, 0.4]), timeout=60)
            return
        except grpc.RpcError as exc:
            # NOT_FOUND until the model is seen; FAILED_PRECONDITION while its split is not (PostgreSQL
            # announces the published version and the split separately)
            pending = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            if exc.code() not in pending or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def state(reg: Registry, model: str) -> dict[str, Any]:
    """Everything a promotion changes: split (revision, weights), version statuses, audit and decisions."""
    info = reg.get_model(model)
    return {"revision": info.split.revision, "weights": dict(info.split.weights),
            "status": {v.version: v.status for v in info.versions}, "audit": len(reg.audit_log(model)),
            "decisions": len(decisions(reg, model))}


def store_passing_run(reg: Registry, model: str, version: int) -> int:
    """A passing run stored exactly as `chimera loadtest` stores one (loadtest.command.store_run)."""
    report = {"model": model, "version": version, "target": "127.0.0.1:50051", "passed": True, "failures": [],
              "slo": {"p99_ms": 50.0, "max_error_rate": 0.01}, "target_rps": 200.0}
    return store_run(reg.url, report, version)


def promote(gw: GatewayThread, model: str, version: int, force: bool = False) -> rpb.TrafficSplit:
    request = rpb.PromoteRequest(model=model, version=version, force=force)
    return gw.rollout.Promote(request, metadata=ADMIN_MD, timeout=30)


def refused(gw: GatewayThread, model: str, version: int) -> str:
    """Promote, expect FAILED_PRECONDITION, return the message."""
    with pytest.raises(grpc.RpcError) as err:
        promote(gw, model, version)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    return err.value.details()


# ---------------------------------------------------------------- the Promote RPC
def test_promote_without_a_passing_run_is_refused_and_changes_nothing(canary) -> None:
    gw, reg, model = canary
    before = state(reg, model)
    how = f"run `chimera loadtest --model {model} --version 2 --rps R --duration S --slo-p99-ms X`"
    msg = refused(gw, model, 2)
    assert msg.startswith(f"{model} v2 needs a passing load test within 10 min: no load test recorded; ")
    assert how in msg
    assert state(reg, model) == before
    # Runs that do not count: a failing run of v2, passing runs of v1 and of the routed mix (version 0).
    record_load_test(reg, model, 2, target="gw:1", passed=False, failures=["p99 latency 80 ms exceeds 50 ms"])
    store_passing_run(reg, model, 1)
    store_passing_run(reg, model, 0)
    msg = refused(gw, model, 2)
    assert "the latest run" in msg and "failed: p99 latency 80 ms exceeds 50 ms" in msg and how in msg
    assert state(reg, model) == before


def test_promote_with_a_passing_run_younger_than_the_max_age(canary) -> None:
    gw, reg, model = canary
    before = state(reg, model)
    # 5 min old: inside the configured 10 min
    record_load_test(reg, model, 2, target="gw:1", passed=True, slo={"p99_ms": 50.0},
                     report={"target_rps": 200.0}, created_at=utcnow() - timedelta(minutes=5))
    split = promote(gw, model, 2)
    assert {w.version: w.weight for w in split.weights} == {2: 100}
    assert split.revision == before["revision"] + 1
    after = state(reg, model)
    assert after["weights"] == {2: 100} and after["revision"] == split.revision
    assert after["status"] == {1: "standby", 2: "production"}
    audit = reg.audit_log(model)[-1]
    assert audit["forced"] is False and audit["actor"] == "admin" and audit["new"] == {"2": 100}
    decision = decisions(reg, model, limit=1)[0]
    assert decision["action"] == "manual_promote" and decision["canary_version"] == 2
    assert decision["details"] == {"actor": "admin", "forced": False}


def test_a_run_stored_by_the_load_tester_just_now_allows_promotion(canary) -> None:
    gw, reg, model = canary
    record_id = store_passing_run(reg, model, 2)
    assert list_load_tests(reg, model, 2)[0].id == record_id
    assert {w.version: w.weight for w in promote(gw, model, 2).weights} == {2: 100}
    assert reg.get_version(model, 2).status == "production"


def test_a_run_older_than_the_configured_max_age_is_refused(canary) -> None:
    gw, reg, model = canary
    before = state(reg, model)
    stale = record_load_test(reg, model, 2, target="gw:1", passed=True, slo={"p99_ms": 50.0},
                             report={"target_rps": 200.0}, created_at=utcnow() - timedelta(minutes=20))
    msg = refused(gw, model, 2)
    # 20 min would pass the 24 h default: the gateway enforces its configured 10 min
    assert f"within 10 min: the latest passing run (#{stale.id}) is 20 min old" in msg
    assert state(reg, model) == before


def test_forced_promote_without_a_run_succeeds_and_is_audited_as_forced(canary) -> None:
    gw, reg, model = canary
    before = state(reg, model)
    assert list_load_tests(reg, model) == []
    split = promote(gw, model, 2, force=True)
    assert {w.version: w.weight for w in split.weights} == {2: 100}
    after = state(reg, model)
    assert after["status"] == {1: "standby", 2: "production"} and after["audit"] == before["audit"] + 1
    audit = reg.audit_log(model)[-1]
    assert audit["forced"] is True and audit["actor"] == "admin" and "(forced)" in audit["reason"]
    assert audit["old"] == {"1": 90, "2": 10} and audit["new"] == {"2": 100}
    decision = decisions(reg, model, limit=1)[0]
    assert decision["action"] == "manual_promote" and decision["details"]["forced"] is True


# ---------------------------------------------------------------- `chimera promote`
def cli(args: list[str], reg: Registry, **env: str) -> tuple[int, str]:
    base = {"COLUMNS": "200", "CHIMERA_REGISTRY_URL": reg.url, "CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN,
            "CHIMERA_ACTOR": "release-bot", "CHIMERA_TLS_CA": ""}
    res = runner.invoke(app, args, env={**base, **env})
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, flat(res.output)


def test_cli_promote_is_refused_without_a_run_then_succeeds_with_force(canary) -> None:
    gw, reg, model = canary
    before = state(reg, model)
    target = ["--target", f"127.0.0.1:{gw.port}"]
    code, out = cli(["promote", model, "--version", "2", *target], reg)
    assert code == 1, out
    assert f"error: FAILED_PRECONDITION: {model} v2 needs a passing load test within 10 min: " in out
    assert "no load test recorded" in out and f"chimera loadtest --model {model} --version 2" in out
    assert "or skip the gate with --force (recorded as forced in the audit log)" in out
    assert state(reg, model) == before
    code, out = cli(["promote", model, "--version", "2", "--force", "--reason", "hotfix", *target], reg)
    assert code == 0, out
    assert f"{model}: v2 promoted without the load-test gate (forced, audited)" in out
    audit = reg.audit_log(model)[-1]
    assert audit == {**audit, "actor": "release-bot", "forced": True, "reason": "hotfix", "new": {"2": 100}}
    assert state(reg, model)["status"] == {1: "standby", 2: "production"}


def test_cli_loadtest_of_the_canary_then_cli_promote(canary, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The release flow the refusal message asks for: `chimera loadtest --version 2` through the
    gateway stores a passing run, after which `chimera promote` (no --force) goes through."""
    gw, reg, model = canary
    monkeypatch.chdir(tmp_path)  # no ./chimera.db to fall back on
    wait_served(gw, model)
    target = ["--target", f"127.0.0.1:{gw.port}"]
    code, out = cli(["loadtest", "--model", model, "--version", "2", "--rps", "20", "--duration", "1",
                     "--warmup", "0", "--min-achieved-ratio", "0", "--slo-p99-ms", "60000",
                     "--registry-url", reg.url, *target], reg)
    assert code == 0, out
    assert f"of {model} v2" in out and "stored as load test #" in out
    code, out = cli(["promote", model, "--version", "2", *target], reg)
    assert code == 0, out
    assert f"{model}: v2 promoted (split revision" in out
    audit = reg.audit_log(model)[-1]
    assert audit["forced"] is False and audit["actor"] == "release-bot" and audit["new"] == {"2": 100}


# ---------------------------------------------------------------- the rollout controller's gate
def _feed(gw: GatewayThread, reg: Registry, model: str, rng: np.random.Generator, n: int = 400) -> None:
    """n routed rows through PredictBatch (logged by the gateway), then a binary outcome per row
    through RecordOutcomes: v2 wins clearly (0.65 vs 0.45)."""
    x = rng.normal(size=(n, 4)).astype(np.float32)
    resp = gw.predict.PredictBatch(pb.PredictBatchRequest(
        model=model, matrix=pb.DenseMatrix(f32=x.astype("<f4").tobytes(), cols=4)), timeout=60)
    p = {1: 0.45, 2: 0.65}
    outcomes = [pb.RecordOutcomeRequest(request_id=rid, value=float(rng.random() < p[v]))
                for rid, v in zip(resp.request_ids, resp.versions, strict=True)]
    statuses = gw.predict.RecordOutcomes(pb.RecordOutcomesRequest(outcomes=outcomes), timeout=120).statuses
    assert all(s.code == 0 for s in statuses), [s.message for s in statuses if s.code][:3]


def _look_until(gw: GatewayThread, reg: Registry, model: str, rng: np.random.Generator, done,  # noqa: ANN001
                rounds: int = 20):  # noqa: ANN202
    """Feed, let the gateway's own controller look, until `done(decision)`; returns that decision."""
    for _ in range(rounds):
        _feed(gw, reg, model, rng)
        d = gw.gateway.controller.run_once(model)
        assert d is None or d.action in ("hold", "promote"), (d.action, d.reason)
        if d is not None and done(d):
            return d
    raise AssertionError(f"no such decision after {rounds} rounds: {decisions(reg, model, limit=3)}")


def _blocked(d) -> bool:  # noqa: ANN001
    return d.action == "hold" and d.reason.startswith("promotion blocked: ")


def test_controller_holds_a_winning_canary_without_a_run_and_promotes_it_with_one(backend) -> None:
    gw, reg = backend
    assert gw.gateway.controller.promotion_gate is not None  # built by rollout.controller.loadtest_gate
    model = "ctl" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2)
    reg.publish_version(model, b1, names, status="production")
    reg.publish_version(model, b2, names, status="canary")
    # One step from 50 % to 100 %: the first confident verdict is "promote". The latency guardrail is
    # relaxed: this test is about the gate, and p99s on two busy cores are not ours to control.
    reg.set_rollout_config(model, {"steps": [50, 100], "min_samples_per_arm": 100,
                                   "min_canary_samples_per_step": 100, "max_slow_share_delta": 1.0})
    reg.set_split(model, {1: 50, 2: 50}, expected_revision=0, actor="test", reason="start canary")
    rng = np.random.default_rng(8)
    wait_served(gw, model)

    # No run at all: the verdict is kept as evidence, the split is not touched.
    d = _look_until(gw, reg, model, rng, _blocked)
    assert f"{model} v2 needs a passing load test within 10 min: no load test recorded" in d.reason
    stored = decisions(reg, model, limit=1)[0]
    assert stored["action"] == "hold" and stored["reason"] == d.reason and stored["weight_after"] == 50
    assert stored["p_value"] is not None and stored["p_value"] <= 0.05  # the evidence is kept
    held = state(reg, model)
    assert held["weights"] == {1: 50, 2: 50} and held["status"] == {1: "production", 2: "canary"}
    assert reg.audit_log(model)[-1]["actor"] == "test"

    # A passing run older than the gateway's 10 min still blocks.
    stale = record_load_test(reg, model, 2, target="gw:1", passed=True, report={"target_rps": 200.0},
                             created_at=utcnow() - timedelta(minutes=20))
    d = _look_until(gw, reg, model, rng, _blocked)
    assert f"the latest passing run (#{stale.id}) is 20 min old" in d.reason
    assert state(reg, model)["weights"] == {1: 50, 2: 50}

    # A fresh passing run: the next look with new data promotes.
    store_passing_run(reg, model, 2)
    d = _look_until(gw, reg, model, rng, lambda d: d.action == "promote")
    final = state(reg, model)
    assert final["weights"] == {2: 100} and final["status"] == {1: "standby", 2: "production"}
    audit = reg.audit_log(model)[-1]
    assert audit["actor"] == "rollout-controller" and audit["forced"] is False
    assert audit["new"] == {"2": 100} and audit["reason"].startswith("promote: ")
    assert decisions(reg, model, limit=1)[0]["action"] == "promote"


# ---------------------------------------------------------------- configuring the maximum age
def test_max_age_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S"
    monkeypatch.delenv(name, raising=False)
    assert Settings.from_env().promotion_loadtest_max_age_s == DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S == 86400
    for text, seconds in (("3600", 3600.0), (" 90.5 ", 90.5), ("", 86400.0)):
        monkeypatch.setenv(name, text)
        assert Settings.from_env().promotion_loadtest_max_age_s == seconds
    # No value turns the gate off (that is what an audited --force is for); bad values fail at start-up.
    for bad in ("0", "-5", "none", "off", "1h", "inf", "nan"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}: .* is not a positive number of seconds"):
            Settings.from_env()


class _Captured:
    """`chimera serve` up to the GatewayConfig it builds: Ray and the serving loop are replaced, the
    rest (settings, options, registry upgrade) is the real command."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.configs: list[Any] = []

        async def serve_forever(config) -> None:  # noqa: ANN001
            self.configs.append(config)

        monkeypatch.setattr("gateway.server.serve_forever", serve_forever)
        monkeypatch.setattr("gateway.server.ensure_ray", lambda *a, **k: None)


def test_chimera_serve_passes_the_max_age_to_the_gateway_gate(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    captured = _Captured(monkeypatch)
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    env = {"CHIMERA_REGISTRY_URL": url, "CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200",
           "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S": "", "CHIMERA_LOG_FEATURES_SAMPLE": ""}
    serve = ["serve", "--loop", "asyncio", "--port", "0", "--metrics-port", "0"]

    def run(args: list[str], **extra: str) -> tuple[int, str]:
        res = runner.invoke(app, [*serve, *args], env={**env, **extra})
        if res.exception and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, flat(res.output)

    assert run([])[0] == 0
    assert captured.configs[-1].promotion_loadtest_max_age_s == 86400.0
    assert run([], CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S="1800")[0] == 0
    assert captured.configs[-1].promotion_loadtest_max_age_s == 1800.0
    assert run(["--promotion-loadtest-max-age", "600"], CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S="1800")[0] == 0
    config = captured.configs[-1]
    assert config.promotion_loadtest_max_age_s == 600.0  # the option wins over the environment

    code, out = run(["--promotion-loadtest-max-age", "0"])
    assert code == 2 and "--promotion-loadtest-max-age: 0.0 is not a positive number of seconds" in out
    code, out = run([], CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S="none")
    assert code == 2 and "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S: 'none' is not a positive number" in out
    assert len(captured.configs) == 3

    # The gate the gateway builds from that config: 20 min is too old under 600 s, 5 min is not.
    from gateway.server import Gateway

    reg = Registry(url)
    model = "sv" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx()
    reg.publish_version(model, onnx, names)
    record_load_test(reg, model, 1, target="gw", passed=True, created_at=utcnow() - timedelta(minutes=20))
    gateway = Gateway(dataclasses.replace(config, spill_dir=tmp_path / "spill"))
    try:
        gate = gateway.controller.promotion_gate
        with pytest.raises(PreconditionFailed, match="within 10 min: the latest passing run .* 20 min old"):
            gate(reg, model, 1)
        record_load_test(reg, model, 1, target="gw", passed=True, created_at=utcnow() - timedelta(minutes=5))
        gate(reg, model, 1)
    finally:
        gateway.registry.dispose()
        reg.dispose()
