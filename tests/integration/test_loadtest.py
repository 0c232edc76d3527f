"""Load generator, SLO gate, report and promotion precondition.

Most tests run against a tiny grpc.aio PredictionService written here (fast, fully controlled: it can
stall for exactly one second); the pinned-version tests run against a real gateway with Ray Serve
replicas. Nothing asserts speed beyond what the tests control (the stall): other engineers run test
suites on the same two cores."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from chimera.cli import app
from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from loadtest.histogram import (
    count_above_ms,
    decode,
    encode,
    merge,
    new_histogram,
    record_seconds,
    summary_ms,
)
from loadtest.payload import from_file, from_schema
from loadtest.runner import LoadTestConfig, run_load_test
from loadtest.schedule import worker_schedule
from loadtest.slo import EXIT_SLO_FAILED, SLO, evaluate_slo
from registry import Registry, ValidationError
from registry.errors import PreconditionFailed, RegistryError
from registry.loadtests import (
    latest_passing_load_test,
    list_load_tests,
    record_load_test,
    require_passing_loadtest,
)
from registry.models import utcnow
from tests.conftest import BACKENDS, fresh_registry_url
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx

runner = CliRunner()
ENV = {"COLUMNS": "200", "CHIMERA_REGISTRY_URL": "", "CHIMERA_ADMIN_TOKEN": ""}


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------- a controllable server
class FakePredictionService(pb_grpc.PredictionServiceServicer):
    """Answers instantly with the pinned version (or 1). With `stall_after=N`, the first call after N
    calls starts a stall of `stall_s`: every call arriving before it ends waits until it ends, like a
    GC pause or a blocked event loop. It stalls once. `ignore_pin` answers every call as version 1."""

    def __init__(self, stall_after: int | None = None, stall_s: float = 1.0,
                 ignore_pin: bool = False) -> None:
        self.stall_after = stall_after
        self.stall_s = stall_s
        self.ignore_pin = ignore_pin
        self.calls = 0
        self.stall_until: float | None = None

    async def Predict(self, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        self.calls += 1
        now = time.monotonic()
        if self.stall_after is not None and self.stall_until is None and self.calls > self.stall_after:
            self.stall_until = now + self.stall_s
        if self.stall_until is not None and now < self.stall_until:
            await asyncio.sleep(self.stall_until - now)
        if not request.features and not request.dense:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "features: no features given")
        return pb.PredictResponse(request_id=request.request_id or uuid.uuid4().hex, model=request.model,
                                  version=1 if self.ignore_pin else (request.version or 1), score=0.5)


class FakeServer:
    def __init__(self, servicer: FakePredictionService) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> FakeServer:
        self._thread.start()

        async def start() -> int:
            self.server = grpc.aio.server()
            pb_grpc.add_PredictionServiceServicer_to_server(self.servicer, self.server)
            port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            return port

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    with FakeServer(FakePredictionService()) as server:
        yield server


ROWS = [{"f0": 0.1, "f1": -0.2, "f2": 0.3, "f3": 1.0}]


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty directory: `chimera loadtest` falls back to ./chimera.db when it exists, and
    a developer's demo registry must neither answer nor collect these tests' runs."""
    monkeypatch.chdir(tmp_path)


def test_git_revision_names_the_checkout() -> None:
    from loadtest.report import git_revision

    root = Path(__file__).resolve().parents[2]
    rev = git_revision(root)
    if (root / ".git").exists():
        assert rev is not None and re.fullmatch(r"[0-9a-f]{40}", rev["commit"])
        assert isinstance(rev["dirty"], bool)
    assert git_revision("/") is None


# ---------------------------------------------------------------- pure units
def test_constant_schedule_split_over_workers_is_evenly_spaced() -> None:
    merged = sorted(t for w in range(3) for t in worker_schedule(100.0, 2.0, w, 3, "constant"))
    assert len(merged) == 200
    assert merged == pytest.approx([k / 100.0 for k in range(200)])


def test_poisson_schedule_has_the_target_rate_and_is_reproducible() -> None:
    a = [t for w in range(2) for t in worker_schedule(1000.0, 10.0, w, 2, "poisson", seed=7)]
    b = [t for w in range(2) for t in worker_schedule(1000.0, 10.0, w, 2, "poisson", seed=7)]
    assert a == b
    assert 9_500 < len(a) < 10_500  # Poisson(10,000): sd 100
    assert all(0 <= t < 10.0 for t in a)
    with pytest.raises(ValueError, match="arrival"):
        list(worker_schedule(10.0, 1.0, 0, 1, "bursty"))  # type: ignore[arg-type]


def test_histograms_merge_exactly_across_workers() -> None:
    parts = []
    whole = new_histogram()
    for w in range(3):
        h = new_histogram()
        for i in range(1, 1001):
            record_seconds(h, (i + w * 1000) / 1e4)
            record_seconds(whole, (i + w * 1000) / 1e4)
        parts.append(encode(h))
    merged = merge(parts)
    assert summary_ms(merged) == summary_ms(whole)
    assert summary_ms(decode(encode(merged))) == summary_ms(whole)
    assert merged.get_total_count() == 3000
    assert count_above_ms(merged, 200.0) == pytest.approx(1000, abs=2)


def test_slo_evaluation_names_each_failed_objective() -> None:
    latency = {"p50": 2.0, "p90": 4.0, "p99": 9.0, "p99_9": 20.0, "max": 25.0}
    ok = evaluate_slo(SLO(p99_ms=50, p50_ms=5), latency_ms=latency, error_rate=0.0, achieved_ratio=1.0)
    assert ok == []
    failures = evaluate_slo(SLO(p99_ms=0.001, max_error_rate=0.01, min_achieved_ratio=0.9),
                            latency_ms=latency, error_rate=0.05, achieved_ratio=0.5, target_rps=100)
    assert len(failures) == 3
    assert "p99 latency 9.000 ms exceeds the SLO of 0.001 ms" in failures[0]
    assert "error rate 5.00%" in failures[1]
    assert "achieved rate 50.0% of the target 100 req/s" in failures[2]
    none = evaluate_slo(SLO(p99_ms=10), latency_ms={"p99": None}, error_rate=1.0, achieved_ratio=1.0)
    assert "no successful response" in none[0]


def test_payload_from_schema_uses_synthetic_signals_when_names_match(tmp_path: Path) -> None:
    p = from_schema(["signal_strength", "spread_bp", "noise_1"], n_rows=50)
    assert p.source == "synthetic_signals" and len(p.rows) == 50
    assert all(r["spread_bp"] > 0 for r in p.rows)  # the generator's scale, not N(0, 1)
    mixed = from_schema(["signal_strength", "zzz"], n_rows=10)
    assert mixed.source.startswith("synthetic_signals (1 of 2")
    assert from_schema(["a", "b"], n_rows=10).source == "N(0,1)"
    csv = tmp_path / "rows.csv"
    csv.write_text("timestamp,f0,f1,label,extra\n2024-01-01,1,2,0,9\n2024-01-02,3,,1,9\n2024-01-03,5,6,1,9\n")
    by_schema = from_file(csv, ["f0", "f1"])
    assert by_schema.rows == ({"f0": 1.0, "f1": 2.0}, {"f0": 5.0, "f1": 6.0})  # the row with a gap is skipped
    assert from_file(csv).feature_names == ("f0", "f1", "extra")  # no label, no timestamp
    with pytest.raises(ValueError, match="lacks feature column"):
        from_file(csv, ["f0", "nope"])


# ---------------------------------------------------------------- coordinated omission
def test_a_one_second_stall_shows_in_the_open_loop_p99() -> None:
    """200 req/s for 3 s; the server stalls once for 1 s about a second in. Every request whose
    intended send time falls in the first 0.7 s of the stall cannot finish before the stall ends, so
    at least ~140 of ~600 requests take >= 300 ms and p99 is close to the full second, although only
    the requests of that second were ever in flight. A closed-loop client (send, wait, send) records
    the same stall as one slow request."""
    rps, duration = 200.0, 3.0
    with FakeServer(FakePredictionService(stall_after=int(rps))) as server:
        result = run_load_test(LoadTestConfig(target=server.target, model="m", rps=rps, duration_s=duration,
                                              workers=1), ROWS)
    assert server.servicer.stall_until is not None, "the stall never happened"
    assert result.error_count == 0, result.errors
    slow = count_above_ms(result.hist, 300.0)
    lat = result.latency_ms()
    assert slow >= 100, f"only {slow} requests >= 300 ms; latency {lat}"
    assert lat["p99"] is not None and lat["p99"] >= 500.0, lat
    assert lat["max"] >= 700.0, lat
    # the stall is visible in the time series too: the bucket in which it began has a p99 near 1 s
    assert max(v for v in result.series["p99_ms"] if v is not None) >= 500.0

    closed: list[float] = []
    with FakeServer(FakePredictionService(stall_after=20)) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            t0 = time.monotonic()
            stub.Predict(pb.PredictRequest(model="m", features=ROWS[0]), timeout=10)
            closed.append(time.monotonic() - t0)
    closed_slow = sum(1 for x in closed if x >= 0.3)
    assert max(closed) >= 0.5, "the closed-loop client should have hit the stall too"
    # By construction at most duration / 0.3 = 10 slow samples fit in a closed loop; it saw the stall
    # as (about) one sample out of len(closed), against >= 100 for the open loop.
    assert closed_slow <= 10 < slow


def test_concurrency_limit_queues_arrivals_and_counts_their_wait() -> None:
    """Limit 1 against a 1 s stall: arrivals queue behind the stalled call instead of being sent;
    their latency still counts from the intended time, and the wait shows as send lag."""
    with FakeServer(FakePredictionService(stall_after=50)) as server:
        result = run_load_test(LoadTestConfig(target=server.target, model="m", rps=100.0, duration_s=2.0,
                                              concurrency_limit=1, workers=1), ROWS)
    assert result.peak_in_flight == 1
    assert count_above_ms(result.hist, 300.0) >= 50
    assert summary_ms(result.send_lag)["max"] >= 500.0


# ---------------------------------------------------------------- CLI, report, gate
def _cli(args: list[str], **env: str) -> tuple[int, str]:
    """Run `chimera loadtest`. Unless a test sets them, no warmup (saves time) and no achieved-rate
    objective: on a shared 2-core machine the rate a short run reaches is not this test's to control."""
    defaults = {"--warmup": "0", "--min-achieved-ratio": "0"}
    args = [*args, *(x for k, v in defaults.items() if k not in args for x in (k, v))]
    res = runner.invoke(app, ["loadtest", *args], env={**ENV, **env})
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, flat(res.output)


def test_impossible_slo_fails_with_exit_3_and_says_why(fake_server: FakeServer, tmp_path: Path) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("f0,f1\n1,2\n3,4\n")
    code, out = _cli(["--target", fake_server.target, "--model", "m", "--rps", "50", "--duration", "1",
                      "--data", str(data), "--slo-p99-ms", "0.001", "--report", str(tmp_path / "r.json")])
    assert code == EXIT_SLO_FAILED, out
    assert "FAIL" in out and "p99 latency" in out and "exceeds the SLO of 0.001 ms" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False
    assert report["failures"] and "p99 latency" in report["failures"][0]
    assert "not stored" in out  # no registry given


def test_loose_slo_passes_and_report_holds_every_field(fake_server: FakeServer, tmp_path: Path) -> None:
    data = tmp_path / "rows.parquet"
    import pandas as pd

    pd.DataFrame({"f0": [1.0, 2.0], "f1": [0.5, 0.25]}).to_parquet(data)
    code, out = _cli(["--target", fake_server.target, "--model", "m", "--rps", "80", "--duration", "1.5",
                      "--warmup", "0.5", "--arrival", "poisson", "--data", str(data), "--slo-p99-ms", "60000",
                      "--slo-p50-ms", "60000", "--max-error-rate", "0", "--min-achieved-ratio", "0",
                      "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert code == 0, out
    assert "PASS" in out and "latency p99" in out and "achieved rate" in out
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("model", "version", "target", "git_revision", "started_at", "config", "target_rps",
                "achieved_rps", "requests", "latency_ms", "errors_by_code", "percentile_curve_ms",
                "timeseries", "histogram", "slo", "passed", "failures", "send_lag_ms"):
        assert key in r, key
    assert r["model"] == "m" and r["target"] == fake_server.target and r["passed"] is True
    assert r["git_revision"] is None or re.fullmatch(r"[0-9a-f]{40}", r["git_revision"])
    assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "p99_9", "max"}
    assert r["slo"] == {"p50_ms": 60000, "p99_ms": 60000, "max_error_rate": 0, "min_achieved_ratio": 0}
    assert r["config"]["arrival"] == "poisson" and r["config"]["warmup_s"] == 0.5
    assert r["requests"]["ok"] == r["requests"]["scheduled"] > 0
    assert r["errors_by_code"] == {}
    assert r["achieved_rps"] > 0 and r["target_rps"] == 80
    ts = r["timeseries"]
    assert ts["bucket_s"] == 1.0 and len(ts["t_s"]) >= 2
    assert sum(ts["scheduled"]) >= r["requests"]["scheduled"]  # warmup arrivals are in the series only
    assert decode(r["histogram"]["data"]).get_total_count() == r["requests"]["ok"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_counted_by_code(fake_server: FakeServer, tmp_path: Path) -> None:
    """The fake server rejects a row without features: every request fails INVALID_ARGUMENT, so the
    default error-rate SLO fails the run. (Priming is skipped through the API to get that far.)"""
    result = run_load_test(LoadTestConfig(target=fake_server.target, model="m", rps=50, duration_s=1,
                                          workers=1, prime=False), [{}])
    assert result.ok == 0 and result.errors == {"INVALID_ARGUMENT": result.scheduled}
    assert "features" in result.error_messages["INVALID_ARGUMENT"]
    failures = evaluate_slo(SLO(p99_ms=100), latency_ms=result.latency_ms(), error_rate=result.error_rate,
                            achieved_ratio=result.achieved_ratio)
    assert any("error rate 100.00%" in f for f in failures)


def test_a_gateway_that_ignores_the_pin_is_caught() -> None:
    from loadtest.runner import LoadTestError

    with FakeServer(FakePredictionService(ignore_pin=True)) as server:
        config = LoadTestConfig(target=server.target, model="m", rps=20, duration_s=1, version=2, workers=1)
        with pytest.raises(LoadTestError, match="ignored the pinned version: asked for 2, answered by 1"):
            run_load_test(config, ROWS)
        result = run_load_test(replace(config, prime=False), ROWS)
    assert result.ok == 0 and result.errors == {"WRONG_VERSION": result.scheduled}


def test_unreachable_target_and_missing_token_fail_clearly(tmp_path: Path) -> None:
    from loadtest.runner import LoadTestError

    with pytest.raises(LoadTestError, match="cannot connect to 127.0.0.1:1 within 1 s"):
        run_load_test(LoadTestConfig(target="127.0.0.1:1", model="m", rps=10, duration_s=1,
                                     connect_timeout_s=1), ROWS)
    data = tmp_path / "rows.csv"
    data.write_text("f0\n1\n")
    code, out = _cli(["--target", "127.0.0.1:1", "--model", "m", "--version", "2", "--rps", "10",
                      "--duration", "1", "--data", str(data)])
    assert code == 2 and "CHIMERA_ADMIN_TOKEN" in out
    code, out = _cli(["--target", "127.0.0.1:1", "--model", "m", "--rps", "10", "--duration", "1"])
    assert code == 1 and "no feature schema" in out


# ---------------------------------------------------------------- registry: stored runs, promotion gate
def _published(registry: Registry, n_versions: int = 2) -> str:
    model = "lt" + uuid.uuid4().hex[:8]
    for seed in range(n_versions):
        onnx, names = small_onnx(seed=seed)
        registry.publish_version(model, onnx, names)
    return model


def test_runs_are_stored_against_the_pinned_version(registry: Registry, fake_server: FakeServer,
                                                    tmp_path: Path) -> None:
    """Schema from the registry (f0..f3 → N(0,1) rows), version pinned, pass and fail both stored."""
    model = _published(registry)
    common = ["--target", fake_server.target, "--model", model, "--version", "2", "--rps", "40",
              "--duration", "1", "--registry-url", registry.url]
    code, out = _cli([*common, "--slo-p99-ms", "60000", "--report", str(tmp_path / "ok.json")],
                     CHIMERA_ADMIN_TOKEN="t")
    assert code == 0, out
    assert "stored as load test #" in out and f"of {model} v2" in out
    code, out = _cli([*common, "--slo-p99-ms", "0.001"], CHIMERA_ADMIN_TOKEN="t")
    assert code == EXIT_SLO_FAILED, out
    runs = list_load_tests(registry, model, 2)
    assert [r.passed for r in runs] == [False, True]  # newest first
    failing, passing = runs
    assert "p99 latency" in failing.failures[0] and failing.slo["p99_ms"] == 0.001
    assert passing.target == fake_server.target and passing.target_rps == 40
    assert passing.report["responses_by_version"] == {"2": passing.report["requests"]["ok"]}
    assert passing.report["config"]["payload"] == "N(0,1)"
    written = json.loads((tmp_path / "ok.json").read_text())
    assert written["registry"]["record_id"] == passing.id
    assert require_passing_loadtest(registry, model, 2, timedelta(hours=1)).id == passing.id
    with pytest.raises(PreconditionFailed, match="no load test recorded"):
        require_passing_loadtest(registry, model, 1, timedelta(hours=1))


def test_candidate_gate_reads_settings_runs_pinned_and_stores(registry: Registry, fake_server: FakeServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The load test retraining injects before a canary (loadtest.candidate_gate.LoadTestGate): built
    from CHIMERA_GATEWAY_TARGET / CHIMERA_RETRAIN_LOADTEST_* with the CLI's overrides on top, run
    pinned to the candidate and stored against it; never stores the token; no token: cannot run."""
    from loadtest.candidate_gate import LoadTestGate
    from training.retrain_errors import LoadTestFailed

    assert LoadTestGate.from_env({}) is None  # no target: no load test
    env = {"CHIMERA_GATEWAY_TARGET": fake_server.target, "CHIMERA_RETRAIN_LOADTEST_RPS": "40",
           "CHIMERA_RETRAIN_LOADTEST_SLO_P99_MS": "off", "CHIMERA_RETRAIN_LOADTEST_DURATION_S": "5"}
    gate = LoadTestGate.from_env(env, duration_s=1.0, warmup_s=0.2, rps=None, admin_token="t")
    assert gate is not None and gate.target == fake_server.target and gate.rps == 40
    assert gate.slo_p99_ms is None and gate.duration_s == 1.0 and gate.max_error_rate == 0.01
    assert "admin_token" not in gate.to_dict() and "'t'" not in repr(gate)
    with pytest.raises(ValueError, match="CHIMERA_RETRAIN_LOADTEST_RPS"):
        LoadTestGate.from_env({**env, "CHIMERA_RETRAIN_LOADTEST_RPS": "fast"})
    with pytest.raises(ValueError, match="rps"):
        LoadTestGate.from_env(env, rps=-1.0)

    model = _published(registry)
    v2 = registry.get_version(model, 2)
    record = gate.run(registry, model, v2)
    assert record.passed and record.version == 2 and record.target == fake_server.target
    assert record.report["responses_by_version"] == {"2": record.report["requests"]["ok"]}
    assert record.report["trigger"] == "retrain"
    assert [r.id for r in list_load_tests(registry, model, 2)] == [record.id]
    monkeypatch.delenv("CHIMERA_ADMIN_TOKEN", raising=False)
    with pytest.raises(LoadTestFailed, match="admin token"):
        LoadTestGate(fake_server.target).run(registry, model, v2)


def test_require_passing_loadtest(registry: Registry) -> None:
    model = _published(registry, 1)
    day = timedelta(days=1)
    with pytest.raises(PreconditionFailed, match=f"{model} v1 needs a passing load test within 24.0 h: "
                                                 "no load test recorded; run `chimera loadtest"):
        require_passing_loadtest(registry, model, 1, day)
    record_load_test(registry, model, 1, target="gw:1", passed=False, failures=["p99 latency 80 ms exceeds "
                     "the SLO of 50 ms"], slo={"p99_ms": 50}, report={"target_rps": 500})
    with pytest.raises(PreconditionFailed, match="failed: p99 latency 80 ms exceeds the SLO of 50 ms"):
        require_passing_loadtest(registry, model, 1, day)
    stale = record_load_test(registry, model, 1, target="gw:1", passed=True, slo={"p99_ms": 50},
                             report={"target_rps": 500}, created_at=utcnow() - timedelta(days=3))
    with pytest.raises(PreconditionFailed, match=rf"latest passing run \(#{stale.id}\) is 3.0 days old"):
        require_passing_loadtest(registry, model, 1, day)
    assert require_passing_loadtest(registry, model, 1, timedelta(days=4)).id == stale.id
    fresh = record_load_test(registry, model, 1, target="gw:1", passed=True, slo={"p99_ms": 50},
                             report={"target_rps": 500})
    got = require_passing_loadtest(registry, model, 1, day)
    assert got.id == fresh.id and got.passed and got.created_at.tzinfo is not None
    assert got.report == {"target_rps": 500} and got.slo == {"p99_ms": 50}
    # a run at a lower rate than the promotion asks for does not count
    with pytest.raises(PreconditionFailed, match="reached 1000 req/s"):
        require_passing_loadtest(registry, model, 1, day, min_rps=1000)
    assert latest_passing_load_test(registry, model, 1, day, min_rps=500).id == fresh.id
    # PreconditionFailed is a RegistryError (existing handlers catch it), not a ValidationError
    assert issubclass(PreconditionFailed, RegistryError)
    assert not issubclass(PreconditionFailed, ValidationError)


def test_record_load_test_validates(registry: Registry) -> None:
    model = _published(registry, 1)
    from registry import NotFoundError

    with pytest.raises(NotFoundError):
        record_load_test(registry, model, 7, target="x", passed=True)
    with pytest.raises(ValidationError, match="failures"):
        record_load_test(registry, model, 1, target="x", passed=False)
    with pytest.raises(ValidationError, match="max_age"):
        require_passing_loadtest(registry, model, 1, timedelta(0))
    assert record_load_test(registry, model, 0, target="x", passed=True).version == 0  # routed mix


# ---------------------------------------------------------------- real gateway (Ray Serve replicas)
@pytest.fixture(scope="module", params=BACKENDS)
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            ray_cluster: None):  # a parameter, not getfixturevalue: the Ray group sees it (tests/conftest.py)
    """v1 takes all routed traffic; v2 is a candidate with no weight (deployed on first pinned use)."""
    tmp = tmp_path_factory.mktemp("lt-" + request.param)
    url = fresh_registry_url(request.param, request, tmp)
    reg = Registry(url)
    reg.upgrade()
    model = _published(reg)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp).start()
    yield gw, reg, model
    gw.stop()
    reg.dispose()


def test_pinned_candidate_is_load_tested_through_the_gateway(gateway, tmp_path: Path) -> None:
    gw, reg, model = gateway
    code, out = _cli(["--target", f"127.0.0.1:{gw.port}", "--model", model, "--version", "2", "--rps", "40",
                      "--duration", "2", "--slo-p99-ms", "60000", "--registry-url", reg.url,
                      "--report", str(tmp_path / "r.json")], CHIMERA_ADMIN_TOKEN=ADMIN_TOKEN)
    assert code == 0, out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["version"] == 2 and r["errors_by_code"] == {}
    assert r["responses_by_version"] == {"2": r["requests"]["ok"]} and r["requests"]["ok"] >= 60
    assert reg.get_split(model).weights == {1: 100}  # pinning did not route any traffic to v2
    rec = require_passing_loadtest(reg, model, 2, timedelta(minutes=10))
    assert rec.id == r["registry"]["record_id"]
    with pytest.raises(PreconditionFailed):
        require_passing_loadtest(reg, model, 1, timedelta(minutes=10))


def test_routed_run_and_a_wrong_token(gateway, tmp_path: Path) -> None:
    gw, reg, model = gateway
    target = f"127.0.0.1:{gw.port}"
    code, out = _cli(["--target", target, "--model", model, "--rps", "30", "--duration", "1",
                      "--registry-url", reg.url, "--report", str(tmp_path / "r.json")])
    assert code == 0, out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["version"] is None and r["responses_by_version"] == {"1": r["requests"]["ok"]}
    assert r["registry"]["version"] == 1  # only v1 answered, so the run counts for v1
    code, out = _cli(["--target", target, "--model", model, "--version", "2", "--rps", "10",
                      "--duration", "1", "--registry-url", reg.url], CHIMERA_ADMIN_TOKEN="wrong")
    assert code == 1 and "UNAUTHENTICATED" in out and "invalid token" in out
