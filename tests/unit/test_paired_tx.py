"""gateway.records.paired_tx: two halves written at once are committed only when both were written; a
failure in either rolls both back, and equal keys always share a half."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from gateway.records.paired_tx import DaemonThreads, halves, write_both


class _Cursor:
    def close(self) -> None:
        pass


class _Conn:
    def __init__(self, log: list[str], name: str, fail_commit: bool = False) -> None:
        self.log, self.name, self.fail_commit = log, name, fail_commit

    def cursor(self) -> Any:
        return _Cursor()

    def close(self) -> None:
        self.log.append(f"{self.name} close")

    def commit(self) -> None:
        if self.fail_commit:
            raise OSError("server went away")
        self.log.append(f"{self.name} commit")

    def rollback(self) -> None:
        self.log.append(f"{self.name} rollback")


def _connect(log: list[str], fail_commit: str = "") -> Any:
    """Connections named by who writes on them: "a" (write_a, the calling thread) and "b" (the pool)."""
    def connect() -> _Conn:
        name = "a" if threading.current_thread() is threading.main_thread() else "b"
        return _Conn(log, name, fail_commit == name)

    return connect


def _boom(_cur: Any) -> int:
    raise ValueError("refused")


@pytest.fixture
def pool() -> DaemonThreads:
    return DaemonThreads("test-pair")  # what the prediction log uses


def test_both_written_then_both_committed(pool: DaemonThreads) -> None:
    log: list[str] = []
    assert write_both(_connect(log), lambda _c: 3, lambda _c: 4, pool) == 7
    assert log.count("a commit") + log.count("b commit") == 2 and "a rollback" not in log


@pytest.mark.parametrize("failing", ["first", "second"])
def test_a_failing_half_rolls_both_back(pool: DaemonThreads, failing: str) -> None:
    log: list[str] = []
    a, b = (_boom, lambda _c: 1) if failing == "first" else (lambda _c: 1, _boom)
    with pytest.raises(ValueError):
        write_both(_connect(log), a, b, pool)
    assert not any(e.endswith("commit") for e in log)
    assert sorted(e for e in log if e.endswith("rollback")) == ["a rollback", "b rollback"]
    assert sorted(e for e in log if e.endswith("close")) == ["a close", "b close"]


def test_a_failed_first_commit_rolls_the_second_back(pool: DaemonThreads) -> None:
    log: list[str] = []
    with pytest.raises(OSError):
        write_both(_connect(log, fail_commit="a"), lambda _c: 1, lambda _c: 1, pool)
    assert "b commit" not in log and "b rollback" in log


def test_halves_keep_equal_keys_together_and_order() -> None:
    rows = [(f"id-{i % 50}", i) for i in range(1000)]
    first, second = halves(rows, lambda r: r[0])
    assert not {r[0] for r in first} & {r[0] for r in second}
    assert sorted(first + second, key=lambda r: r[1]) == rows
    assert first == sorted(first, key=lambda r: r[1]) and 0 < len(first) < 1000


def test_a_half_stuck_in_a_call_cannot_hold_the_process_exit() -> None:
    """The second half runs on a daemon thread: one stuck in a hung database call is abandoned at
    interpreter exit (a ThreadPoolExecutor worker would be joined, for the whole query timeout)."""
    release = threading.Event()
    seen: list[threading.Thread] = []

    def stuck() -> int:
        seen.append(threading.current_thread())
        release.wait(10)
        return 1

    fut = DaemonThreads("test-pair").submit(stuck)
    try:
        while not seen:
            release.wait(0.01)
        assert seen[0].daemon and seen[0].name == "test-pair"
    finally:
        release.set()
    assert fut.result(5) == 1
