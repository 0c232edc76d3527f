"""Hostile and malformed input against a live gateway: each kind gets its documented gRPC status and a
message naming the problem, client mistakes are never UNKNOWN or INTERNAL, and the gateway still
answers a good request afterwards. Plus a property-based fuzz of PredictRequest bytes."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import rollout_pb2 as rpb
from registry import Registry
from tests.harness import ADMIN_MD, ADMIN_TOKEN, GatewayThread, small_onnx
from tests.rawgrpc import field, map_entry, raw_h2_call, raw_unary, string_field

pytestmark = pytest.mark.usefixtures("ray_cluster")
PREDICT = "/chimera.v1.PredictionService/Predict"
PREDICT_TOKEN = "predict-token-for-tests"
GOOD = [0.5, -0.25, 1.0, 0.0]
C = grpc.StatusCode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model = "h" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2)
    reg.publish_version(model, b1, names)
    reg.publish_version(model, b2, names)  # exists, never deployed: pinning it needs the admin token
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp, controller_interval_s=0).start()
    yield gw, model, reg
    gw.stop()
    reg.dispose()


def still_serving(gw: GatewayThread, model: str) -> None:
    resp = gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=30)
    assert resp.version == 1 and 0.0 < resp.score < 1.0


@dataclass
class Case:
    name: str
    call: Callable[[GatewayThread, str, Registry], object]
    code: grpc.StatusCode
    message: str


def predict(**kw):
    def call(gw, model, reg, md=None):
        return gw.predict.Predict(pb.PredictRequest(**{"model": model, **kw}), timeout=30, metadata=md)
    return call


def predict_md(md, **kw):
    return lambda gw, model, reg: predict(**kw)(gw, model, reg, md)


def raw_predict(data: bytes):
    return lambda gw, model, reg: raw_unary(gw.channel, PREDICT)(data, timeout=30)


def model_field(model: str) -> bytes:
    return string_field(1, model.encode())


def batch(n: int):
    def call(gw, model, reg):
        rows = [pb.PredictRequest(dense=GOOD) for _ in range(n)]
        return gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=rows), timeout=60)
    return call


def outcome(request_id: str | None, value: float, first: float | None = None):
    def call(gw, model, reg):
        rid = request_id
        if rid is None:  # a fresh scored request
            rid = gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=30).request_id
            gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=first), timeout=30)
        return gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=value), timeout=30)
    return call


def set_split(weights: list[tuple[int, int]], stale: bool = False, md=ADMIN_MD):
    def call(gw, model, reg):
        revision = reg.get_split(model).revision
        return gw.rollout.SetTrafficSplit(rpb.SetTrafficSplitRequest(
            model=model, expected_revision=revision - 1 if stale else revision,
            weights=[rpb.VersionWeight(version=v, weight=w) for v, w in weights]), timeout=10, metadata=md)
    return call


def get_split(md):
    return lambda gw, model, reg: gw.rollout.GetTrafficSplit(rpb.GetTrafficSplitRequest(model=model),
                                                             timeout=10, metadata=md)


def expired_deadline(gw, model, reg):
    return gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=-1.0)  # already past


def bad_stream(gw, model, reg):
    call = gw.channel.stream_stream("/chimera.v1.PredictionService/PredictStream",
                                    request_serializer=None, response_deserializer=None)
    good = pb.PredictRequest(model=model, dense=GOOD).SerializeToString()
    return list(call(iter([good, b"\xff\xff\xff"]), timeout=30))


def _dense_packed(values: list[float]) -> bytes:
    return field(5, 2, struct.pack(f"<{len(values)}d", *values))


CASES = [
    Case("unknown model", predict(model="no-such-model", dense=GOOD), C.NOT_FOUND, "not a registered model"),
    Case("empty model name", predict(model="", dense=GOOD), C.NOT_FOUND, "model: required"),
    Case("unknown version pinned", predict_md(ADMIN_MD, version=9, dense=GOOD), C.NOT_FOUND, "no version 9"),
    Case("pinned without admin token", predict(version=1, dense=GOOD), C.UNAUTHENTICATED,
         "authorization: missing"),
    Case("pinned with wrong token", predict_md((("authorization", "Bearer nope"),), version=1, dense=GOOD),
         C.UNAUTHENTICATED, "invalid token"),
    Case("missing feature", predict(features={"f0": 1, "f1": 2, "f2": 3}), C.INVALID_ARGUMENT,
         "features['f3']: missing"),
    Case("extra unknown feature", predict(features={"f0": 1, "f1": 2, "f2": 3, "f3": 4, "evil": 5}),
         C.INVALID_ARGUMENT, "features['evil']: unknown feature"),
    Case("no features at all", predict(), C.INVALID_ARGUMENT, "no features given"),
    Case("features and dense both", predict(features={"f0": 1}, dense=GOOD), C.INVALID_ARGUMENT,
         "either features"),
    Case("wrong vector length", predict(dense=[1.0, 2.0, 3.0]), C.INVALID_ARGUMENT, "expected 4 values"),
    Case("NaN", predict(dense=[1.0, math.nan, 3.0, 4.0]), C.INVALID_ARGUMENT, "dense[1]"),
    Case("+Inf", predict(features={"f0": 1, "f1": 2, "f2": math.inf, "f3": 4}), C.INVALID_ARGUMENT,
         "features['f2']: value must be a finite float32"),
    Case("-Inf", predict(dense=[-math.inf, 1.0, 1.0, 1.0]), C.INVALID_ARGUMENT, "finite float32"),
    Case("finite double beyond float32", predict(dense=[1e300, 1.0, 1.0, 1.0]), C.INVALID_ARGUMENT,
         "dense[0] (f0): value must be a finite float32"),
    Case("undecodable bytes", raw_predict(b"\xff\xff\xff\xff"), C.INVALID_ARGUMENT,
         "not a valid chimera.v1.PredictRequest"),
    Case("string where dense doubles go (packed, 3 bytes)", lambda gw, model, reg: raw_predict(
        model_field(model) + field(5, 2, b"abc"))(gw, model, reg), C.INVALID_ARGUMENT,
        "not a valid chimera.v1.PredictRequest"),
    Case("varint where dense doubles go (kept as unknown field)", lambda gw, model, reg: raw_predict(
        model_field(model) + field(5, 0, b"\x05"))(gw, model, reg), C.INVALID_ARGUMENT, "no features given"),
    Case("string as a feature value (entry dropped)", lambda gw, model, reg: raw_predict(
        model_field(model) + field(4, 2, field(1, 2, b"f0") + field(2, 2, b"abc")))(gw, model, reg),
        C.INVALID_ARGUMENT, "no features given"),
    Case("invalid UTF-8 in a string field", raw_predict(string_field(1, b"\xff\xfe")), C.INVALID_ARGUMENT,
         "not a valid chimera.v1.PredictRequest"),
    Case("length prefix beyond the message", raw_predict(b"\x0a\x80\x80\x80\x80\x10"), C.INVALID_ARGUMENT,
         "not a valid chimera.v1.PredictRequest"),
    Case("empty batch", batch(0), C.INVALID_ARGUMENT, "rows: empty batch"),
    Case("batch over the row limit", batch(10_001), C.INVALID_ARGUMENT, "limit 10000"),
    Case("message over the size limit", predict(routing_key="k" * (17 * 1024 * 1024)), C.RESOURCE_EXHAUSTED,
         "larger than max"),
    Case("routing key over its length limit", predict(routing_key="k" * 257, dense=GOOD), C.INVALID_ARGUMENT,
         "routing_key: longer than 256"),
    Case("request id over its length limit", predict(request_id="r" * 129, dense=GOOD), C.INVALID_ARGUMENT,
         "request_id: longer than 128"),
    Case("deadline already expired when sent", expired_deadline, C.DEADLINE_EXCEEDED, "deadline exceeded"),
    Case("outcome for an unknown request id", outcome("never-scored", 1.0), C.NOT_FOUND,
         "no prediction with id 'never-scored'"),
    Case("conflicting outcome", outcome(None, 0.0, first=1.0), C.ALREADY_EXISTS, "already stored as 1.0"),
    Case("outcome that is not finite", outcome("x", math.nan), C.INVALID_ARGUMENT, "value: must be finite"),
    Case("outcome without request id", outcome("", 1.0), C.INVALID_ARGUMENT, "request_id: required"),
    Case("outcome request id over its length limit", outcome("r" * 129, 1.0), C.INVALID_ARGUMENT,
         "request_id: longer than 128"),
    Case("undecodable outcome", lambda gw, model, reg: raw_unary(
        gw.channel, "/chimera.v1.PredictionService/RecordOutcome")(b"\x11\x00", timeout=30),
        C.INVALID_ARGUMENT, "not a valid chimera.v1.RecordOutcomeRequest"),
    Case("malformed stream message", bad_stream, C.INVALID_ARGUMENT, "not a valid chimera.v1.PredictRequest"),
    Case("split with a negative weight", set_split([(2, -10), (1, 110)]), C.INVALID_ARGUMENT,
         "within 0..100, got -10"),
    Case("split not summing to 100", set_split([(1, 90), (2, 20)]), C.INVALID_ARGUMENT,
         "sum to 100, got 110"),
    Case("split with a duplicate version", set_split([(1, 50), (1, 50)]), C.INVALID_ARGUMENT,
         "version 1 appears twice"),
    Case("split with an unknown version", set_split([(1, 90), (7, 10)]), C.INVALID_ARGUMENT,
         "version 7 does not exist"),
    Case("split with a stale revision", set_split([(1, 100)], stale=True), C.ABORTED, "expected_revision"),
    Case("admin call without token", get_split(None), C.UNAUTHENTICATED, "authorization: missing"),
    Case("admin call with a wrong token", get_split((("authorization", "Bearer wrong"),)), C.UNAUTHENTICATED,
         "invalid token"),
    Case("admin call with a malformed token", get_split((("authorization", ADMIN_TOKEN),)), C.UNAUTHENTICATED,
         "malformed"),
    Case("admin call with an empty bearer token", get_split((("authorization", "Bearer "),)),
         C.UNAUTHENTICATED, "malformed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_matrix(served, case: Case) -> None:
    gw, model, reg = served
    with pytest.raises(grpc.RpcError) as err:
        case.call(gw, model, reg)
    assert err.value.code() == case.code, (err.value.code(), err.value.details())
    assert case.message.lower() in (err.value.details() or "").lower(), err.value.details()
    still_serving(gw, model)


def test_deadline_expired_on_arrival_at_the_server(served) -> None:
    """A request whose grpc-timeout (1 ns) has passed when the server reads it: DEADLINE_EXCEEDED from
    the server (the grpc client library would not even send it)."""
    gw, model, _ = served
    body = pb.PredictRequest(model=model, dense=GOOD).SerializeToString()
    # The message follows its headers 20 ms later: the deadline has passed when the server reads it,
    # whatever the clocks' granularity. Every call: DEADLINE_EXCEEDED.
    late = [raw_h2_call(gw.port, PREDICT, body, [(b"grpc-timeout", b"1n")], body_delay_s=0.02)
            .get(b"grpc-status") for _ in range(10)]
    assert late == [b"4"] * 10, late
    # Sent at once: gRPC core keeps deadlines on a millisecond clock, rounded up, so a call read and
    # answered within that millisecond had time (frequent since a Predict takes ~0.5 ms over a
    # replica's local channel). Never any other status.
    statuses = [raw_h2_call(gw.port, PREDICT, body, [(b"grpc-timeout", b"1n")]).get(b"grpc-status")
                for _ in range(10)]
    assert set(statuses) <= {b"4", b"0"}, statuses  # DEADLINE_EXCEEDED (or answered in time)
    still_serving(gw, model)


def test_split_unchanged_by_rejected_changes(served) -> None:
    gw, model, reg = served
    split = reg.get_split(model)
    assert dict(split.weights) == {1: 100}
    assert all(a["actor"] == "test" for a in reg.audit_log(model))


def test_duplicated_feature_name_keeps_the_last_value(served) -> None:
    """A protobuf map cannot carry a name twice, but its wire form can: protobuf keeps the last entry,
    and so the gateway scores the row with the last value (documented in README.md, "Failure modes")."""
    gw, model, _ = served
    body = model_field(model) + b"".join(map_entry(4, f"f{i}".encode(), v) for i, v in enumerate(GOOD))
    duplicated = body + map_entry(4, b"f0", 99.0) + map_entry(4, b"f0", GOOD[0])
    got = pb.PredictResponse.FromString(raw_unary(gw.channel, PREDICT)(duplicated, timeout=30))
    expected = gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD), timeout=30)
    assert got.score == pytest.approx(expected.score, abs=1e-9)
    last_wins = body + map_entry(4, b"f1", 5.0)  # f1 again, after all four names
    changed = pb.PredictResponse.FromString(raw_unary(gw.channel, PREDICT)(last_wins, timeout=30))
    five = gw.predict.Predict(pb.PredictRequest(model=model, dense=[GOOD[0], 5.0, GOOD[2], GOOD[3]]),
                              timeout=30)
    assert changed.score == pytest.approx(five.score, abs=1e-9)


def test_non_utf8_and_control_characters_in_metadata(served) -> None:
    """Header values no grpc library sends (bytes beyond ASCII on a non -bin key, control characters)
    arrive over raw HTTP/2: the token check refuses them, the audit actor is cleaned, and the gateway
    keeps serving."""
    gw, model, reg = served
    get = "/chimera.v1.RolloutService/GetTrafficSplit"
    msg = rpb.GetTrafficSplitRequest(model=model).SerializeToString()
    for value in (b"Bearer \xff\xfe\x80", b"Bearer " + ADMIN_TOKEN.encode() + b"\xff", b"\xc3\x28"):
        out = raw_h2_call(gw.port, get, msg, [(b"authorization", value)])
        assert out.get(b"grpc-status") == b"16", out  # UNAUTHENTICATED
    ok = raw_h2_call(gw.port, PREDICT, pb.PredictRequest(model=model, dense=GOOD).SerializeToString(),
                     [(b"x-chimera-actor", b"\xff\xfe"), (b"user-agent", b"\x80\x81")])
    assert ok.get(b"grpc-status") == b"0", ok
    # An actor name with a line break cannot forge audit-log lines.
    split = reg.get_split(model)
    body = rpb.SetTrafficSplitRequest(model=model, expected_revision=split.revision, reason="actor test",
                                      weights=[rpb.VersionWeight(version=1, weight=100)]).SerializeToString()
    out = raw_h2_call(gw.port, "/chimera.v1.RolloutService/SetTrafficSplit", body,
                      [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                       (b"x-chimera-actor", b"mallory\nINFO forged line\x00")])
    assert out.get(b"grpc-status") == b"0", out
    actor = reg.audit_log(model)[-1]["actor"]
    assert "\n" not in actor and "\x00" not in actor and actor.startswith("mallory")
    still_serving(gw, model)


# ---------------------------------------------------------------------------------------------- fuzz
FINE = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAUTHENTICATED, C.FAILED_PRECONDITION,
        C.RESOURCE_EXHAUSTED}
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 3.5e38]))
names = st.one_of(st.sampled_from(["f0", "f1", "f2", "f3"]), st.text(max_size=8))


@st.composite
def predict_bytes(draw, model: str) -> bytes:
    kind = draw(st.sampled_from(["random", "valid", "message", "mutated", "spliced"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "valid":  # well-formed and scorable, but with odd ids and extreme (finite) values
        finite = st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_infinity=False)
        return pb.PredictRequest(model=model, routing_key=draw(st.text(max_size=256)),
                                 request_id=draw(st.text(max_size=128)),
                                 dense=draw(st.lists(finite, min_size=4, max_size=4))).SerializeToString()
    req = pb.PredictRequest(
        model=draw(st.one_of(st.just(model), st.sampled_from(["", "nope"]), st.text(max_size=20))),
        routing_key=draw(st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=300))),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=140))),
        version=draw(st.sampled_from([0, 0, 0, 1, 2, 99, -1, 2**31 - 1])),
    )
    if draw(st.booleans()):
        req.dense.extend(draw(st.lists(doubles, max_size=8)))
    else:
        req.features.update(draw(st.dictionaries(names, doubles, max_size=6)))
    data = req.SerializeToString()
    if kind == "mutated" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif kind == "spliced":
        data = data[:draw(st.integers(0, len(data)))] + draw(st.binary(max_size=32))
    return data


def test_fuzz_predict_bytes_never_crash_or_internal(served) -> None:
    gw, model, _ = served
    call = raw_unary(gw.channel, PREDICT)
    seen: dict[str, int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=predict_bytes(model))
    def one(data: bytes) -> None:
        try:
            call(data, timeout=30)
            code = C.OK
        except grpc.RpcError as exc:
            code = exc.code()
            # Extreme but finite features can make the model's score NaN/inf: never answered OK, the
            # row fails as the replica's fault (gateway.serving.batcher.NonFiniteScore), only that row.
            nonfinite = code == C.UNAVAILABLE and "non-finite score" in (exc.details() or "")
            assert code in FINE or nonfinite, (code, exc.details(), data)
            assert exc.details(), (code, data)
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen
    still_serving(gw, model)


# ---------------------------------------------------------------------------------------------- Predict token
def test_predict_token_required_when_configured(served, tmp_path: Path) -> None:
    """A gateway with predict_token answers PredictionService calls only with that token (or the admin
    token), compared in constant time; health stays open for load balancers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, model, reg = served
    gw = GatewayThread(reg.url, tmp_path, controller_interval_s=0, predict_token=PREDICT_TOKEN).start()
    try:
        req = pb.PredictRequest(model=model, dense=GOOD)
        for md, message in ((None, "authorization: missing"),
                            ((("authorization", "Bearer wrong"),), "invalid token"),
                            ((("authorization", PREDICT_TOKEN),), "malformed")):
            with pytest.raises(grpc.RpcError) as err:
                gw.predict.Predict(req, timeout=30, metadata=md)
            assert err.value.code() == C.UNAUTHENTICATED and message in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id="x", value=1), timeout=30)
        assert err.value.code() == C.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(gw.predict.PredictStream(iter([req]), timeout=30))
        assert err.value.code() == C.UNAUTHENTICATED
        # Undecodable bytes without a token: still INVALID_ARGUMENT, never UNKNOWN.
        with pytest.raises(grpc.RpcError) as err:
            raw_unary(gw.channel, PREDICT)(b"\xff\xff", timeout=30)
        assert err.value.code() in (C.INVALID_ARGUMENT, C.UNAUTHENTICATED)
        md = (("authorization", f"Bearer {PREDICT_TOKEN}"),)
        assert gw.predict.Predict(req, timeout=30, metadata=md).version == 1
        assert [r.prediction.version for r in gw.predict.PredictStream(iter([req]), timeout=30, metadata=md)
                ] == [1]
        assert gw.predict.Predict(req, timeout=30, metadata=ADMIN_MD).version == 1  # admins may predict
        with pytest.raises(grpc.RpcError) as err:  # the Predict token does not pin versions
            gw.predict.Predict(pb.PredictRequest(model=model, dense=GOOD, version=1), timeout=30, metadata=md)
        assert err.value.code() == C.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gw.stop(undeploy=False)
