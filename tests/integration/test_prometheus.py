"""deploy/prometheus and deploy/grafana checked against a real Prometheus (Debian's `prometheus` 2.42 and
`promtool`): the config and alert rules pass promtool, the alert rules' unit tests pass, and a live
gateway under traffic (OK and failing calls) is scraped while every PromQL expression of every Grafana
dashboard panel is evaluated through Prometheus' HTTP API and must return data.

The canary p-value and rollout-decision panels only have data once the rollout controller has decided
something: the gateway's own controller runs every second on an A/A canary (tiny alpha, few outcomes
needed, so every verdict is "hold") and Prometheus must show the stored decisions' latest p-value and
their count. The drift panels read the gauges `chimera scheduler` exports: this test computes them the
same way, with training.drift's `drift_report` on the requests this gateway logged (with their features)
against a reference frame in which one feature sits higher, and `export_drift_metrics` into a registry of
its own served by prometheus_client's HTTP server (what `chimera scheduler --metrics-port` runs), scraped
as the shipped config's chimera-scheduler job. The drift alert rules then go pending on exactly the
series whose PSI is above 0.2 (they fire only after an hour). Every other panel's data comes from real
traffic through the gateway and its Ray Serve replicas. `make test` installs `prometheus` (`make
sysdeps`) when run as root. Missing as root is a failure; missing as another user is a skip that says
why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from chimera.v1 import prediction_pb2 as pb
from loadtest.ports import free_port
from registry import Registry
from registry.rollouts import decisions
from tests.harness import GatewayThread
from training.drift import PSI_THRESHOLD, DriftReport, drift_report, export_drift_metrics

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chimera.json"
GATEWAY_JOB = "chimera-gateway"
SCHEDULER_JOB = "chimera-scheduler"  # `chimera scheduler`: the drift gauges
DRIFT_ALERTS = ("ChimeraFeatureDrift", "ChimeraScoreDrift")
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
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"ChimeraGatewayDown", "ChimeraCanaryLatencyRegression", "ChimeraErrorRateSpike",
            "ChimeraPredictionLogSpilling", *DRIFT_ALERTS} <= set(alerts)
    # The drift alerts use training/drift.py's threshold ("significant" PSI) on its gauges.
    assert alerts["ChimeraFeatureDrift"]["expr"].strip().endswith(f"(chimera_feature_psi) > {PSI_THRESHOLD}")
    assert alerts["ChimeraScoreDrift"]["expr"].strip().endswith(f"(chimera_score_psi) > {PSI_THRESHOLD}")


def test_dashboard_panels_cover_the_issue() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    exprs = " ".join(e for _, e in dashboard_queries())
    for metric in ("chimera_request_latency_seconds_bucket", "chimera_requests_total",
                   "chimera_split_weight_percent", "chimera_canary_p_value", "chimera_batch_size_rows",
                   "chimera_prediction_log_queue_depth", "chimera_feature_psi", "chimera_score_psi",
                   "chimera_drift_flagged_features", "chimera_replicas{", "chimera_replicas_bound",
                   "chimera_replica_calls_total"):
        assert metric in exprs, metric
    for q in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,"):
        assert q in exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # The PSI panel draws the alert threshold.
    (psi_panel,) = [p for p in dash["panels"] if any("chimera_feature_psi" in t["expr"]
                                                     for t in p.get("targets", []))]
    defaults = psi_panel["fieldConfig"]["defaults"]
    assert PSI_THRESHOLD in [step["value"] for step in defaults["thresholds"]["steps"]]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"


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
                if i % 5 == 0:  # rows of their own: the drift report reads every logged row's features
                    rows = [pb.PredictRequest(routing_key=f"b{i}-{j}", features=dict(
                        zip(self.names, rng.normal(size=len(self.names)).tolist(), strict=True)))
                        for j in range(8)]
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


def exported_onnx(seed: int, flip: bool = False) -> tuple[bytes, list[str]]:
    """small_onnx's model, exported by training.export.to_onnx (input `input`, output `probabilities`): the
    interface of the versions `chimera train` and `chimera retrain` publish, and the one training.drift's
    score drift runs (training.export.onnx_scores; skl2onnx's default input name `X` fails there)."""
    from sklearn.linear_model import LogisticRegression

    from training.export import to_onnx

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    names = [f"f{i}" for i in range(x.shape[1])]
    return to_onnx(LogisticRegression().fit(x, 1 - y if flip else y), len(names), names), names


def served_drift(registry: Registry, model: str, names: list[str], min_rows: int = 300,
                 timeout: float = 90) -> DriftReport:
    """training.drift's report on the requests the live gateway logged in the last hour (their features are
    N(0, 1), see Traffic) against a reference frame in which the first feature sits 1.5 standard deviations
    higher: that feature drifts, and so do the production version's scores (v1 leans on it). Waits until
    the prediction log has inserted `min_rows` rows with features."""
    rng = np.random.default_rng(7)
    reference = pd.DataFrame(rng.normal(size=(2000, len(names))), columns=names)
    reference[names[0]] += 1.5
    deadline = time.monotonic() + timeout
    while True:
        try:
            return drift_report(registry, model, window=timedelta(hours=1), reference=reference,
                                min_rows=min_rows)
        except ValueError as exc:
            if "logged rows" not in str(exc) or time.monotonic() > deadline:  # not only "not enough yet"
                raise
            time.sleep(1)


class Live(NamedTuple):
    prom: Prometheus
    gw: GatewayThread
    model: str
    traffic: Traffic
    metrics_port: int
    drift_port: int
    drift: DriftReport


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, ray_cluster):
    require_prometheus()
    tmp = tmp_path_factory.mktemp("prom")
    url = f"sqlite:///{tmp / 'registry.db'}"
    registry = Registry(url)
    registry.upgrade()
    model = "pm" + uuid.uuid4().hex[:8]
    b1, names = exported_onnx(seed=1)
    b2, _ = exported_onnx(seed=2, flip=True)
    registry.publish_version(model, b1, names)
    registry.publish_version(model, b2, names)
    registry.set_split(model, {1: 80, 2: 20}, expected_revision=0, actor="test")
    metrics_port = free_port()
    # The gateway's own rollout controller looks every second and feeds the p-value and decision panels.
    # Both arms see the same outcome stream (an A/A test) and alpha is tiny, so every verdict is "hold"
    # and the 80/20 split the test checks stays put; a handful of outcomes per arm lets it decide early.
    # The latency guardrail is out of reach: an A/A canary's p99 over its 20 % of a light load is noise on
    # a shared 2-core machine (1.71x the baseline's in one CI run), and a rollback would fire an alert.
    registry.set_rollout_config(model, {"min_samples_per_arm": 5, "alpha": 1e-12,
                                        "max_slow_share_delta": 1.0})
    gw = GatewayThread(url, tmp, metrics_port=metrics_port, controller_interval_s=1.0).start()
    # The drift gauges' /metrics, as `chimera scheduler` serves them (filled in once enough rows are logged).
    drift_registry = CollectorRegistry()
    drift_port = free_port()
    drift_server, _ = start_http_server(drift_port, addr="127.0.0.1", registry=drift_registry)

    # The shipped config, with the gateway job pointed at this gateway, the scheduler job at the drift
    # gauges, and 1 s scrape/evaluation intervals.
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for name in (GATEWAY_JOB, SCHEDULER_JOB):
        assert name in jobs, f"deploy/prometheus/prometheus.yml has no job {name}"
    job, scheduler_job = jobs[GATEWAY_JOB], jobs[SCHEDULER_JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    scheduler_job["static_configs"] = [{"targets": [f"127.0.0.1:{drift_port}"]}]
    config["scrape_configs"] = [job, scheduler_job]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / r) for r in config["rule_files"]]
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))

    traffic = Traffic(gw, model, names)
    prom = Prometheus(cfg, tmp / "tsdb", tmp / "prometheus.log")
    try:
        traffic.start()
        prom.wait_ready()
        # What the scheduler's drift job does (training/scheduler.py), on this gateway's logged requests.
        drift = served_drift(registry, model, names)
        export_drift_metrics(drift, drift_registry)
        yield Live(prom, gw, model, traffic, metrics_port, drift_port, drift)
    finally:
        traffic.stop_event.set()
        prom.stop()
        drift_server.shutdown()
        drift_server.server_close()
        traffic.join(60)
        gw.stop()
        registry.dispose()


def _has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_panel_returns_data_from_a_live_gateway(live: Live) -> None:
    prom, gw, model, traffic, metrics_port, drift_port, drift = live
    deadline = time.monotonic() + 60
    for job in (GATEWAY_JOB, SCHEDULER_JOB):
        while not prom.query(f'up{{job="{job}"}} == 1'):
            assert time.monotonic() < deadline, f"{job} target never up: {prom.get('/api/v1/targets')}"
            time.sleep(0.5)
    targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
    assert sorted((t["labels"]["job"], t["scrapeUrl"]) for t in targets) == [
        (GATEWAY_JOB, f"http://127.0.0.1:{metrics_port}/metrics"),
        (SCHEDULER_JOB, f"http://127.0.0.1:{drift_port}/metrics")]

    queries = [(title, expr, grafana_expand(expr)) for title, expr in dashboard_queries()]
    deadline = time.monotonic() + 90
    while True:
        time.sleep(2)
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
    # The controller's decisions, as stored, are what Prometheus shows: the latest p-value and the count
    # of "hold" verdicts (compared once both sides have caught up with the same look).
    deadline = time.monotonic() + 30
    while True:
        stored = decisions(gw.gateway.registry, model)
        p_value = prom.query(f'chimera_canary_p_value{{model="{model}", version="2"}}')
        hold = prom.query(f'chimera_rollout_decisions_total{{model="{model}", action="hold"}}')
        seen = (float(p_value[0]["value"][1]) if p_value else None, float(hold[0]["value"][1]) if hold else 0)
        latest = (stored[0]["p_value"], float(len(stored))) if stored else (None, 0.0)
        if (stored and seen[0] is not None and seen[0] == pytest.approx(latest[0]) and seen[1] == latest[1]) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stored and {d["action"] for d in stored} == {"hold"}, stored[:3]
    assert seen[0] == pytest.approx(latest[0]) and seen[1] == latest[1], (seen, latest)
    errors = prom.query(f'sum by (code) (chimera_requests_total{{code!="OK", job="{GATEWAY_JOB}"}})')
    assert {r["metric"]["code"] for r in errors} == {"INVALID_ARGUMENT", "NOT_FOUND"}

    # Drift: the shifted feature (and v1's scores) drifted in the real computation, the others did not, and
    # the PSI panel's own query shows every feature's PSI as computed, per model and feature.
    shifted = drift.features[0].feature
    assert shifted in drift.flagged and drift.feature(shifted).psi > PSI_THRESHOLD, drift.to_dict()
    assert all(f.psi < PSI_THRESHOLD for f in drift.features[1:]), drift.to_dict()
    assert drift.score is not None and drift.score.psi > PSI_THRESHOLD, drift.to_dict()
    ((_, psi_expr),) = [(t, e) for t, e in dashboard_queries() if "chimera_feature_psi" in e]
    panel = {(r["metric"]["model"], r["metric"]["feature"]): float(r["value"][1])
             for r in prom.query(grafana_expand(psi_expr))}
    assert panel == pytest.approx({(model, f.feature): f.psi for f in drift.features})
    score = prom.query(f'chimera_score_psi{{model="{model}", job="{SCHEDULER_JOB}"}}')
    assert float(score[0]["value"][1]) == pytest.approx(drift.score.psi)
    flagged = prom.query(f'chimera_drift_flagged_features{{model="{model}"}}')
    assert float(flagged[0]["value"][1]) == len(drift.flagged)


def test_alert_rules_evaluate_on_live_data(live: Live) -> None:
    """Prometheus loads alerts.yml and evaluates every rule against the live series without error. The drift
    alerts go pending on exactly the drifted series of the real drift computation (the shifted feature and
    the scores; they would fire after an hour) and on nothing else."""
    prom, model, drift = live.prom, live.model, live.drift
    expected = sum(len(g["rules"]) for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"])
    want_pending = {("ChimeraFeatureDrift", f.feature) for f in drift.features if f.psi > PSI_THRESHOLD}
    if drift.score is not None and drift.score.psi > PSI_THRESHOLD:
        want_pending.add(("ChimeraScoreDrift", ""))
    deadline = time.monotonic() + 60
    while True:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        recorded = prom.query("chimera:requests:rate5m")
        alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
        pending = {(a["labels"]["alertname"], a["labels"].get("feature", "")) for a in alerts
                   if a["state"] == "pending" and a["labels"]["alertname"] in DRIFT_ALERTS
                   and a["labels"]["model"] == model}
        if (not bad and recorded and pending == want_pending) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(rules) == expected and not bad, bad
    assert recorded, "recording rule chimera:requests:rate5m has no data"
    assert {n for n, _ in want_pending} == set(DRIFT_ALERTS)  # the shifted feature and the scores
    assert pending == want_pending, (pending, drift.to_dict())
    firing = [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"]
    assert firing == [], firing
