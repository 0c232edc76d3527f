"""The rollout controller's looks in a child process (rollout.lookprocess), on SQLite and PostgreSQL:
the same decisions as in process, hooks (the gateway's metrics) called in the parent, a hung or killed
child replaced without stopping the controller, and no child left behind."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from gateway.config import GatewayConfig
from registry import Registry
from registry.rollouts import decisions
from rollout.analysis import recompute
from rollout.lookprocess import LookProcess
from tests.integration.test_controller import _feed, _setup


def test_a_worse_canary_is_rolled_back_by_a_look_in_a_child_process(registry: Registry) -> None:
    model = _setup(registry, [10, 50, 100], 10)
    fired: list[tuple[str, int, str]] = []
    looks = LookProcess(registry.url, on_decision=lambda m, v, d: fired.append((m, v, d.action)))
    rng = np.random.default_rng(1)
    try:
        for _ in range(60):
            _feed(registry, model, 500, {1: 0.60, 2: 0.40}, rng)
            d = looks.run_once(model)
            assert looks.pid is not None and looks.pid != os.getpid()
            if d is not None and d.action == "rollback":
                break
        assert d is not None and d.action == "rollback", d
        assert dict(registry.get_split(model).weights) == {1: 100}
        assert registry.get_version(model, 2).status == "rolled_back"
        # Every look's hook ran here, in the parent, with the canary version.
        assert fired and fired[-1] == (model, 2, "rollback") and {v for _, v, _ in fired} == {2}
        assert looks.started == 1
        assert looks.resident_bytes() > 20 * 2**20  # the child's own memory, as the gateway exports it
        # The decisions the child stored are the ones `chimera analyze` recomputes from the rows.
        for row in decisions(registry, model):
            assert max(recompute(registry, row["id"]).differences().values()) <= 1e-9
    finally:
        looks.close()


def test_a_failing_look_raises_in_the_parent_naming_the_model(registry: Registry) -> None:
    looks = LookProcess(registry.url)
    try:
        with pytest.raises(RuntimeError, match="rollout look of no-such-model failed"):
            looks.run_once("no-such-model")
        pid = looks.pid
        assert pid is not None  # an error in a look does not cost the child
    finally:
        looks.close()
    assert looks.pid is None and looks.run_once("no-such-model") is None  # closed: no more looks
    assert looks.resident_bytes() == 0


def test_a_hung_or_killed_look_process_is_replaced(registry: Registry) -> None:
    model = _setup(registry, [10, 100], 10)
    _feed(registry, model, 300, {1: 0.5, 2: 0.5}, np.random.default_rng(3))
    looks = LookProcess(registry.url, look_timeout_s=3.0)
    try:
        assert looks.run_once(model) is not None  # starts the child, which decides (hold)
        hung = looks.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # our own child, stopped as a hung process would be
        started = time.monotonic()
        assert looks.run_once(model) is None  # no answer within 3 s: killed, no decision
        assert time.monotonic() - started < 15
        assert looks.pid is None and not _alive(hung)
        _feed(registry, model, 300, {1: 0.5, 2: 0.5}, np.random.default_rng(4))
        assert looks.run_once(model) is not None and looks.started == 2  # a new child took over
        child = looks.pid
        assert child is not None  # never os.kill(0): that signals this test's whole process group
        os.kill(child, signal.SIGKILL)  # killed between looks (the OOM killer, an operator)
        time.sleep(0.5)
        _feed(registry, model, 300, {1: 0.5, 2: 0.5}, np.random.default_rng(5))
        assert looks.run_once(model) is not None and looks.started == 3
        assert len(decisions(registry, model)) == 3
    finally:
        last = looks.pid
        looks.close()
    assert last is not None and not _alive(last)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie of ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("url", "setting", "child"), [
    ("sqlite:///x.db", None, False), ("postgresql+psycopg2://h/db", None, True),
    ("postgres://h/db", None, True), ("sqlite:///x.db", True, True), ("postgresql://h/db", False, False)])
def test_where_looks_run_by_default_and_when_set(url: str, setting: bool | None, child: bool) -> None:
    assert GatewayConfig(registry_url=url, controller_process=setting).looks_in_child() is child
