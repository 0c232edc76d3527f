"""`chimera shadow report` end to end on both registry backends: rows stored through the registry API
(served predictions with their features, shadow scores, outcomes), the real Typer app, the numbers
checked against ones computed here from the rows the test built. No Ray, no gateway."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from chimera import cli
from chimera.cli import views
from registry import Registry
from registry.repository import PredictionRow
from registry.rollouts import insert_rollout_rows

MODEL = "shadowed"
V1_NAMES = ["age", "income", "flag"]
V3_NAMES = ["income", "flag", "age"]  # a served canary with the same features in another order


@pytest.fixture
def run_cli(registry_url: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", registry_url)
    monkeypatch.setattr(views, "console", Console(width=400, no_color=True))
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli.app, list(args))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output

    return run


def _pred(rid: str, version: int, score: float, at: datetime, features: list[float] | None, *,
          pinned: bool = False, failed_version: int | None = None) -> dict[str, object]:
    return {"request_id": rid, "model": MODEL, "version": version, "routing_key": "", "score": score,
            "latency_ms": 1.0, "created_at": at, "features": features, "split_revision": 1, "pinned": pinned,
            "failed_version": failed_version}


MIRROR = timedelta(milliseconds=3)


def _populate(registry: Registry) -> dict[str, np.ndarray]:
    """400 paired rows (300 served by v1, 100 by v3), shadow v2 scoring 0.25 higher where age > 70;
    outcomes on the first half; every 10th row without logged features. Plus rows the report must
    leave out: pinned, failed over, another shadow version, and 50 rows three days old."""
    onnx = b"not-a-real-model"
    registry.publish_version(MODEL, onnx, V1_NAMES, status="production", metric="brier")
    registry.publish_version(MODEL, onnx, V1_NAMES, status="staged")
    registry.publish_version(MODEL, onnx, V3_NAMES, status="canary")
    registry.set_shadow(MODEL, 2, actor="test")
    rng = np.random.default_rng(3)
    n, now = 400, datetime.now(UTC)
    age, income, flag = rng.uniform(18, 90, n), rng.normal(50, 10, n), rng.integers(0, 2, n).astype(float)
    served = rng.uniform(0.05, 0.7, n)
    shadow = np.clip(served + np.where(age > 70, 0.25, 0.0) + rng.normal(0, 0.01, n), 0, 1)
    version = np.where(np.arange(n) < 300, 1, 3)
    preds, shadows = [], []
    for i in range(n):
        row = {"age": age[i], "income": income[i], "flag": flag[i]}
        names = V1_NAMES if version[i] == 1 else V3_NAMES
        feats = None if i % 10 == 0 else [float(row[k]) for k in names]
        at = now - timedelta(minutes=5)
        preds.append(_pred(f"r{i}", int(version[i]), float(served[i]), at, feats))
        # A mirror score is written milliseconds after its request is answered (the same UTC day, which
        # pairs them: registry.models.mirrored_with).
        shadows.append(PredictionRow(f"r{i}", MODEL, 2, float(shadow[i]), 2.0, created_at=at + MIRROR))
    for extra in ("pinned", "failed", "other", *(f"old{k}" for k in range(50))):
        at = now - timedelta(days=3 if extra.startswith("old") else 0)
        preds.append(_pred(extra, 1, 0.1, at, [80.0, 1.0, 1.0],
                           pinned=extra == "pinned", failed_version=3 if extra == "failed" else None))
        shadows.append(PredictionRow(extra, MODEL, 4 if extra == "other" else 2, 0.9, 2.0,
                                     created_at=at + MIRROR))
    insert_rollout_rows(registry, preds)
    registry.insert_shadow_predictions(shadows)
    y = (rng.uniform(size=n) < served).astype(float)
    assert registry.record_outcomes([(f"r{i}", float(y[i])) for i in range(200)]) == [None] * 200
    registry.record_outcomes([(f"old{k}", 1.0) for k in range(50)])
    return {"served": served, "shadow": shadow, "y": y[:200], "age": age}


def test_shadow_report_numbers_json_and_plot(registry: Registry, run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    rows = _populate(registry)
    served, shadow = rows["served"], rows["shadow"]
    png = tmp_path / "shadow.png"

    code, out = run_cli("shadow", "report", MODEL, "--since", "1d", "--json", "--plot", str(png))
    assert code == 0, out
    r = json.loads(out)
    assert (r["version"], r["n_pairs"], r["n_dropped"]) == (2, 400, 0)  # pinned, failed, other, old: out
    assert r["served_versions"] == {"1": 300, "3": 100}
    a, t = r["agreement"], 0.5  # no decision_threshold configured: 0.5
    assert a["threshold"] == t
    assert a["both_positive"] == int(((served >= t) & (shadow >= t)).sum())
    assert a["shadow_only"] == int(((served < t) & (shadow >= t)).sum()) > 0
    assert a["share"] == pytest.approx(float(((served >= t) == (shadow >= t)).mean()))
    d = shadow - served
    assert r["difference"]["mean"] == pytest.approx(float(d.mean()))
    assert r["difference"]["quantiles"]["p95"] == pytest.approx(float(np.quantile(d, 0.95)))
    assert r["losses"]["n"] == 200
    want = float(np.mean((shadow[:200] - rows["y"]) ** 2) - np.mean((served[:200] - rows["y"]) ** 2))
    assert r["losses"]["difference"]["brier"] == pytest.approx(want)
    # features aligned by name across v1 and v3's orders: the age slice differs most, its top bin most
    assert r["n_with_features"] == 360
    top = r["slices"][0]
    assert top["feature"] == "age" and top["n"] == 360
    assert top["bins"][-1]["mean_abs_diff"] > 0.2 > top["bins"][0]["mean_abs_diff"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    code, out = run_cli("shadow", "report", MODEL, "--json")  # without --since: the 3-day-old rows too
    assert json.loads(out)["n_pairs"] == 450
    day_ago = (datetime.now(UTC) - timedelta(days=1)).replace(tzinfo=None).isoformat()  # ISO, no offset: UTC
    code, out = run_cli("shadow", "report", MODEL, "--json", "--since", day_ago)
    assert json.loads(out)["n_pairs"] == 400
    code, out = run_cli("shadow", "report", MODEL, "--since", "yesterday")
    assert code == 2 and "--since" in out

    code, out = run_cli("shadow", "report", MODEL, "--since", "1d")  # the terminal view
    assert code == 0 and "shadow v2 on 400 paired rows (served by v1: 300, v3: 100)" in out
    assert "agreement" in out and "losses on the 200 rows" in out
    assert "where they differ most" in out and " age " in out


def test_threshold_from_config_option_and_errors(registry: Registry, run_cli) -> None:  # noqa: ANN001
    rows = _populate(registry)
    served, shadow = rows["served"], rows["shadow"]
    registry.set_rollout_config(MODEL, {"decision_threshold": 0.3})
    code, out = run_cli("shadow", "report", MODEL, "--since", "1d", "--json")
    a = json.loads(out)["agreement"]
    assert a["threshold"] == 0.3
    assert a["share"] == pytest.approx(float(((served >= 0.3) == (shadow >= 0.3)).mean()))
    code, out = run_cli("shadow", "report", MODEL, "--since", "1d", "--json", "--threshold", "0.7")
    assert json.loads(out)["agreement"]["threshold"] == 0.7

    code, out = run_cli("shadow", "report", MODEL, "--version", "3")  # v3 never shadowed: no pairs
    assert code == 0 and "no paired rows yet" in out
    code, out = run_cli("shadow", "report", MODEL, "--version", "3", "--json")
    assert json.loads(out)["message"] == "no paired rows yet"

    registry.set_shadow(MODEL, None, actor="test")
    code, out = run_cli("shadow", "report", MODEL)
    assert code == 1 and "has no shadow version now" in out
    code, out = run_cli("shadow", "report", "nope", "--version", "1")
    assert code == 1 and "nope" in out
    code, out = run_cli("shadow", "report", MODEL, "--version", "2", "--threshold", "1.5")
    assert code == 2
    registry.set_rollout_config(MODEL, {"decision_threshold": 2})
    code, out = run_cli("shadow", "report", MODEL, "--version", "2")
    assert code == 2 and "decision_threshold" in out
