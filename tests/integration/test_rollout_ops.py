"""Operator rollout actions through a live gateway (real Ray Serve replicas, SQLite and PostgreSQL
registries): Rollback (of a canary, and the instant rollback to the standby after a promotion),
SetShadow, GetRolloutStatus, a gateway without an admin token, per-item RecordOutcomes statuses, and a
newly weighted version taking traffic under load without a single failed request. Each RPC is also
driven through the `chimera` command line where it has a command.

One registry and one gateway per backend for the whole module (deploying replicas costs seconds); each
test uses its own model. The gateway's rollout controller loop is off so nothing moves a split behind a
test's back; the status test takes one controller look explicitly."""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from chimera.cli import app
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from gateway.background import BackgroundGateway
from gateway.server import GatewayConfig
from registry import Registry
from registry.models import Outcome, ShadowPrediction
from registry.rollouts import decisions
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_MD, ADMIN_TOKEN, GatewayThread, replica_pids, small_onnx, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")
runner = CliRunner()
ROW = [0.5, 0.1, 0.2, 0.3]


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One registry and one live gateway (controller loop off) per backend."""
    tmp = tmp_path_factory.mktemp("rollout-ops-" + request.param)
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    gw = GatewayThread(url, tmp, controller_interval_s=0.0).start()
    yield gw, reg
    gw.stop()
    reg.dispose()


def synced(gw: GatewayThread, model: str, revision: int, timeout: float = 120.0) -> None:
    """Until the gateway routes by `revision` of the model's split (its replicas are deployed first)."""
    g = gw.gateway
    wait_for(lambda: g.catalog.revisions().get(model, (0, 0))[0] >= revision, timeout,
             f"{model} split revision {revision} at the gateway")


def new_model(gw: GatewayThread, reg: Registry, weights: dict[int, int], versions: int = 2,
              statuses: dict[int, str] | None = None, metric: str = "success_rate") -> str:
    """A fresh model with `versions` versions (v1 production, the others canary unless told), the given
    split, and the gateway already serving it."""
    model = "ro" + uuid.uuid4().hex[:8]
    statuses = statuses or {}
    for v in range(1, versions + 1):
        data, names = small_onnx(seed=v, flip=v % 2 == 0)
        reg.publish_version(model, data, names, metric=metric,
                            status=statuses.get(v, "production" if v == 1 else "canary"))
    split = reg.set_split(model, weights, expected_revision=0, actor="test", reason="setup")
    synced(gw, model, split.revision)
    return model


def predict(gw: GatewayThread, model: str, key: str = "", request_id: str = "") -> pb.PredictResponse:
    return gw.predict.Predict(pb.PredictRequest(model=model, routing_key=key, request_id=request_id,
                                                dense=ROW), timeout=30)


def admin_md(actor: str) -> tuple[tuple[str, str], ...]:
    return (*ADMIN_MD, ("x-chimera-actor", actor))


def cli(gw: GatewayThread, *args: str, actor: str = "cli-operator", token: str | None = ADMIN_TOKEN):
    env = {"CHIMERA_ADMIN_TOKEN": token, "CHIMERA_ACTOR": actor}
    return runner.invoke(app, [*args, "--target", f"127.0.0.1:{gw.port}"], env=env)


def statuses(reg: Registry, model: str) -> dict[int, str]:
    return {v.version: v.status for v in reg.list_versions(model)}


def split_of(s: rpb.TrafficSplit) -> dict[int, int]:
    return {w.version: w.weight for w in s.weights}


# ---------------------------------------------------------------- Rollback
PROPAGATION_S = 1.0  # "split changes reach every gateway within a second" (ARCHITECTURE.md)


def all_on(gw: GatewayThread, model: str, keys: list[str], version: int,
           within: float = PROPAGATION_S) -> float:
    """Seconds until Predicts of every key land on `version` (fails after `within` seconds)."""
    t0 = time.monotonic()
    while True:
        got = [predict(gw, model, k).version for k in keys]
        if got == [version] * len(keys):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"after {within}s still not all on v{version}: {got}"
        time.sleep(0.01)


def test_rollback_is_in_effect_on_the_answering_gateway_when_the_rpc_returns(backend) -> None:
    gw, reg = backend
    model = new_model(gw, reg, {1: 90, 2: 10})
    on_canary = [k for k in (f"user-{i}" for i in range(200)) if predict(gw, model, k).version == 2]
    assert on_canary
    gw.rollout.Rollback(rpb.RollbackRequest(model=model, reason="now"), metadata=ADMIN_MD, timeout=30)
    after = [predict(gw, model, k).version for k in on_canary]
    assert after == [1] * len(on_canary), f"still on the canary after Rollback returned: {after}"

def test_rollback_rpc_takes_a_canary_back_to_the_baseline_at_once(backend) -> None:
    gw, reg = backend
    model = new_model(gw, reg, {1: 90, 2: 10})
    revision = reg.get_split(model).revision
    keys = [f"user-{i}" for i in range(300)]
    on_canary = [k for k in keys if predict(gw, model, k).version == 2]
    assert 10 <= len(on_canary) <= 60, len(on_canary)  # ~10 % of 300 keys

    t0 = time.perf_counter()
    out = gw.rollout.Rollback(rpb.RollbackRequest(model=model, reason="p99 regression on v2"),
                              metadata=admin_md("alice"), timeout=30)
    took = time.perf_counter() - t0
    assert out.model == model and split_of(out) == {1: 100} and out.revision == revision + 1
    assert took < 5.0, f"Rollback took {took:.2f}s"

    # Every key that was on the canary is on the baseline within the propagation bound, and stays there.
    lag = all_on(gw, model, on_canary, 1)
    assert [predict(gw, model, k).version for k in on_canary] == [1] * len(on_canary)
    print(f"\nRollback returned in {took * 1e3:.0f} ms; canary keys all on v1 {lag * 1e3:.0f} ms later")

    assert statuses(reg, model) == {1: "production", 2: "rolled_back"}
    audit = reg.audit_log(model)[-1]
    assert (audit["actor"], audit["reason"]) == ("alice", "p99 regression on v2")
    assert audit["revision"] == revision + 1
    assert audit["old"] == {"1": 90, "2": 10} and audit["new"] == {"1": 100} and not audit["forced"]
    d = decisions(reg, model, limit=1)[0]
    assert (d["action"], d["baseline_version"], d["canary_version"]) == ("manual_rollback", 1, 2)
    assert (d["weight_before"], d["weight_after"]) == (10, 0)
    assert d["details"]["actor"] == "alice" and d["reason"] == "p99 regression on v2"
    st = gw.rollout.GetRolloutStatus(rpb.GetRolloutStatusRequest(model=model), metadata=ADMIN_MD, timeout=30)
    assert st.decisions[0].action == "manual_rollback" and st.revision == revision + 1

    # Nothing left to roll back to (no canary, no standby): a clear INVALID_ARGUMENT, nothing changes.
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.Rollback(rpb.RollbackRequest(model=model), metadata=ADMIN_MD, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nothing to roll back to" in err.value.details(), err.value.details()
    assert reg.get_split(model).revision == revision + 1
    # An unknown model: NOT_FOUND naming it.
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.Rollback(rpb.RollbackRequest(model="no-such-model"), metadata=ADMIN_MD, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()


def test_cli_rollback_after_a_promotion_returns_to_the_standby_replicas(backend) -> None:
    """Instant rollback: the previous production version stays deployed as standby after a promotion,
    so `chimera rollback` moves traffic back without deploying anything (same replica processes)."""
    gw, reg = backend
    model = new_model(gw, reg, {1: 90, 2: 10})
    pids = {v: replica_pids(model, v) for v in (1, 2)}
    assert pids[1] and pids[2], pids
    promoted = gw.rollout.Promote(rpb.PromoteRequest(model=model, version=2, force=True, reason="setup"),
                                  metadata=ADMIN_MD, timeout=30)
    assert split_of(promoted) == {2: 100}
    assert statuses(reg, model) == {1: "standby", 2: "production"}
    synced(gw, model, promoted.revision)
    assert {predict(gw, model, f"k{i}").version for i in range(30)} == {2}

    # Without the admin token the CLI refuses before calling anything.
    res = cli(gw, "rollback", model, token=None)
    assert res.exit_code != 0 and "CHIMERA_ADMIN_TOKEN" in res.output, res.output
    assert reg.get_split(model).revision == promoted.revision

    t0 = time.perf_counter()
    res = cli(gw, "rollback", model, "--reason", "v2 misbehaves in prod", actor="bob")
    took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert f"split revision {promoted.revision + 1}" in flat(res.output), res.output
    assert "v1=100%" in res.output, res.output
    assert took < 5.0, f"chimera rollback took {took:.2f}s"
    assert reg.get_split(model).weights == {1: 100}
    assert statuses(reg, model) == {1: "production", 2: "rolled_back"}
    all_on(gw, model, [f"k{i}" for i in range(30)], 1)
    # No redeploy: the standby's replica processes are the ones that served before the promotion.
    assert replica_pids(model, 1) == pids[1]
    audit = reg.audit_log(model)[-1]
    assert (audit["actor"], audit["reason"]) == ("bob", "v2 misbehaves in prod")
    assert audit["old"] == {"2": 100} and audit["new"] == {"1": 100}
    d = decisions(reg, model, limit=1)[0]
    assert (d["action"], d["baseline_version"], d["canary_version"], d["details"]["actor"]) == \
        ("manual_rollback", 1, 2, "bob")

    # A second rollback has nowhere to go: the CLI says why and exits non-zero.
    res = cli(gw, "rollback", model)
    assert res.exit_code == 1 and "INVALID_ARGUMENT" in res.output
    assert "nothing to roll back to" in flat(res.output), res.output


# ---------------------------------------------------------------- SetShadow
def shadow_row(reg: Registry, request_id: str) -> tuple[int, float] | None:
    with reg.engine.connect() as c:
        row = c.execute(select(ShadowPrediction.version, ShadowPrediction.score)
                        .where(ShadowPrediction.request_id == request_id)).first()
    return None if row is None else (row[0], row[1])


def test_set_shadow_by_cli_and_rpc_mirrors_then_stops(backend) -> None:
    gw, reg = backend
    model = new_model(gw, reg, {1: 100}, statuses={2: "staged"})
    rev = reg.get_split(model).revision
    audits = len(reg.audit_log(model))

    # An unknown version: INVALID_ARGUMENT naming the field; nothing changes.
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.SetShadow(rpb.SetShadowRequest(model=model, version=9), metadata=ADMIN_MD, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("version:") and "9" in err.value.details(), err.value.details()
    res = cli(gw, "canary", "shadow", model, "--version", "9")
    assert res.exit_code == 1 and "INVALID_ARGUMENT" in res.output and "version" in res.output, res.output
    with pytest.raises(grpc.RpcError) as err:
        gw.rollout.SetShadow(rpb.SetShadowRequest(model="no-such-model", version=1), metadata=ADMIN_MD,
                             timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()
    assert reg.get_split(model).revision == rev and len(reg.audit_log(model)) == audits

    # Set through the CLI.
    res = cli(gw, "canary", "shadow", model, "--version", "2", "--reason", "dark launch v2", actor="carol")
    assert res.exit_code == 0, res.output
    assert f"{model}: shadow v2 (split revision {rev + 1})" in flat(res.output), res.output
    split = reg.get_split(model)
    assert (split.shadow, split.revision, split.weights) == (2, rev + 1, {1: 100})
    audit = reg.audit_log(model)[-1]
    assert (audit["actor"], audit["reason"], audit["revision"]) == ("carol", "dark launch v2", rev + 1)
    assert audit["old"] == {"1": 100, "shadow": 0} and audit["new"] == {"1": 100, "shadow": 2}

    # The gateway mirrors: the caller sees v1, a shadow row for the same request id holds v2's score.
    synced(gw, model, rev + 1)
    rid = "shadowed-" + uuid.uuid4().hex[:8]
    assert predict(gw, model, request_id=rid).version == 1
    wait_for(lambda: shadow_row(reg, rid) is not None, 10, "the shadow row")
    assert shadow_row(reg, rid)[0] == 2

    # Clear through the RPC (version 0).
    out = gw.rollout.SetShadow(rpb.SetShadowRequest(model=model, version=0, reason="enough data"),
                               metadata=admin_md("dave"), timeout=30)
    assert (out.shadow_version, out.revision, split_of(out)) == (0, rev + 2, {1: 100})
    audit = reg.audit_log(model)[-1]
    assert (audit["actor"], audit["reason"], audit["new"]) == ("dave", "enough data", {"1": 100, "shadow": 0})
    synced(gw, model, rev + 2)
    assert gw.gateway.catalog.get(model).shadow is None
    rid2 = "unshadowed-" + uuid.uuid4().hex[:8]
    assert predict(gw, model, request_id=rid2).version == 1
    time.sleep(1.0)  # mirror rows land within milliseconds; give a stray one time to appear
    assert shadow_row(reg, rid2) is None


# ---------------------------------------------------------------- GetRolloutStatus
def table_rows(output: str) -> dict[int, list[str]]:
    """The arms table of `chimera rollout status`: version -> its cells."""
    rows: dict[int, list[str]] = {}
    for line in output.split("last decision:")[0].splitlines():  # the decisions table comes after
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0].isdigit() and len(cells) >= 7:
            rows[int(cells[0])] = cells
    return rows


def test_rollout_status_counts_what_was_sent(backend) -> None:
    gw, reg = backend
    model = new_model(gw, reg, {1: 70, 2: 30}, metric="mean_outcome")
    # mean_outcome has no natural scale: the policy needs one (tau). Its outcomes are winsorised at limits
    # fixed from the first `winsor_calibration` baseline outcomes (1,000 by default) and enter the test
    # only then; this test sends 30, so it calibrates on 20 (the limits clip nothing here: 7 values).
    # It checks the raw counts and means, so the covariate adjustment (on by default for mean_outcome,
    # which would hold rows until 1,000 baseline outcomes fix θ and then show adjusted means) is off;
    # tests/integration/test_covariate_rows.py covers the adjusted decision.
    reg.set_rollout_config(model, {"tau": 0.5, "winsor_calibration": 20, "covariate": ""})
    rev = reg.get_split(model).revision
    served: dict[str, int] = {}
    for i in range(80):
        r = predict(gw, model, key=f"acct-{i}", request_id=f"{model}-{i}")
        served[r.request_id] = r.version
    assert set(served.values()) == {1, 2}
    # Continuous outcomes (e.g. net ROI) for 50 of them, through RecordOutcome.
    sent: dict[int, list[float]] = {1: [], 2: []}
    for i in range(50):
        rid, value = f"{model}-{i}", round((i % 7) * 0.37 - 1.0, 4)
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=value), timeout=30)
        sent[served[rid]].append(value)
    requests = {v: sum(1 for x in served.values() if x == v) for v in (1, 2)}

    def status() -> rpb.RolloutStatus:
        return gw.rollout.GetRolloutStatus(rpb.GetRolloutStatusRequest(model=model), metadata=ADMIN_MD,
                                           timeout=30)

    # Predictions are logged off the request path: wait until all 80 are in.
    wait_for(lambda: sum(a.requests for a in status().arms) == 80, 15, "80 logged predictions", every=0.2)
    st = status()
    assert (st.model, st.metric, st.revision) == (model, "mean_outcome", rev) and st.started_at
    assert not st.decisions
    arms = {a.version: a for a in st.arms}
    assert (arms[1].role, arms[1].weight, arms[1].status) == ("baseline", 70, "production")
    assert (arms[2].role, arms[2].weight, arms[2].status) == ("canary", 30, "canary")
    for v in (1, 2):
        assert arms[v].requests == requests[v]
        assert arms[v].outcomes == len(sent[v])
        assert arms[v].metric_value == pytest.approx(float(np.mean(sent[v])), abs=1e-9)

    # One look of the gateway's rollout controller: the status shows that decision, with the counts.
    decision = gw.gateway.controller.run_once(model)
    assert decision is not None
    st = gw.rollout.GetRolloutStatus(rpb.GetRolloutStatusRequest(model=model, decisions=1), metadata=ADMIN_MD,
                                     timeout=30)
    assert len(st.decisions) == 1
    last = st.decisions[0]
    assert (last.action, last.baseline_version, last.canary_version) == (decision.action, 1, 2)
    assert (last.n_baseline, last.n_canary) == (len(sent[1]), len(sent[2]))
    for got, values in ((last.mean_baseline, sent[1]), (last.mean_canary, sent[2])):
        assert math.isnan(got) or got == pytest.approx(float(np.mean(values)), abs=1e-9)
    assert last.created_at and last.id == decisions(reg, model, limit=1)[0]["id"]

    # The same through `chimera rollout status`.
    res = cli(gw, "rollout", "status", model)
    assert res.exit_code == 0, res.output
    text = flat(res.output)
    assert model in text and "mean_outcome" in text and f"split revision {rev}" in text, res.output
    rows = table_rows(res.output)
    for v, role, weight in ((1, "baseline", 70), (2, "canary", 30)):
        cells = rows[v]
        assert cells[2] == role and cells[3] == str(weight), cells
        assert cells[4:6] == [str(requests[v]), str(len(sent[v]))], cells
        assert float(cells[6]) == pytest.approx(float(np.mean(sent[v])), rel=1e-3), cells
    assert f"last decision: {decision.action} v2 vs v1" in text, res.output


# ---------------------------------------------------------------- RecordOutcomes
def test_record_outcomes_batch_reports_each_item(backend) -> None:
    gw, reg = backend
    model = new_model(gw, reg, {1: 100}, versions=1)
    ids = [f"{model}-{x}" for x in ("a", "b", "c", "d")]
    for rid in ids:
        predict(gw, model, request_id=rid)
    a, b, c, d = ids
    gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=b, value=1.0), timeout=30)
    unknown = "never-scored-" + uuid.uuid4().hex[:6]
    items = [
        (a, 1.0, grpc.StatusCode.OK, ()),
        (unknown, 1.0, grpc.StatusCode.NOT_FOUND, ("request_id", unknown)),
        (b, 0.0, grpc.StatusCode.ALREADY_EXISTS, ("value", b, "already stored")),
        (c, float("nan"), grpc.StatusCode.INVALID_ARGUMENT, ("value", "finite")),
        ("", 1.0, grpc.StatusCode.INVALID_ARGUMENT, ("request_id", "required")),
        (b, 1.0, grpc.StatusCode.OK, ()),  # the same value again: idempotent
        (d, 0.0, grpc.StatusCode.OK, ()),
        (c, float("inf"), grpc.StatusCode.INVALID_ARGUMENT, ("value", "finite")),
    ]
    resp = gw.predict.RecordOutcomes(pb.RecordOutcomesRequest(
        outcomes=[pb.RecordOutcomeRequest(request_id=rid, value=v) for rid, v, _, _ in items]), timeout=30)
    assert len(resp.statuses) == len(items)
    for i, ((rid, value, code, words), st) in enumerate(zip(items, resp.statuses, strict=True)):
        assert st.code == code.value[0], f"item {i} ({rid!r}, {value}): {st.code} {st.message!r}"
        for word in words:
            assert word in st.message, f"item {i}: {st.message!r} lacks {word!r}"
        if code == grpc.StatusCode.OK:
            assert not st.message
    with reg.engine.connect() as conn:
        stored = dict(conn.execute(select(Outcome.request_id, Outcome.value)
                                   .where(Outcome.request_id.in_([*ids, unknown, ""]))).tuples().all())
    assert stored == {a: 1.0, b: 1.0, d: 0.0}


# ---------------------------------------------------------------- a new version under load
def test_new_version_gets_traffic_under_load_without_a_failed_request(backend) -> None:
    from scipy.stats import binom

    gw, reg = backend
    g = gw.gateway
    model = new_model(gw, reg, {1: 90, 2: 10})
    stop = threading.Event()
    results: list[tuple[float, int]] = []  # (time answered, version)
    errors: list[str] = []
    violations: list[str] = []

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = predict(gw, model, key=f"c{n}-{i}-{uuid.uuid4().hex[:6]}")
                results.append((time.monotonic(), r.version))
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    def monitor() -> None:
        """The gateway's routing table never names v3 before v3's replicas are ready."""
        while not stop.is_set():
            routed = 3 in g.catalog.get(model).router.weights
            if routed and not g.pool.is_ready(model, 3):
                violations.append(f"v3 routed before ready at {time.monotonic()}")
            time.sleep(0.002)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(2)]
    threads.append(threading.Thread(target=monitor, daemon=True))
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        data, names = small_onnx(seed=3)
        assert reg.publish_version(model, data, names, status="canary").version == 3
        current = gw.rollout.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), metadata=ADMIN_MD,
                                             timeout=30)
        t_split = time.monotonic()
        out = gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
            model=model, expected_revision=current.revision, reason="v3 canary",
            weights=[rpb.VersionWeight(version=1, weight=70), rpb.VersionWeight(version=2, weight=10),
                     rpb.VersionWeight(version=3, weight=20)]), metadata=ADMIN_MD, timeout=30)
        assert split_of(out) == {1: 70, 2: 10, 3: 20}
        wait_for(lambda: any(v == 3 for _, v in results), 120, "a v3 answer", every=0.1)
        t_first = next(t for t, v in results if v == 3)
        v3_pids = replica_pids(model, 3)
        n_at_first = len(results)
        wait_for(lambda: len(results) >= n_at_first + 400, 60, "400 more answers", every=0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    assert not violations, violations[:3]
    assert g.version_health.failure_count(model, 3) == 0  # no failed-over v3 rows either
    assert v3_pids and replica_pids(model, 3) == v3_pids  # the replicas that answered first kept serving
    after = [v for t, v in results if t > t_first]
    assert set(after) == {1, 2, 3}
    lo, hi = binom.interval(0.9999, len(after), 0.20)
    assert lo <= after.count(3) <= hi, f"v3 answered {after.count(3)} of {len(after)}"
    print(f"\nv3 first answered {t_first - t_split:.2f}s after SetTrafficSplit; "
          f"{len(results)} requests, 0 errors")


# ---------------------------------------------------------------- admin API disabled
class NoAdminGateway(GatewayThread):
    """A live gateway started without CHIMERA_ADMIN_TOKEN (admin_token=None), otherwise like the others."""

    def __init__(self, registry_url: str, tmp: Path) -> None:
        BackgroundGateway.__init__(self, GatewayConfig(
            registry_url=registry_url, port=0, admin_token=None, replica_cpus=0.1, spill_dir=tmp / "spill",
            drain_delay_s=0.0, controller_interval_s=0.0))


@pytest.fixture(scope="module")
def no_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NoAdminGateway, Registry, str]]:
    """Its own SQLite registry: a second gateway on a shared registry would deploy every model there."""
    tmp = tmp_path_factory.mktemp("no-admin")
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}")
    reg.upgrade()
    model = "na" + uuid.uuid4().hex[:8]
    for v in (1, 2):
        data, names = small_onnx(seed=v)
        reg.publish_version(model, data, names, status="production" if v == 1 else "canary")
    reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test")
    gw = NoAdminGateway(reg.url, tmp).start()
    yield gw, reg, model
    gw.stop()
    reg.dispose()


def test_admin_api_disabled_without_a_token_but_predict_works(no_admin) -> None:
    gw, reg, model = no_admin
    before = (reg.get_split(model), statuses(reg, model), len(reg.audit_log(model)))
    calls = {
        "SetTrafficSplit": lambda md: gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
            model=model, weights=[rpb.VersionWeight(version=1, weight=100)], force=True), metadata=md,
            timeout=30),
        "Promote": lambda md: gw.rollout.Promote(rpb.PromoteRequest(model=model, version=2, force=True),
                                                 metadata=md, timeout=30),
        "Rollback": lambda md: gw.rollout.Rollback(rpb.RollbackRequest(model=model), metadata=md, timeout=30),
        "SetShadow": lambda md: gw.rollout.SetShadow(rpb.SetShadowRequest(model=model, version=2),
                                                     metadata=md, timeout=30),
        "GetRolloutStatus": lambda md: gw.rollout.GetRolloutStatus(
            rpb.GetRolloutStatusRequest(model=model), metadata=md, timeout=30),
    }
    for name, call in calls.items():
        for md in (ADMIN_MD, ()):  # whatever token is sent, or none
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.value.code())
            details = err.value.details()
            assert "admin API is disabled" in details and "CHIMERA_ADMIN_TOKEN" in details, (name, details)
    assert (reg.get_split(model), statuses(reg, model), len(reg.audit_log(model))) == before

    res = cli(gw, "rollback", model)
    assert res.exit_code == 1 and "PERMISSION_DENIED" in res.output and "admin API is disabled" in \
        flat(res.output), res.output

    # Serving is unaffected: routed Predicts and outcomes work; pinning a version (admin-only) does not.
    versions = {predict(gw, model, key=f"u{i}", request_id=f"{model}-{i}").version for i in range(60)}
    assert versions == {1, 2}
    gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=f"{model}-0", value=1.0), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        gw.predict.Predict(pb.PredictRequest(model=model, dense=ROW, version=2), metadata=ADMIN_MD,
                           timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
