"""The operator commands as a user runs them: the venv's `chimera` executable in a subprocess, configured
by environment (CHIMERA_REGISTRY_URL, CHIMERA_ADMIN_TOKEN, RAY_ADDRESS), against real parts: a SQLite
registry in the test's tmp, real training and ONNX export, a live gateway, the session's Ray."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from registry import Registry
from tests.harness import ADMIN_TOKEN, GatewayThread, small_onnx

CHIMERA = Path(sys.executable).with_name("chimera")
# Variables of the developer's shell that would change what the commands do.
_SCRUB = ("CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN", "CHIMERA_TLS_CA", "CHIMERA_TLS_CLIENT_CERT",
          "CHIMERA_TLS_CLIENT_KEY", "CHIMERA_TLS_SERVER_NAME", "CHIMERA_TLS_CERT", "CHIMERA_TLS_KEY",
          "CHIMERA_TLS_CLIENT_CA", "CHIMERA_TRACES_EXPORTER", "RAY_ADDRESS")


def _env(registry_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    # Wide enough that rich does not elide table cells; no colour codes in captured output.
    env.update(CHIMERA_REGISTRY_URL=registry_url, COLUMNS="250", NO_COLOR="1", TERM="dumb")
    env.update(extra)
    return env


def chimera(args: list[str], registry_url: str, cwd: Path, timeout: float = 180,
            **env: str) -> subprocess.CompletedProcess[str]:
    """Run `chimera ARGS` like an operator would; stdout and stderr captured separately."""
    return subprocess.run([str(CHIMERA), *args], env=_env(registry_url, **env), cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, a message naming the problem, and no Python traceback."""
    out = _out(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle.lower() in out.lower(), (needle, out[-3000:])


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_executable_is_the_venvs() -> None:
    assert CHIMERA.is_file() and os.access(CHIMERA, os.X_OK), CHIMERA


# ----------------------------------------------------------------------------------------- db upgrade
def test_db_upgrade_creates_the_schema_and_a_second_run_is_a_no_op(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from registry.migrate import alembic_config

    db = tmp_path / "fresh" / "registry.db"
    db.parent.mkdir()
    url = _sqlite_url(db)
    assert not db.exists()

    first = chimera(["db", "upgrade"], url, tmp_path)
    assert first.returncode == 0, _out(first)
    assert "up to date" in first.stdout and str(db) in first.stdout
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"alembic_version", "models", "model_versions", "predictions"} <= tables, tables
        with engine.connect() as c:
            revision = c.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert revision == ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        reg = Registry(url)
        # Something stored between the runs must survive the second run untouched.
        onnx, names = small_onnx()
        reg.publish_version("kept", onnx, names)
        reg.dispose()

        second = chimera(["db", "upgrade"], url, tmp_path)
        assert second.returncode == 0, _out(second)
        assert "Traceback" not in _out(second)
        assert set(inspect(engine).get_table_names()) == tables
        with engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == revision
        reg = Registry(url)
        assert [v.version for v in reg.get_model("kept").versions] == [1]
        reg.dispose()
    finally:
        engine.dispose()


def test_db_upgrade_never_prints_the_database_password(tmp_path: Path) -> None:
    # An unreachable PostgreSQL URL: the command fails, but the password must not reach the terminal.
    url = "postgresql+psycopg2://chimera:s3cret-pw@127.0.0.1:1/chimera?connect_timeout=2"
    proc = chimera(["db", "upgrade"], url, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "s3cret-pw" not in _out(proc)


# ---------------------------------------------------------------------------------------------- train
TRAIN_ROWS = 400  # 240/80/80 walk-forward windows: both classes in each, seconds to fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One `chimera train --synthetic --publish` run shared by the train and models tests."""
    tmp = tmp_path_factory.mktemp("cli-train")
    url = _sqlite_url(tmp / "registry.db")
    model = "sig" + uuid.uuid4().hex[:6]
    started = time.monotonic()
    proc = chimera(["train", "--model", model, "--synthetic", str(TRAIN_ROWS), "--seed", "3", "--publish"],
                   url, tmp)
    return {"url": url, "model": model, "proc": proc, "tmp": tmp, "seconds": time.monotonic() - started}


def test_train_publish_stores_onnx_and_metrics(trained: dict) -> None:
    import onnxruntime as ort

    from training.datasets import DOMAIN_FEATURES, synthetic_signals

    proc, model, url = trained["proc"], trained["model"], trained["url"]
    assert proc.returncode == 0, _out(proc)
    assert trained["seconds"] < 60, trained["seconds"]
    assert f"published {model} v1" in proc.stdout
    reg = Registry(url)
    try:
        info = reg.get_model(model)
        (v,) = info.versions
        assert v.version == 1 and v.status == "staged"
        assert info.split.weights == {} and info.split.revision == 0  # published, not routed
        assert v.feature_names == DOMAIN_FEATURES
        for key in ("auc", "brier", "log_loss", "ece", "baseline_auc", "n_test", "onnx_max_abs_diff"):
            assert key in v.metrics, (key, v.metrics)
        assert 0.0 <= v.metrics["auc"] <= 1.0 and 0.0 <= v.metrics["baseline_auc"] <= 1.0
        assert v.metrics["n_train"] + v.metrics["n_validation"] + v.metrics["n_test"] == TRAIN_ROWS
        assert v.metrics["onnx_max_abs_diff"] < 1e-4  # the parity check passed
        assert f"{v.metrics['auc']:.4f}" in proc.stdout  # the printed table is the stored metrics
        assert v.params["algo"] == "xgboost" and v.params["seed"] == 3
        assert v.data_hash and v.sha256[:16] in proc.stdout
        # The ONNX bytes in the registry are the version's, and they score the feature schema.
        onnx, sha = reg.get_onnx(model, 1)
        assert sha == v.sha256 == hashlib.sha256(onnx).hexdigest()
        sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        x = synthetic_signals(20, seed=9)[list(DOMAIN_FEATURES)].to_numpy(np.float32)
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
        scores = next(o for o in outs if getattr(o, "ndim", 0) == 2)[:, -1]
        assert scores.shape == (20,) and np.all((scores >= 0) & (scores <= 1))
    finally:
        reg.dispose()


def test_train_from_csv_and_parquet_files(tmp_path: Path) -> None:
    from training.datasets import data_hash, synthetic_signals

    url = _sqlite_url(tmp_path / "registry.db")
    df = synthetic_signals(TRAIN_ROWS, seed=5)
    csv, parquet = tmp_path / "signals.csv", tmp_path / "signals.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)

    proc = chimera(["train", "--model", "from-csv", "--data", str(csv), "--algo", "logreg", "--publish"],
                   url, tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert "published from-csv v1" in proc.stdout
    reg = Registry(url)
    try:
        (v,) = reg.get_model("from-csv").versions
        assert v.params["algo"] == "logreg"
        assert v.data_hash == data_hash(df)  # lineage: the CSV copy hashes like the data it holds
        assert v.metrics["n_test"] > 0

        proc = chimera(["train", "--model", "from-parquet", "--data", str(parquet)], url, tmp_path)
        assert proc.returncode == 0, _out(proc)
        assert "not published" in proc.stdout and "auc" in proc.stdout
        assert "from-parquet" not in reg.model_names()  # without --publish nothing is stored
    finally:
        reg.dispose()


def test_train_without_data_says_what_to_give(tmp_path: Path) -> None:
    proc = chimera(["train", "--model", "m"], _sqlite_url(tmp_path / "r.db"), tmp_path)
    _assert_clean_failure(proc, "--synthetic", "--data")


def test_train_bad_data_gives_a_clear_error_without_traceback(tmp_path: Path) -> None:
    url = _sqlite_url(tmp_path / "r.db")
    missing = tmp_path / "no-such-file.csv"
    _assert_clean_failure(chimera(["train", "--model", "m", "--data", str(missing)], url, tmp_path),
                          "no-such-file.csv")
    wrong_type = tmp_path / "rows.txt"
    wrong_type.write_text("a,b\n1,2\n")
    _assert_clean_failure(chimera(["train", "--model", "m", "--data", str(wrong_type)], url, tmp_path),
                          "unsupported file type")
    no_timestamp = tmp_path / "rows.csv"
    no_timestamp.write_text("f0,label\n1.0,0\n2.0,1\n")
    _assert_clean_failure(chimera(["train", "--model", "m", "--data", str(no_timestamp)], url, tmp_path),
                          "timestamp")


def test_registry_and_version_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    """A registry without its schema, too little data to train, an unknown version: clear, no traceback."""
    url = _sqlite_url(tmp_path / "empty.db")
    _assert_clean_failure(chimera(["models", "list"], url, tmp_path), "registry", "chimera db upgrade")
    tiny = chimera(["train", "--model", "m", "--synthetic", "5"], url, tmp_path)
    _assert_clean_failure(tiny, "--synthetic")


def test_serve_processes_on_a_port_another_server_shares_exits_1_before_starting_anything(
        tmp_path: Path) -> None:
    """`chimera serve --processes 2` on a port another process already listens on *with SO_REUSEPORT*
    (another `serve --processes` still running) stops with exit 1 naming the port, before Ray, a worker
    or the registry's upgrade. The workers bind with SO_REUSEPORT themselves, so the kernel would let
    them share that port silently, each side answering some of the connections."""
    import socket

    db = tmp_path / "r.db"
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = chimera(["serve", "--processes", "2", "--port", str(port), "--metrics-port", "0"],
                       _sqlite_url(db), tmp_path, timeout=60, RAY_ADDRESS="127.0.0.1:1")
    _assert_clean_failure(proc, f"port: cannot listen on 127.0.0.1:{port} for gRPC")
    assert proc.returncode == 1
    assert "worker 0 started" not in _out(proc)
    assert not db.exists(), "the registry was upgraded before the port was checked"


# --------------------------------------------------------------------------------------------- models
def test_models_list_and_show_print_the_published_version(trained: dict) -> None:
    url, model, tmp = trained["url"], trained["model"], trained["tmp"]
    assert trained["proc"].returncode == 0, _out(trained["proc"])
    reg = Registry(url)
    try:
        (v,) = reg.get_model(model).versions
    finally:
        reg.dispose()

    listed = chimera(["models", "list"], url, tmp)
    assert listed.returncode == 0, _out(listed)
    row = next(line for line in listed.stdout.splitlines() if model in line)
    cells = [c.strip() for c in row.strip("│┃| ").split("│")]
    # model, metric, revision, version, status, weight, auc, created
    assert cells[:6] == [model, "success_rate", "0", "1", "staged", "0"], cells
    assert cells[6] == f"{v.metrics['auc']:.4f}", cells

    shown = chimera(["models", "show", model], url, tmp)
    assert shown.returncode == 0, _out(shown)
    out = json.loads(shown.stdout)
    assert out["model"] == model and out["metric"] == "success_rate"
    assert out["split"] == {"revision": 0, "weights": {}}
    (ver,) = out["versions"]
    assert ver["version"] == 1 and ver["status"] == "staged" and ver["sha256"] == v.sha256
    assert ver["features"] == list(v.feature_names)
    assert ver["metrics"]["auc"] == pytest.approx(v.metrics["auc"])
    assert ver["metrics"]["baseline_auc"] == pytest.approx(v.metrics["baseline_auc"])
    assert ver["size_bytes"] > 0 and ver["data_hash"] == v.data_hash

    one = json.loads(chimera(["models", "show", model, "--version", "1"], url, tmp).stdout)
    assert [x["version"] for x in one["versions"]] == [1]


def test_models_show_unknown_model_is_a_clear_error(trained: dict) -> None:
    proc = chimera(["models", "show", "no-such-model"], trained["url"], trained["tmp"])
    _assert_clean_failure(proc, "no-such-model", "not found")
    proc = chimera(["models", "show", trained["model"], "--version", "99"], trained["url"], trained["tmp"])
    _assert_clean_failure(proc, "no version 99")


# --------------------------------------------------------------------------------------------- canary
@pytest.fixture
def live_gateway(tmp_path: Path, ray_cluster: None):  # noqa: ANN201
    """A gateway in this process serving model M: v1 at 100 %, v2 and v3 published and staged."""
    url = _sqlite_url(tmp_path / "registry.db")
    reg = Registry(url)
    reg.upgrade()
    model = "cn" + uuid.uuid4().hex[:6]
    for seed in (1, 2, 3):
        onnx, names = small_onnx(seed=seed)
        reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path, controller_interval_s=0.0).start()
    try:
        yield {"url": url, "model": model, "reg": reg, "target": f"127.0.0.1:{gw.port}", "tmp": tmp_path}
    finally:
        gw.stop()
        reg.dispose()


def test_canary_set_changes_the_split_and_refuses_bad_input(live_gateway: dict) -> None:
    url, model, reg, target, tmp = (live_gateway[k] for k in ("url", "model", "reg", "target", "tmp"))

    def canary(version: int, percent: int, **env: str) -> subprocess.CompletedProcess[str]:
        return chimera(["canary", "set", model, "--version", str(version), "--percent", str(percent),
                        "--target", target], url, tmp, **env)

    ok = canary(2, 10, CHIMERA_ADMIN_TOKEN=ADMIN_TOKEN)
    assert ok.returncode == 0, _out(ok)
    assert f"{model} split revision 2: v1=90%, v2=10%" in ok.stdout
    split = reg.get_split(model)
    assert (split.revision, dict(split.weights)) == (2, {1: 90, 2: 10})

    def unchanged() -> None:
        s = reg.get_split(model)
        assert (s.revision, dict(s.weights)) == (2, {1: 90, 2: 10})

    # A percentage outside 0..100: usage error naming the problem; nothing sent.
    _assert_clean_failure(canary(3, 150, CHIMERA_ADMIN_TOKEN=ADMIN_TOKEN), "percent must be within 0..100")
    unchanged()
    # v3 at 95 % cannot sum to 100 while v2 holds 10 %: the message says what holds the traffic.
    _assert_clean_failure(canary(3, 95, CHIMERA_ADMIN_TOKEN=ADMIN_TOKEN), "already hold 10%")
    unchanged()
    # No token: refused before dialling; a wrong token: the gateway says UNAUTHENTICATED.
    _assert_clean_failure(canary(3, 5), "CHIMERA_ADMIN_TOKEN is not set")
    unchanged()
    _assert_clean_failure(canary(3, 5, CHIMERA_ADMIN_TOKEN="not-the-token"), "UNAUTHENTICATED")
    unchanged()
    # An unknown model: the gateway's NOT_FOUND, printed as a message.
    proc = chimera(["canary", "set", "no-such-model", "--version", "2", "--percent", "10",
                    "--target", target], url, tmp, CHIMERA_ADMIN_TOKEN=ADMIN_TOKEN)
    _assert_clean_failure(proc, "NOT_FOUND", "no-such-model")
    unchanged()


# ------------------------------------------------------------------------------------------- simulate
def _check_scenario(res: dict, scenario: str, runs: int) -> None:
    """The JSON of one scenario (rollout.simulate): rates with Wilson 95 % intervals and the checks."""
    assert res["scenario"] == scenario and res["runs"] == runs
    assert {"kind", "description", "seed", "max_requests", "look_every", "checks"} <= res.keys()
    for key in ("rollback", "promotion", "held_by_srm"):
        r = res[key]
        assert 0.0 <= r["ci_low"] <= r["rate"] <= r["ci_high"] <= 1.0, (key, r)
    assert "median_outcomes_to_rollback" in res and "median_seconds_to_rollback" in res


def test_simulate_single_scenario_prints_json(tmp_path: Path) -> None:
    proc = chimera(["simulate", "--scenario", "ab-worse", "--runs", "3", "--seed", "7"],
                   _sqlite_url(tmp_path / "r.db"), tmp_path)
    res = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    _check_scenario(res, "ab-worse", 3)
    assert res["seed"] == 7 and res["kind"] == "worse"
    assert proc.returncode == (0 if all(res["checks"].values()) else 1), _out(proc)


def test_simulate_all_runs_every_scenario_and_reports_the_checks(tmp_path: Path) -> None:
    proc = chimera(["simulate", "--runs", "2"], _sqlite_url(tmp_path / "r.db"), tmp_path, timeout=600)
    res = json.loads(proc.stdout)
    by_name = {r["scenario"]: r for r in res["scenarios"]}
    for scenario in ("aa", "aa-rare", "aa-step", "ab-worse", "fail", "slow", "srm"):
        _check_scenario(by_name[scenario], scenario, 2)
    assert "false_rollback_ci_high_le_6.5pct" in by_name["aa"]["checks"]
    # Exit status is the acceptance verdict (2 runs are too few for it to mean much, but it must agree).
    assert proc.returncode == (0 if res["passed"] else 1), _out(proc)


@pytest.mark.acceptance
def test_simulate_without_runs_uses_the_per_scenario_default(tmp_path: Path) -> None:
    # The acceptance: >= 1,000 A/A runs, false rollbacks <= 5 % with the 95 % upper bound <= 6.5 %.
    # 92 s on two cores, so `make acceptance` runs it; make test runs every A/A scenario at 40 runs
    # (tests/unit/test_simulate.py) and the CLI's JSON at 2-3 runs (the tests above).
    # `--json` is what the command line says; the output is JSON either way.
    proc = chimera(["simulate", "--scenario", "aa", "--json"], _sqlite_url(tmp_path / "r.db"), tmp_path,
                   timeout=900)
    assert proc.returncode == 0, _out(proc)
    out = json.loads(proc.stdout)
    _check_scenario(out, "aa", 1000)
    assert out["rollback"]["rate"] <= 0.05 and out["rollback"]["ci_high"] <= 0.065, out


def test_simulate_rejects_bad_options_without_traceback(tmp_path: Path) -> None:
    url = _sqlite_url(tmp_path / "r.db")
    _assert_clean_failure(chimera(["simulate", "--scenario", "bogus", "--runs", "1"], url, tmp_path),
                          "invalid choice")
    _assert_clean_failure(chimera(["simulate", "--runs", "0"], url, tmp_path), "runs")


# ---------------------------------------------------------------------------------------------- serve
GRACE_S = 6.0
