"""The door (gateway.api.validate), against a live gateway on SQLite AND PostgreSQL: a NUL byte in any
string that would reach the database is INVALID_ARGUMENT naming the field, on every entry point, and
nothing of it reaches the prediction log, its spill file or the outcome spill (PostgreSQL refuses NUL
in text: before the door, such a row was answered OK, then spilled and replayed forever). Plus what the
door tells callers: long client input is not echoed whole, and errors never carry a traceback."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from registry import NotFoundError, Registry
from tests.harness import ADMIN_MD, GatewayThread, served_model, small_onnx, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")
C = grpc.StatusCode
GOOD = [0.5, -0.25, 1.0, 0.0]
NUL = "a\x00b"


def refused(call, field: str) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == C.INVALID_ARGUMENT, (field, err.value.code(), err.value.details())
    assert field in err.value.details() and "NUL" in err.value.details(), err.value.details()


def spill_files(tmp: Path) -> list[Path]:
    return [p for p in (tmp / "spill").glob("*") if p.stat().st_size > 0] if (tmp / "spill").exists() else []


def test_nul_is_refused_at_every_door_and_nothing_spills(registry_url: str, tmp_path: Path) -> None:
    reg = Registry(registry_url)
    reg.upgrade()
    model = "door" + uuid.uuid4().hex[:8]
    onnx, names = small_onnx(seed=3)
    reg.publish_version(model, onnx, names)
    reg.publish_version(model, small_onnx(seed=4)[0], names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(registry_url, tmp_path, controller_interval_s=0).start()
    try:
        p, r = gw.predict, gw.rollout

        def predict(**kw) -> None:  # noqa: ANN003
            p.Predict(pb.PredictRequest(**{"model": model, "dense": GOOD, **kw}), timeout=30)

        refused(lambda: predict(request_id=NUL), "request_id")
        refused(lambda: predict(routing_key=NUL), "routing_key")
        refused(lambda: predict(model=model + "\x00"), "model")
        refused(lambda: p.Predict(pb.PredictRequest(model=model, features={"f\x000": 1.0}), timeout=30),
                "features[")
        rows = [pb.PredictRequest(model=model, dense=GOOD, request_id=f"ok-{uuid.uuid4().hex}"),
                pb.PredictRequest(model=model, dense=GOOD, request_id=NUL)]
        refused(lambda: p.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=30),
                "rows[1].request_id")
        matrix = pb.DenseMatrix(f32=np.asarray([GOOD, GOOD], np.float32).tobytes(), cols=4,
                                 request_ids=["fine", NUL])
        refused(lambda: p.PredictBatch(pb.PredictBatchRequest(model=model, matrix=matrix), timeout=30),
                "matrix.request_ids[1]")
        matrix = pb.DenseMatrix(f32=np.asarray([GOOD], np.float32).tobytes(), cols=4, routing_keys=[NUL])
        refused(lambda: p.PredictBatch(pb.PredictBatchRequest(model=model, matrix=matrix), timeout=30),
                "matrix.routing_keys[0]")
        # A stream: the bad row gets its error, the stream goes on and the good row is answered.
        good_id = f"good-{uuid.uuid4().hex}"
        answers = list(p.PredictStream(iter([
            pb.PredictRequest(model=model, dense=GOOD, request_id=NUL),
            pb.PredictRequest(model=model, dense=GOOD, request_id=good_id)]), timeout=60))
        errors = [a for a in answers if a.HasField("error")]
        assert len(errors) == 1 and errors[0].error.code == C.INVALID_ARGUMENT.value[0]
        assert "request_id" in errors[0].error.message and "NUL" in errors[0].error.message
        assert [a.prediction.request_id for a in answers if a.HasField("prediction")] == [good_id]
        # Outcomes: one and many (the good item of the same call is stored).
        refused(lambda: p.RecordOutcome(pb.RecordOutcomeRequest(request_id=NUL, value=1.0), timeout=30),
                "request_id")
        resp = p.RecordOutcomes(pb.RecordOutcomesRequest(outcomes=[
            pb.RecordOutcomeRequest(request_id=good_id, value=1.0),
            pb.RecordOutcomeRequest(request_id="x\x00", value=0.0)]), timeout=30)
        assert resp.statuses[0].code == 0, resp.statuses[0].message
        assert resp.statuses[1].code == C.INVALID_ARGUMENT.value[0]
        assert "request_id" in resp.statuses[1].message
        # Admin calls: every text field that reaches the audit log.
        refused(lambda: r.SetTrafficSplit(rpb.SetTrafficSplitRequest(
            model=model, weights=[rpb.VersionWeight(version=1, weight=100)], reason=NUL, force=True),
            metadata=ADMIN_MD, timeout=30), "reason")
        refused(lambda: r.SetShadow(rpb.SetShadowRequest(model=model, version=2, reason=NUL),
                                    metadata=ADMIN_MD, timeout=30), "reason")
        refused(lambda: r.Rollback(rpb.RollbackRequest(model=model + "\x00", version=1), metadata=ADMIN_MD,
                                   timeout=30), "model")
        refused(lambda: r.GetTrafficSplit(rpb.GetTrafficSplitRequest(model="\x00"), metadata=ADMIN_MD,
                                          timeout=30), "model")
        assert r.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model), metadata=ADMIN_MD,
                                 timeout=30).revision == 1  # no split change went through

        # Nothing spilled, nothing stuck: the good row is in the database with its outcome, and a
        # prediction made after all this is logged too.
        after = f"after-{uuid.uuid4().hex}"
        predict(request_id=after)
        assert gw.gateway.log.flush(timeout=30)

        def logged(rid: str) -> bool:
            try:
                reg.get_prediction(rid)
                return True
            except NotFoundError:
                return False

        wait_for(lambda: logged(good_id) and logged(after), 30, "the good rows in the database")
        assert not gw.gateway.log.has_spill and spill_files(tmp_path) == []
        assert gw.gateway.log.stats.spilled == 0 and gw.gateway.outcomes.stats.spilled == 0
        assert p.RecordOutcome(pb.RecordOutcomeRequest(request_id=after, value=0.0), timeout=30) is not None
        assert reg.outcome_means(model)[1][0] == 2  # good_id's and after's outcomes, nothing else
    finally:
        gw.stop()
        reg.dispose()


def test_long_input_is_not_echoed_whole_and_nan_scores_are_never_ok(tmp_path: Path) -> None:
    """A 100 KB model or feature name: refused, with a message of bounded size that names the field.
    A NaN score from the model: UNAVAILABLE (counted), never OK."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg, model, onnx = served_model(url, "long", seed=5)
    gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()
    try:
        huge = "m" * 100_000
        for request in (pb.PredictRequest(model=huge, dense=GOOD),
                        pb.PredictRequest(model=model, features={huge: 1.0})):
            with pytest.raises(grpc.RpcError) as err:
                gw.predict.Predict(request, timeout=30)
            assert err.value.code() == C.INVALID_ARGUMENT
            assert len(err.value.details()) <= 512 and "limit 256" in err.value.details()
        rows = [pb.PredictRequest(model=model, features={huge + str(i): 1.0}) for i in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=30)
        assert err.value.code() == C.INVALID_ARGUMENT and len(err.value.details()) <= 512

        # Extreme but finite inputs make this model's score NaN (checked with onnxruntime itself): that
        # row is never answered OK, it fails as the replica's fault; a good row is still scored.
        nan_row = [3e38, -3e38, 3e38, -3e38]
        session = ort.InferenceSession(onnx)
        direct = session.run(None, {session.get_inputs()[0].name: np.asarray([nan_row], np.float32)})
        assert np.isnan(direct[1]).all()
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.Predict(pb.PredictRequest(model=model, dense=nan_row), timeout=30)
        assert err.value.code() == C.UNAVAILABLE and "non-finite score" in err.value.details()
        assert 0.0 < gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=30).score < 1.0
        assert sum(b.stats.nonfinite for b in gw.gateway.pool._batchers.values()) >= 1
    finally:
        gw.stop()
        reg.dispose()


def log_odds_onnx() -> bytes:
    """A hand-built ONNX model scoring sigmoid(log(f0)) = f0 / (1 + f0) row by row: NaN when f0 < 0 in
    any batch (small_onnx's LinearClassifier gives NaN for an overflowing row alone but 0/1 for the
    same row with batch-mates: tests/unit/test_scorer_batches.py)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["col"], value=helper.make_tensor("c", TensorProto.INT64, [], [0])),
         helper.make_node("Gather", ["X", "col"], ["f0"], axis=1),
         helper.make_node("Log", ["f0"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["probabilities"])],
        "log_odds", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_a_nan_score_fails_only_its_caller_and_its_batch_mates_get_their_scores(tmp_path: Path) -> None:
    """30 callers at once, one call in flight at a time (max_inflight 1), so they share calls: the caller
    whose row the model scores NaN is answered UNAVAILABLE, the 29 others get their own scores (as
    scored one at a time), never a neighbour's (gateway.serving.batcher)."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.serving.replica_pool import BatchConfig

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "mates" + uuid.uuid4().hex[:6]
    reg.publish_version(model, log_odds_onnx(), [f"f{i}" for i in range(4)], status="production")
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, batch=BatchConfig(max_inflight=1)).start()
    try:
        rows = [[-1.0 if i == 15 else 0.1 * (i + 1), -0.25, 1.0, 0.0] for i in range(30)]

        def call(row: list[float]) -> float | str:
            try:
                return gw.predict.Predict(pb.PredictRequest(model=model, dense=row), timeout=30).score
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        batchers = list(gw.gateway.pool._batchers.values())
        before = sum(b.stats.batches for b in batchers)
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(call, rows))
        calls = sum(b.stats.batches for b in batchers) - before
        assert isinstance(answers[15], str) and answers[15].startswith("UNAVAILABLE") \
            and "non-finite score" in answers[15], answers[15]
        for i, answer in enumerate(answers):
            if i != 15:
                f0 = np.float32(0.1 * (i + 1))
                assert answer == pytest.approx(float(f0 / (1 + f0)), rel=1e-6), (i, answer)
        assert 0 < calls < 30, calls  # the callers shared calls: the NaN row had batch-mates
        assert sum(b.stats.nonfinite for b in batchers) == 1
    finally:
        gw.stop()
        reg.dispose()


def test_a_canarys_nan_score_is_answered_by_the_baseline_and_counted_against_the_canary(
        tmp_path: Path) -> None:
    """v2 (the canary, half the traffic) scores rows with f0 < 0 NaN; v1 scores them. Such a row routed
    to v2 is failed over: answered by v1, counted as v2's failure and a failover from v2 (what the error
    guardrail reads). v2 is not marked down for it: its other rows are still its own."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "nanfo" + uuid.uuid4().hex[:6]
    names = [f"f{i}" for i in range(4)]
    reg.publish_version(model, small_onnx(seed=5)[0], names, status="production")
    reg.publish_version(model, log_odds_onnx(), names, status="staged")
    reg.set_split(model, {1: 50, 2: 50}, expected_revision=0, actor="test", status_changes={2: "canary"})
    gw = GatewayThread(url, tmp_path, controller_interval_s=0).start()

    def predict(key: str, f0: float) -> pb.PredictResponse:
        return gw.predict.Predict(pb.PredictRequest(model=model, routing_key=key, dense=[f0, 0.0, 0.0, 0.0]),
                                  timeout=30)

    try:
        served = [predict(f"k{i}", -1.0) for i in range(40)]
        assert {r.version for r in served} == {1}  # every row answered, by the baseline
        assert all(0.0 < r.score < 1.0 for r in served)
        g = gw.gateway
        assert g is not None
        failovers = g.metrics.registry.get_sample_value("chimera_failovers_total",
                                                        {"model": model, "from_version": "2"})
        assert failovers is not None and 5 <= failovers < 40, failovers  # about half were routed to v2
        assert g.metrics.registry.get_sample_value("chimera_version_failures_total",
                                                   {"model": model, "version": "2"}) == failovers
        good = [predict(f"k{i}", 1.0) for i in range(40)]
        assert {r.version for r in good} == {1, 2}  # v2 still answers its rows: it was not marked down
    finally:
        gw.stop()
        reg.dispose()


def test_outcomes_token_and_internal_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With an outcomes token, RecordOutcome(s) need it (or the admin token) while Predict stays as
    configured (open here); an INTERNAL error answers a fixed message with a correlation id that the
    server log carries next to the real exception, never the exception's text."""
    import logging
    import secrets

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg, model, _onnx = served_model(url, "otok", seed=6)
    token = secrets.token_hex(24)
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, outcomes_token=token).start()
    try:
        rid = gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=30).request_id
        one = pb.RecordOutcomeRequest(request_id=rid, value=1.0)
        for md in (None, (("authorization", "Bearer wrong-token"),)):
            for call in (lambda m: gw.predict.RecordOutcome(one, metadata=m, timeout=30),
                         lambda m: gw.predict.RecordOutcomes(pb.RecordOutcomesRequest(outcomes=[one]),
                                                             metadata=m, timeout=30)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == C.UNAUTHENTICATED
        gw.predict.RecordOutcome(one, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        assert reg.outcome_means(model)[1][0] == 1
        gw.predict.RecordOutcome(one, metadata=ADMIN_MD, timeout=30)  # the admin token works too

        async def broken(request_id: str, value: float) -> None:
            raise RuntimeError("SELECT password FROM secrets WHERE id = 42")

        gw.gateway.outcome_intake.record = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="gateway.api.validate"), \
                pytest.raises(grpc.RpcError) as err:
            gw.predict.RecordOutcome(one, metadata=ADMIN_MD, timeout=30)
        assert err.value.code() == C.INTERNAL
        details = err.value.details()
        assert "password" not in details and "correlation id" in details
        cid = details.split("correlation id ")[1].split(";")[0]
        assert any(cid in r.getMessage() and r.exc_info and "password" in str(r.exc_info[1])
                   for r in caplog.records)
    finally:
        gw.stop()
        reg.dispose()


def test_startup_isolates_a_model_with_no_startable_version_and_serves_it_once_it_can_start(
        registry_url: str, tmp_path: Path) -> None:
    """One model's only version is corrupted (its bytes no longer match the recorded sha256): the
    gateway starts anyway, serves the other model, answers the bad one UNAVAILABLE with the reason
    and counts it. It keeps retrying the bad one with a backoff, and once the artifact is repaired
    (standing in for any cause that clears: Serve's proxy actor killed under load did this in a fresh
    clone's run) the model is served and the gauge goes back to 0, with no restart and no split change."""
    from prometheus_client import generate_latest
    from sqlalchemy import text

    reg = Registry(registry_url)
    reg.upgrade()
    good, bad = "good" + uuid.uuid4().hex[:6], "bad" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=8)
    for m in (good, bad):
        reg.publish_version(m, onnx, names)
        reg.set_split(m, {1: 100}, expected_revision=0, actor="test")
    reg.publish_version(good, *small_onnx(seed=9))  # good gets a canary: its split changes below
    reg.set_split(good, {1: 90, 2: 10}, expected_revision=1, actor="test")
    with reg.engine.begin() as conn:
        bad_id = conn.execute(text("SELECT id FROM models WHERE name = :n"), {"n": bad}).scalar_one()
        conn.execute(text("UPDATE model_versions SET onnx = :b WHERE model_id = :m"),
                     {"b": onnx[:-1] + bytes([onnx[-1] ^ 1]), "m": bad_id})
    gw = GatewayThread(registry_url, tmp_path, controller_interval_s=0).start()
    try:
        def gauge() -> str:
            found = [line for line in generate_latest(gw.gateway.metrics.registry).decode().splitlines()
                     if line.startswith("chimera_models_failed_to_start ")]
            return found[0] if found else "missing"

        assert 0 < gw.predict.Predict(pb.PredictRequest(model=good, dense=GOOD), timeout=30).score < 1
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.Predict(pb.PredictRequest(model=bad, dense=GOOD), timeout=30)
        assert err.value.code() == C.UNAVAILABLE, err.value.details()
        assert "no version could start" in err.value.details()
        assert "sha256" in err.value.details(), err.value.details()  # the reason, not just the fact
        assert gauge() == "chimera_models_failed_to_start 1.0"
        # The broken model is retried with a doubling backoff (1 s, 2 s, 4 s, ... 60 s), not at every
        # 0.25 s poll: each try deploys to Ray (about 10 s each: Serve starts the replica three times).
        # After two failed tries the wait has doubled to at least 2 s.
        watcher = gw.gateway.watcher
        wait_for(lambda: watcher.retry_delay(bad) >= 2.0, 90, "a 2 s backoff after two failed tries")
        assert watcher.attempts[bad] <= 3, watcher.attempts
        assert watcher.retry_delay(good) == 0.0
        # While the broken model is being retried (each try a deploy of several seconds), another
        # model's split changes still reach this gateway at once: a rollback must not wait for them.
        # Changes go on until two of them were made while a try of the broken model was running (so the
        # test cannot pass by missing the retries), at least four, for at most 60 s.
        catalog, lags, during, deadline = gw.gateway.catalog, [], 0, time.monotonic() + 60
        while (len(lags) < 4 or during < 2) and time.monotonic() < deadline:
            weights = {1: 100, 2: 0} if len(lags) % 2 == 0 else {1: 90, 2: 10}
            split = reg.set_split(good, weights, expected_revision=catalog.get(good).revision, actor="test")
            during += watcher.trying(bad)
            t0 = time.monotonic()
            wait_for(lambda split=split: catalog.get(good).revision == split.revision, 60, "the split change")
            lags.append(time.monotonic() - t0)
            time.sleep(1.5)
        assert during >= 2, f"only {during} of {len(lags)} split changes were made during a retry"
        assert max(lags) < 2.0, f"split changes took {[round(x, 1) for x in lags]} s (retries of {bad} ran)"
        revision = reg.get_model(bad).split.revision
        with reg.engine.begin() as conn:  # the cause clears
            conn.execute(text("UPDATE model_versions SET onnx = :b WHERE model_id = :m"),
                         {"b": onnx, "m": bad_id})

        def served() -> bool:
            try:
                return 0 < gw.predict.Predict(pb.PredictRequest(model=bad, dense=GOOD), timeout=30).score < 1
            except grpc.RpcError:
                return False

        # The next try is at most the backoff reached by now away (it doubles 2 -> 4 -> 8 -> 16 -> 32 s
        # within the minute above), plus a deploy.
        wait_for(served, 120, f"{bad} served after the repair")  # by a try: the split did not change
        assert gauge() == "chimera_models_failed_to_start 0.0"
        assert bad not in gw.gateway.failed_models and watcher.retry_delay(bad) == 0.0
        assert reg.get_model(bad).split.revision == revision  # no split change was needed
        assert gw.predict.Predict(pb.PredictRequest(model=good, dense=GOOD), timeout=30).score > 0
    finally:
        gw.stop()
        reg.dispose()


def test_startup_deploys_every_version_of_every_model_at_once(tmp_path: Path) -> None:
    """The port opens once every weighted version of every model is ready, and the gateway starts them
    together (each version is its own Serve application), so a canary or a second model no longer adds
    its replica's start to the gateway's: while the gateway starts, Serve shows several of its
    applications deploying at the same time. Started one after the other (as before), a version's
    application was created only once the one before it ran: never two deploying at once. (The first
    deploy of a process goes alone when Serve itself has to be started: its start is not thread-safe.)"""
    import threading

    from ray import serve

    from replicas.deployment import app_name
    from replicas.serve_state import serve_running

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    reg.upgrade()
    canaried, plain = "pair" + uuid.uuid4().hex[:6], "solo" + uuid.uuid4().hex[:6]
    for m, weights in ((canaried, {1: 90, 2: 10}), (plain, {1: 100})):
        for seed in weights:
            onnx, names = small_onnx(seed=seed)
            reg.publish_version(m, onnx, names)
        reg.set_split(m, weights, expected_revision=0, actor="test")
    apps = {app_name(canaried, 1), app_name(canaried, 2), app_name(plain, 1)}
    most = [0]
    started = threading.Event()

    def watch() -> None:
        while not started.is_set():
            if serve_running():
                states = serve.status().applications
                deploying = sum(1 for name in apps if name in states
                                and str(states[name].status).upper().endswith("DEPLOYING"))
                most[0] = max(most[0], deploying)
            started.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    gw = GatewayThread(url, tmp_path, controller_interval_s=0)
    try:
        gw.start()
        started.set()
        watcher.join(10)
        for m in (canaried, plain):
            assert 0 < gw.predict.Predict(pb.PredictRequest(model=m, dense=GOOD), timeout=30).score < 1
        assert most[0] >= 2, f"at most {most[0]} of the gateway's applications were seen deploying at once"
    finally:
        started.set()
        gw.stop()
        reg.dispose()


@pytest.mark.parametrize("setting", ["port", "metrics_port"])
def test_a_taken_port_stops_the_gateway_before_it_deploys_or_takes_a_call(
        registry_url: str, tmp_path: Path, setting: str) -> None:
    """Another process listens on the gateway's gRPC port or its metrics port: the gateway's start fails
    at once with an error naming the setting and the address, before it has deployed a replica, opened
    its gRPC port or told a health check SERVING. (/metrics used to open last: a gateway could deploy,
    say SERVING, take calls and only then die; CI saw one whose metrics port a Ray process had taken
    meanwhile. A taken gRPC port was found only after every replica had been deployed.)"""
    import socket

    from ray import serve

    from gateway.server import PortTaken
    from replicas.deployment import app_name
    from replicas.serve_state import serve_running

    reg, model, _onnx = served_model(registry_url, "mport", seed=3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        gw = GatewayThread(registry_url, tmp_path, controller_interval_s=0, **{setting: port})
        try:
            with pytest.raises(PortTaken, match=f"^{setting}: cannot listen on 127.0.0.1:{port}"):
                gw.start(timeout=60)
            assert gw.gateway.server is None, "the gRPC port was opened (so a health check could be answered)"
            assert not (serve_running() and app_name(model, 1) in serve.status().applications), \
                "a replica was deployed"
        finally:
            gw.loop.call_soon_threadsafe(gw.loop.stop)
            gw._thread.join(10)
            reg.dispose()


def test_chimera_serve_on_a_taken_port_exits_1_with_one_line_naming_it(tmp_path: Path) -> None:
    """What the operator sees: `chimera serve` on a port another process listens on ends with exit 1 and
    `error: port: cannot listen on 127.0.0.1:PORT ...`, without a traceback, and before any deploy."""
    import os
    import socket
    import subprocess
    import sys

    import ray

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg, _model, _onnx = served_model(url, "cli", seed=4)  # a version it would deploy
    reg.dispose()
    env = {**os.environ, "CHIMERA_REGISTRY_URL": url, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = ["serve", "--port", str(port), "--metrics-port", "0", "--host", "127.0.0.1"]
        done = subprocess.run([sys.executable, "-m", "chimera", *argv], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert f"error: port: cannot listen on 127.0.0.1:{port} for gRPC" in " ".join(out.split()), out[-3000:]
    assert "Traceback" not in out and "deploying replicas" not in out, out[-3000:]
