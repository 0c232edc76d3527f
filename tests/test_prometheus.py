"""deploy/prometheus and deploy/grafana checked against a real Prometheus (Debian's `prometheus` 2.42 and
`promtool`): the config and alert rules pass promtool, the alert rules' unit tests pass, and a live
gateway under traffic (OK and failing calls) is scraped while every PromQL expression of every Grafana
dashboard panel is evaluated through Prometheus' HTTP API and must return data.

The canary p-value and rollout-decision panels only have data once the rollout controller has decided
something. This test does not run the controller: it calls the gateway's own Metrics object
(`gw.gateway.metrics.observe_decision`, the hook the controller calls) so those series exist, and says so
here. Every other panel's data comes from real traffic through the gateway and its Ray Serve replicas.

`make test` installs `prometheus` (`make sysdeps`) when run as root. Missing as root is a failure; missing as
another user is a skip that says why."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from chimera.v1 import prediction_pb2 as pb
from gateway.server import GatewayConfig
from registry import Registry
from tests.harness import GatewayThread, small_onnx

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chimera.json"
GATEWAY_JOB = "chimera-gateway"
# Grafana's template variables, replaced as Grafana would with "All" selected (allValue ".+").
GRAFANA_VARS = {"$__rate_interval": "30s", "$__range": "5m", "$model": ".+"}


def require_prometheus() -> None:
    missing = [t for t in ("prometheus", "promtool") if not shutil.which(t)]
    if not missing:
        return
    why = f"{missing} not on PATH (Debian package prometheus)"
    if os.geteuid() == 0:
        pytest.fail(f"{why}. Running as root, so `make sysdeps` (part of `make test`) should have "
                    "installed it: run `make sysdeps` and look at its output.", pytrace=False)
    pytest.skip(f"{why}. Not root, so it cannot be installed here: `sudo apt-get install prometheus`")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    require_prometheus()
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for t in panel.get("targets", []):
                out.append((panel["title"], t["expr"]))
    return out


def grafana_expand(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown template variable in {expr!r}"
    return expr


# ---------------------------------------------------------------- static checks with promtool

def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_check_config() -> None:
    proc = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_unit_tests() -> None:
    """Each alert fires on the condition it names and stays quiet on its look-alike (deploy/prometheus/
    alerts_test.yml: canary slower than baseline, server errors vs caller errors, spill growth, ...)."""
    proc = promtool("test", "rules", "alerts_test.yml", cwd=PROM_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_required_alerts_exist() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"ChimeraGatewayDown", "ChimeraCanaryLatencyRegression", "ChimeraErrorRateSpike",
            "ChimeraPredictionLogSpilling"} <= alerts


def test_dashboard_panels_cover_the_issue() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    exprs = " ".join(e for _, e in dashboard_queries())
    for metric in ("chimera_request_latency_seconds_bucket", "chimera_requests_total",
                   "chimera_split_weight_percent", "chimera_canary_p_value", "chimera_batch_size_rows",
                   "chimera_prediction_log_queue_depth"):
        assert metric in exprs, metric
    for q in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,"):
        assert q in exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- a real Prometheus scraping a live gateway

class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout}s: {self.log.read_text()}")

    def stop(self) -> None:
        """Only the process this test started, by its pid."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class Traffic(threading.Thread):
    """Keeps calls flowing: Predict (named features), PredictBatch, RecordOutcome, and failing calls
    (a bad feature name: INVALID_ARGUMENT for the model; an unknown model: NOT_FOUND)."""

    def __init__(self, gw: GatewayThread, model: str, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.gw, self.model, self.names = gw, model, names
        self.stop_event = threading.Event()
        self.ok = self.failed = 0
        self.unexpected: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(0)
        i = 0
        while not self.stop_event.is_set():
            i += 1
            features = dict(zip(self.names, rng.normal(size=len(self.names)).tolist(), strict=True))
            try:
                stub = self.gw.predict
                r = stub.Predict(pb.PredictRequest(model=self.model, routing_key=f"u{i}", features=features),
                                 timeout=30)
                self.ok += 1
                if i % 2 == 0:
                    outcome = pb.RecordOutcomeRequest(request_id=r.request_id, value=float(i % 3 == 0))
                    stub.RecordOutcome(outcome, timeout=30)
                if i % 5 == 0:
                    rows = [pb.PredictRequest(routing_key=f"b{i}-{j}", features=features) for j in range(8)]
                    stub.PredictBatch(pb.PredictBatchRequest(model=self.model, rows=rows), timeout=30)
            except grpc.RpcError as exc:
                self.unexpected.append(f"{exc.code().name}: {exc.details()}")
            for bad in (pb.PredictRequest(model=self.model, features={**features, "bogus": 1.0}),
                        pb.PredictRequest(model="no-such-model", dense=[1.0] * len(self.names))):
                if i % 4 == 0:
                    try:
                        self.gw.predict.Predict(bad, timeout=30)
                        self.unexpected.append("a bad request succeeded")
                    except grpc.RpcError:
                        self.failed += 1
            time.sleep(0.02)  # a shared 2-core machine: steady traffic, not a load test


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, ray_cluster):
    require_prometheus()
    tmp = tmp_path_factory.mktemp("prom")
    url = f"sqlite:///{tmp / 'registry.db'}"
    registry = Registry(url)
    registry.upgrade()
    model = "pm" + uuid.uuid4().hex[:8]
    b1, names = small_onnx(seed=1)
    b2, _ = small_onnx(seed=2, flip=True)
    registry.publish_version(model, b1, names)
    registry.publish_version(model, b2, names)
    registry.set_split(model, {1: 80, 2: 20}, expected_revision=0, actor="test")
    metrics_port = free_port()
    # This gateway's own rollout controller stays off: the only decisions are the two this test makes.
    no_controller = ({"controller_interval_s": 0.0}
                     if "controller_interval_s" in GatewayConfig.__dataclass_fields__ else {})
    gw = GatewayThread(url, tmp, metrics_port=metrics_port, **no_controller).start()

    # The shipped config, with the gateway job pointed at this gateway and 1 s scrape/evaluation intervals.
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert GATEWAY_JOB in jobs, f"deploy/prometheus/prometheus.yml has no job {GATEWAY_JOB}"
    job = jobs[GATEWAY_JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [job]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / r) for r in config["rule_files"]]
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))

    traffic = Traffic(gw, model, names)
    prom = Prometheus(cfg, tmp / "tsdb", tmp / "prometheus.log")
    try:
        traffic.start()
        # The rollout controller's hook (see the module docstring): a first look, then a second one.
        gw.gateway.metrics.observe_decision(model, 2, "hold", 0.61)
        prom.wait_ready()
        yield prom, gw, model, traffic, metrics_port
    finally:
        traffic.stop_event.set()
        prom.stop()
        traffic.join(60)
        gw.stop()
        registry.dispose()


def _has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_panel_returns_data_from_a_live_gateway(live) -> None:
    prom, gw, model, traffic, metrics_port = live
    deadline = time.monotonic() + 60
    while not prom.query(f'up{{job="{GATEWAY_JOB}"}} == 1'):
        assert time.monotonic() < deadline, f"gateway target never up: {prom.get('/api/v1/targets')}"
        time.sleep(0.5)
    targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
    assert [t["scrapeUrl"] for t in targets] == [f"http://127.0.0.1:{metrics_port}/metrics"]

    queries = [(title, expr, grafana_expand(expr)) for title, expr in dashboard_queries()]
    second_decision = False
    deadline = time.monotonic() + 90
    while True:
        time.sleep(2)
        if not second_decision:
            gw.gateway.metrics.observe_decision(model, 2, "hold", 0.47)
            second_decision = True
        missing = [(title, expr) for title, expr, q in queries if not _has_finite_value(prom.query(q))]
        if not missing or time.monotonic() > deadline:
            break
    assert not missing, "panels without data:\n" + "\n".join(f"  {t}: {e}" for t, e in missing)
    assert traffic.ok > 0 and traffic.failed > 0 and not traffic.unexpected, traffic.unexpected[:5]

    # The model template variable finds the model; per-version panels see both versions.
    values = prom.get("/api/v1/label/model/values", **{"match[]": "chimera_split_weight_percent"})["data"]
    assert model in values
    split = {r["metric"]["version"]: float(r["value"][1])
             for r in prom.query(f'chimera_split_weight_percent{{model="{model}"}}')}
    assert split == {"1": 80.0, "2": 20.0}
    # The second decision's p-value replaces the first one's within a few scrapes.
    deadline = time.monotonic() + 30
    while True:
        p_value = prom.query(f'chimera_canary_p_value{{model="{model}", version="2"}}')
        if float(p_value[0]["value"][1]) == pytest.approx(0.47) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert float(p_value[0]["value"][1]) == pytest.approx(0.47)
    hold = prom.query(f'chimera_rollout_decisions_total{{model="{model}", action="hold"}}')
    assert float(hold[0]["value"][1]) == 2.0
    errors = prom.query(f'sum by (code) (chimera_requests_total{{code!="OK", job="{GATEWAY_JOB}"}})')
    assert {r["metric"]["code"] for r in errors} == {"INVALID_ARGUMENT", "NOT_FOUND"}


def test_alert_rules_evaluate_on_live_data(live) -> None:
    """Prometheus loads alerts.yml and evaluates every rule against the live series without error."""
    prom = live[0]
    expected = sum(len(g["rules"]) for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"])
    deadline = time.monotonic() + 60
    while True:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        recorded = prom.query("chimera:requests:rate5m")
        if (not bad and recorded) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(rules) == expected and not bad, bad
    assert recorded, "recording rule chimera:requests:rate5m has no data"
    firing = [a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == [], firing
