"""Feature logging through a real Predict: the gateway writes each scored row's feature vector
(float32-exact, in the schema order of the version that scored it) into `predictions.features`, for
a sampled fraction of the rows (GatewayConfig.log_features_sample, `chimera serve
--log-features-sample`, CHIMERA_LOG_FEATURES_SAMPLE).

The canary has a different feature set and order from the baseline (v1: f0 f1 f2 f3; v2: g f3 f1 f0),
so a row logged in the wrong schema order, or in the request's order, does not match. Feature values
are float64 that float32 cannot hold exactly: what is logged must be the float32 row that was scored."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from chimera.cli import app
from chimera.settings import Settings
from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from registry.models import Prediction
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx

V1 = ("f0", "f1", "f2", "f3")
V2 = ("g", "f3", "f1", "f0")
ALL = ("f0", "f1", "f2", "f3", "g")
Rows = Sequence[dict[str, float]]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            ray_cluster: None):  # a parameter, not getfixturevalue: the Ray group sees it (tests/conftest.py)
    """One registry per backend with a model at 50/50 whose two versions have different schemas. The
    gateways of this module leave the replicas deployed for the next one; the last removes them."""
    tmp = tmp_path_factory.mktemp("features-" + request.param)
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    model = "fl" + uuid.uuid4().hex[:8]
    b1, _ = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2)
    reg.publish_version(model, b1, V1, status="production")
    reg.publish_version(model, b2, V2, status="canary")
    reg.set_split(model, {1: 50, 2: 50}, expected_revision=0, actor="test")
    yield reg, url, tmp, model
    from replicas.deployment import undeploy_version

    for version in (1, 2):
        with contextlib.suppress(Exception):
            undeploy_version(model, version)
    reg.dispose()


@contextlib.contextmanager
def serving(backend, sample: float) -> Iterator[GatewayThread]:  # noqa: ANN001
    reg, url, tmp, _ = backend
    gw = GatewayThread(url, tmp / f"gw-{sample}", controller_interval_s=0.0,
                       log_features_sample=sample).start()
    try:
        yield gw
    finally:
        gw.stop(undeploy=False)


def named_rows(n: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """Rows carrying the union of both versions' features, as float64 that float32 rounds."""
    x = rng.normal(scale=3.0, size=(n, len(ALL)))
    return [dict(zip(ALL, map(float, row), strict=True)) for row in x]


def new_ids(n: int, prefix: str) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"{prefix}-{tag}-{i}" for i in range(n)]


class Sent:
    """What was asked and answered, per request id: the features sent and the version and score."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float] | np.ndarray] = {}
        self.answers: dict[str, tuple[int, float]] = {}

    def unary(self, gw: GatewayThread, model: str, rows: Rows, prefix: str) -> list[str]:
        ids = new_ids(len(rows), prefix)
        for start in range(0, len(rows), 50):  # 50 calls in flight at a time
            futures = [gw.predict.Predict.future(
                pb.PredictRequest(model=model, request_id=rid, routing_key=rid, features=row), timeout=60)
                for rid, row in zip(ids[start:start + 50], rows[start:start + 50], strict=True)]
            for rid, row, fut in zip(ids[start:start + 50], rows[start:start + 50], futures, strict=True):
                resp = fut.result()
                assert resp.request_id == rid
                self.rows[rid] = row
                self.answers[rid] = (resp.version, resp.score)
        return ids

    def batch(self, gw: GatewayThread, model: str, rows: Rows, prefix: str) -> list[str]:
        ids = new_ids(len(rows), prefix)
        resp = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, rows=[
            pb.PredictRequest(request_id=rid, routing_key=rid, features=row)
            for rid, row in zip(ids, rows, strict=True)]), timeout=60)
        assert [r.request_id for r in resp.results] == ids
        for rid, row, r in zip(ids, rows, resp.results, strict=True):
            self.rows[rid] = row
            self.answers[rid] = (r.version, r.score)
        return ids

    def packed(self, gw: GatewayThread, model: str, x: np.ndarray, prefix: str) -> list[str]:
        """Dense rows in the scoring version's own schema order (both versions are 4 wide)."""
        ids = new_ids(len(x), prefix)
        resp = gw.predict.PredictBatch(pb.PredictBatchRequest(model=model, matrix=pb.DenseMatrix(
            f32=x.astype("<f4").tobytes(), cols=x.shape[1], routing_keys=ids, request_ids=ids)), timeout=60)
        assert list(resp.request_ids) == ids
        for i, rid in enumerate(ids):
            self.rows[rid] = x[i]
            self.answers[rid] = (resp.versions[i], resp.scores[i])
        return ids

    def expected(self, rid: str, version: int) -> np.ndarray:
        row = self.rows[rid]
        if isinstance(row, np.ndarray):
            return row.astype(np.float32)
        return np.array([row[n] for n in (V1 if version == 1 else V2)], dtype=np.float32)


def logged(reg: Registry, ids: Sequence[str]) -> dict[str, tuple[int, float, Any]]:
    """request id -> (version, score, features as stored) straight from the predictions table."""
    out: dict[str, tuple[int, float, Any]] = {}
    with reg.session() as s:
        for start in range(0, len(ids), 500):
            q = (select(Prediction.request_id, Prediction.version, Prediction.score, Prediction.features)
                 .where(Prediction.request_id.in_(ids[start:start + 500])))
            out.update({rid: (v, score, feats) for rid, v, score, feats in s.execute(q).tuples()})
    return out


def check_logged(reg: Registry, sent: Sent, ids: Sequence[str]) -> dict[str, Any]:
    """Every request has its prediction row (version and score as answered); every stored feature vector
    is exactly the float32 row that was scored, in that version's schema order. Returns the features."""
    rows = logged(reg, ids)
    assert sorted(rows) == sorted(ids), f"{len(set(ids) - set(rows))} predictions missing"
    features = {}
    for rid in ids:
        version, score, feats = rows[rid]
        assert (version, score) == sent.answers[rid], rid
        features[rid] = feats
        if feats is None:
            continue
        want = sent.expected(rid, version)
        got = np.array(feats, dtype=np.float64)
        assert got.shape == want.shape, (rid, feats)
        # float32-exact: each stored number reads back as the very float32 that was scored
        same = np.array_equal(got.astype(np.float32).view(np.uint32), want.view(np.uint32))
        assert same, (rid, feats, want)
    return features


def test_every_scored_row_is_logged_with_its_feature_vector(backend) -> None:
    reg, _, _, model = backend
    rng = np.random.default_rng(1)
    sent = Sent()
    with serving(backend, 1.0) as gw:
        ids = sent.unary(gw, model, named_rows(60, rng), "unary")
        ids += sent.batch(gw, model, named_rows(200, rng), "rows")
        ids += sent.packed(gw, model, rng.normal(scale=3.0, size=(200, 4)), "packed")
        gw.gateway.log.flush()
    features = check_logged(reg, sent, ids)
    assert all(f is not None for f in features.values())
    versions = {rid: sent.answers[rid][0] for rid in ids}
    assert set(versions.values()) == {1, 2}  # both schemas were exercised
    # Spelled out once for a canary row: its own order (g, f3, f1, f0), not the request's or v1's.
    rid = next(r for r in ids if r.startswith("unary") and versions[r] == 2)
    row = sent.rows[rid]
    stored = np.array(features[rid], dtype=np.float32)
    assert np.array_equal(stored, np.float32([row["g"], row["f3"], row["f1"], row["f0"]]))
    assert not np.array_equal(stored, np.float32([row[n] for n in V1]))


def test_sample_zero_logs_the_predictions_without_features(backend) -> None:
    reg, _, _, model = backend
    rng = np.random.default_rng(2)
    sent = Sent()
    with serving(backend, 0.0) as gw:
        ids = sent.unary(gw, model, named_rows(40, rng), "unary0")
        ids += sent.batch(gw, model, named_rows(150, rng), "rows0")
        ids += sent.packed(gw, model, rng.normal(size=(150, 4)), "packed0")
        gw.gateway.log.flush()
    features = check_logged(reg, sent, ids)  # every prediction is there, with its version and score
    assert all(f is None for f in features.values())


def test_sampled_fraction_is_binomial(backend) -> None:
    from scipy.stats import binom

    reg, _, _, model = backend
    rng = np.random.default_rng(3)
    sent = Sent()
    p = 0.3
    with serving(backend, p) as gw:
        unary = sent.unary(gw, model, named_rows(500, rng), "unary3")
        batch: list[str] = []
        for _ in range(3):
            batch += sent.batch(gw, model, named_rows(250, rng), "rows3")
            batch += sent.packed(gw, model, rng.normal(size=(250, 4)), "packed3")
        gw.gateway.log.flush()
    features = check_logged(reg, sent, unary + batch)  # the sampled rows are exact too

    def sampled(ids: list[str]) -> int:
        return sum(features[rid] is not None for rid in ids)

    n = len(unary) + len(batch)
    lo, hi = binom.interval(0.999, n, p)
    assert lo <= sampled(unary) + sampled(batch) <= hi, (sampled(unary), sampled(batch), n, lo, hi)
    # Each path samples on its own (the unary and the batch path draw differently): a wider interval
    # for each, so the three checks together still fail by chance well under 1 in 1000.
    for ids in (unary, batch):
        lo, hi = binom.interval(0.9999, len(ids), p)
        assert lo <= sampled(ids) <= hi, (sampled(ids), len(ids), lo, hi)


# ---------------------------------------------------------------- configuring the fraction
def test_sample_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "CHIMERA_LOG_FEATURES_SAMPLE"
    monkeypatch.delenv(name, raising=False)
    assert Settings.from_env().log_features_sample == 1.0
    for text, fraction in (("0", 0.0), ("0.3", 0.3), (" 1 ", 1.0), ("", 1.0)):
        monkeypatch.setenv(name, text)
        assert Settings.from_env().log_features_sample == fraction
    for bad in ("-0.1", "1.5", "half", "nan"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}: .* is not a fraction within \\[0, 1\\]"):
            Settings.from_env()


def test_chimera_serve_passes_the_sample_to_the_gateway(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`chimera serve` up to the GatewayConfig it builds (Ray and the serving loop replaced), and the
    Predictor a Gateway builds from that config."""
    monkeypatch.chdir(tmp_path)
    configs: list[Any] = []

    async def serve_forever(config) -> None:  # noqa: ANN001
        configs.append(config)

    monkeypatch.setattr("gateway.server.serve_forever", serve_forever)
    monkeypatch.setattr("gateway.server.ensure_ray", lambda *a, **k: None)
    env = {"CHIMERA_REGISTRY_URL": f"sqlite:///{tmp_path / 'serve.db'}", "CHIMERA_ADMIN_TOKEN": ADMIN_TOKEN,
           "COLUMNS": "200", "CHIMERA_LOG_FEATURES_SAMPLE": "", "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S": ""}

    def run(args: list[str], **extra: str) -> tuple[int, str]:
        res = CliRunner().invoke(app, ["serve", "--loop", "asyncio", "--metrics-port", "0", *args],
                                 env={**env, **extra})
        if res.exception and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, re.sub(r"\s+", " ", res.output)

    assert run([])[0] == 0 and configs[-1].log_features_sample == 1.0
    assert run([], CHIMERA_LOG_FEATURES_SAMPLE="0.25")[0] == 0 and configs[-1].log_features_sample == 0.25
    assert run(["--log-features-sample", "0"], CHIMERA_LOG_FEATURES_SAMPLE="0.25")[0] == 0
    assert configs[-1].log_features_sample == 0.0  # the option wins over the environment
    assert run(["--log-features-sample", "0.3"])[0] == 0
    code, out = run(["--log-features-sample", "1.5"])
    assert code == 2 and "--log-features-sample: 1.5 is not a fraction within [0, 1]" in out
    code, out = run([], CHIMERA_LOG_FEATURES_SAMPLE="all")
    assert code == 2 and "CHIMERA_LOG_FEATURES_SAMPLE: 'all' is not a fraction within [0, 1]" in out
    assert len(configs) == 4

    from gateway.server import Gateway

    gateway = Gateway(configs[-1])
    try:
        assert gateway.predictor.log_features_sample == 0.3
    finally:
        gateway.registry.dispose()
