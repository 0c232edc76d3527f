"""`make test`'s two xdist workers (tests/conftest.py): the tests that need Ray share one worker, and a
Ray test that reaches another worker fails with the reason instead of starting a second Ray. Run here in
a pytest of its own, on two tests that carry the `ray` mark and start nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TWO_RAY_TESTS = '''
import pytest


@pytest.mark.ray
def test_a() -> None:
    pass


@pytest.mark.ray
def test_b() -> None:
    pass
'''


def run_two(tmp_path: Path, dist: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_two.py").write_text(TWO_RAY_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c",
                           str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "--basetemp",
                           str(tmp_path / "bt"), "-p", "no:cacheprovider", "-n", "2", "--dist", dist,
                           str(tmp_path / "test_two.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_ray_tests_share_one_worker_under_make_tests_schedule(tmp_path: Path) -> None:
    """`--dist loadgroup`, as `make test` runs: both Ray tests go to one worker, so both pass. Under pytest 9
    with xdist 3.8 the group was silently dropped (pyproject pins pytest below 9); this would fail."""
    res = run_two(tmp_path, "loadgroup")
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_a_ray_test_in_a_second_worker_fails_with_the_reason(tmp_path: Path) -> None:
    """`--dist each` runs every test in both workers: the second worker to reach a Ray test fails it."""
    res = run_two(tmp_path, "each")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "would start a second Ray" in res.stdout and "the xdist group 'ray' was not applied" in res.stdout
    assert "2 passed" in res.stdout and "2 error" in res.stdout, res.stdout[-2000:]
