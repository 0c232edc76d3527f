"""`chimera drift`, `chimera retrain` and `chimera scheduler` as an operator runs them, on a registry
(SQLite and PostgreSQL) holding served rows with features and outcomes from a stream whose world shifts
halfway: what they print, their exit codes, what they record; drift's default reference (the
production version's training window); and a real `chimera scheduler` process running its drift job on
a short schedule until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client import REGISTRY
from rich.console import Console
from typer.testing import CliRunner

from chimera import cli
from chimera.cli import views
from loadtest.ports import free_port as _free_port
from registry import Registry
from registry.training_runs import list_runs
from tests.integration.test_feedback import log_served, new_model_name, publish_production, shifted_stream
from training.datasets import TIMESTAMP
from training.drift import psi
from training.feedback import served_frame

STRONG = ("realized_vol", "funding_rate", "spread_bp")  # features whose distribution shifts most
TRAIN_ROWS = 2000
ROOT = Path(__file__).resolve().parents[2]


def _recent_stream(n: int = 9000, seed: int = 11) -> pd.DataFrame:
    """The shifted stream moved in time so that it ends two minutes ago: the commands use the wall
    clock (no --now option), like an operator would."""
    s = shifted_stream(n, seed=seed)
    offset = datetime.now(UTC) - timedelta(minutes=2) - s[TIMESTAMP].iloc[-1].to_pydatetime()
    s[TIMESTAMP] = s[TIMESTAMP] + offset
    return s


def _served_scenario(registry: Registry, prefix: str, outcomes: bool = True) -> tuple[str, pd.DataFrame, str]:
    """v1 trained on the first rows, production at 100 %, serving the rest (features + outcomes);
    returns the model, the stream and a --window covering exactly the requests served after the shift."""
    stream = _recent_stream()
    model = new_model_name(prefix)
    v1, _ = publish_production(registry, model, stream.iloc[:TRAIN_ROWS])
    log_served(registry, model, v1.version, stream.iloc[TRAIN_ROWS:], outcomes=outcomes)
    shift = stream[TIMESTAMP].iloc[len(stream) // 2].to_pydatetime()
    return model, stream, f"{int((datetime.now(UTC) - shift).total_seconds())}s"


@pytest.fixture
def run_cli(registry_url: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Invoke the real Typer app in-process against this test's registry; a wide console so table
    rows are never cut."""
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry_url)
    for name in ("CHIMERA_GATEWAY_TARGET", "CHIMERA_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(views, "console", Console(width=400, no_color=True))  # every command prints here
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        t0 = time.monotonic()
        result = runner.invoke(cli.app, list(args))
        print(f"chimera {' '.join(args)}: exit {result.exit_code} in {time.monotonic() - t0:.1f}s")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output

    return run


def _row(output: str, name: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.replace("│", " ").split()[:1] == [name]]
    return line


def test_drift_retrain_and_scheduler_commands(registry: Registry, run_cli, monkeypatch) -> None:  # noqa: ANN001
    model, stream, recent = _served_scenario(registry, "cli")

    # ---- chimera drift: per-feature table with PSI, the shifted features flagged.
    code, out = run_cli("drift", model, "--window", recent)
    assert code == 0, out
    assert "PSI" in out and "KS statistic" in out and "previous window" in out, out
    code, js = run_cli("drift", model, "--window", recent, "--json")
    report = json.loads(js)
    assert code == 0 and report["reference_kind"] == "previous_window"
    by_name = {f["feature"]: f for f in report["features"]}
    assert set(by_name) == set(registry.get_version(model, 1).feature_names)
    for name in STRONG:
        f = by_name[name]
        assert f["flagged"] and f["psi"] > 0.2, f
        line = _row(out, name)
        assert "DRIFT" in line and f"{f['psi']:.3f}" in line, line
    for name, f in by_name.items():
        if not f["flagged"]:
            assert "DRIFT" not in _row(out, name)
    assert out.splitlines()[-1].startswith("flagged: ") and "realized_vol" in out.splitlines()[-1]
    code, _ = run_cli("drift", model, "--window", recent, "--fail-on-drift")
    assert code == 3
    code, out = run_cli("drift", model, "--window", "1m")
    assert code == 1 and "logged rows" in out

    # ---- chimera retrain: published and canaried (exit 0); the note that promotion awaits a load test.
    code, out = run_cli("retrain", "--model", model, "--window", recent)
    assert code == 0, out
    assert f"{model}: holdout of run" in out and "production v1" in out and "candidate" in out
    assert "published v2: not worse than production v1" in out and "canary at 5%" in out, out
    assert "promotion will wait for a passing load test of v2" in out
    run = list_runs(registry, model)[0]
    assert run.trigger == "cli" and run.published_version == 2 and run.status == "succeeded"
    assert dict(registry.get_split(model).weights) == {1: 95, 2: 5}
    assert registry.get_version(model, 2).status == "canary"

    # Not published (a tolerance no candidate meets): exit 3, the reason printed and recorded.
    code, js = run_cli("retrain", "--model", model, "--window", recent, "--tolerance", "-0.5", "--json")
    assert code == 3
    res = json.loads(js.strip().splitlines()[-1])
    assert res["published_version"] is None and res["reason"].startswith("not published: candidate worse")
    assert "tolerance -0.5" in res["reason"] and list_runs(registry, model)[0].reason == res["reason"]
    # Published but held back by the load-test gate (a target, but no admin token to pin it): exit 3.
    code, out = run_cli("retrain", "--model", model, "--window", recent, "--loadtest-target", "127.0.0.1:9")
    assert code == 3, out
    assert "published v3" in out and "not canaried" in out and "CHIMERA_ADMIN_TOKEN" in out
    assert registry.get_version(model, 3).status == "staged"
    assert list_runs(registry, model)[0].params["loadtest"]["target"] == "127.0.0.1:9"
    # Cannot run (too little feedback): exit 1; bad options: exit 2.
    code, out = run_cli("retrain", "--model", model, "--window", recent, "--min-rows", "1000000")
    assert code == 1 and "need at least" in out
    assert list_runs(registry, model)[0].status == "failed"
    code, _ = run_cli("retrain", "--model", model, "--mode", "sideways")
    assert code == 2
    assert dict(registry.get_split(model).weights) == {1: 95, 2: 5}

    # ---- chimera scheduler --once: the drift job runs (the retrain job waits for the canary).
    def jobs(result: str) -> float:
        labels = {"job": "drift", "result": result}
        return REGISTRY.get_sample_value("chimera_scheduler_jobs_total", labels) or 0.0
    before = jobs("drifted")
    monkeypatch.setenv("CHIMERA_SCHEDULER_MODELS", model)
    monkeypatch.setenv("CHIMERA_DRIFT_WINDOW", recent)
    monkeypatch.setenv("CHIMERA_RETRAIN_WINDOW", recent)
    for name in ("CHIMERA_RETRAIN_SCHEDULE", "CHIMERA_DRIFT_SCHEDULE"):
        monkeypatch.delenv(name, raising=False)  # the defaults: both jobs configured
    code, out = run_cli("scheduler", "--once", "--metrics-port", "0")
    assert code == 0, out
    assert "retrain '0 3 * * *'" in out and "drift '*/30 * * * *'" in out
    assert f"retrain {model}: skipped a canary is in progress (v1=95%, v2=5%)" in out, out
    (drift_line,) = [ln for ln in out.splitlines() if ln.startswith(f"drift {model}:")]
    assert "drifted" in drift_line and all(n in drift_line for n in STRONG), drift_line
    assert jobs("drifted") == before + 1
    labels = {"model": model, "feature": "realized_vol"}
    exported = REGISTRY.get_sample_value("chimera_feature_psi", labels)
    assert exported == pytest.approx(by_name["realized_vol"]["psi"], rel=0.05)
    assert REGISTRY.get_sample_value("chimera_feature_drift_flagged", labels) == 1.0
    last = REGISTRY.get_sample_value("chimera_drift_last_run_timestamp_seconds", {"model": model})
    assert last is not None and abs(last - time.time()) < 120

    # ---- drift's default reference: the production version's training window.
    split = registry.get_split(model)
    registry.set_split(model, {2: 100}, expected_revision=split.revision, actor="test")
    registry.set_version_status(model, 1, "archived")
    registry.set_version_status(model, 2, "production")
    (trained,) = list_runs(registry, model, published_version=2)
    code, js = run_cli("drift", model, "--window", "1d", "--json")
    assert code == 0
    report = json.loads(js)
    assert report["version"] == 2 and report["reference_kind"] == "training_window"
    ws, we = trained.window_start, trained.window_end
    assert ws is not None and we is not None
    assert [pd.Timestamp(t) for t in report["reference_window"]] == [pd.Timestamp(ws), pd.Timestamp(we)]
    ts = stream[TIMESTAMP].iloc[TRAIN_ROWS:]
    in_window = int(((ts >= pd.Timestamp(ws)) & (ts < pd.Timestamp(we))).sum())
    assert in_window > 1000
    assert all(f["n_reference"] == in_window for f in report["features"])
    # ...and the statistics are those of exactly that window's rows against the current ones.
    ref = served_frame(registry, model, since=ws, until=we, features=["realized_vol"])
    c0, c1 = (pd.Timestamp(t).to_pydatetime() for t in report["current_window"])
    cur = served_frame(registry, model, since=c0, until=c1, features=["realized_vol"])
    got = next(f for f in report["features"] if f["feature"] == "realized_vol")
    assert got["n_current"] == len(cur)
    assert got["psi"] == pytest.approx(psi(ref["realized_vol"].to_numpy(), cur["realized_vol"].to_numpy()))
    code, out = run_cli("drift", model, "--window", "1d")
    assert code == 0 and "training window (" in out


def _sample(text: str, name: str, **labels: str) -> float | None:
    """A sample's value from a Prometheus text exposition (None when absent)."""
    for line in text.splitlines():
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        if metric == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_scheduler_process_runs_drift_on_schedule_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
    reg.upgrade()
    model, _, recent = _served_scenario(reg, "sched", outcomes=False)
    reg.dispose()
    port = _free_port()
    env = {**os.environ, "CHIMERA_REGISTRY_URL": url, "CHIMERA_DRIFT_SCHEDULE": "* * * * *",
           "CHIMERA_RETRAIN_SCHEDULE": "off", "CHIMERA_DRIFT_WINDOW": recent,
           "CHIMERA_SCHEDULER_POLL_SECONDS": "0.5", "COLUMNS": "300", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "chimera", "scheduler", "--metrics-port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                text = ""
            if _sample(text, "chimera_scheduler_jobs_total", job="drift", result="drifted"):
                break
            time.sleep(0.5)
        print(f"scheduler process ran its drift job after {time.monotonic() - t0:.1f}s")
        drifted = _sample(text, "chimera_scheduler_jobs_total", job="drift", result="drifted")
        assert drifted == 1.0, text[-2000:]
        assert _sample(text, "chimera_scheduler_leader") == 1.0
        assert (_sample(text, "chimera_feature_psi", model=model, feature="realized_vol") or 0) > 0.2
        assert _sample(text, "chimera_drift_flagged_features", model=model) >= 3
        assert _sample(text, "chimera_scheduler_jobs_total", job="retrain", result="published") is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "scheduler: drift '* * * * *'; models: all with a production version" in out, out
    assert f"drift {model}: drifted flagged:" in out and "realized_vol" in out
    assert "retrain" not in out.split("scheduler: ", 1)[1].split("\n", 1)[0]
