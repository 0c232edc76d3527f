"""`chimera serve` ends once its gateway has stopped, even when a worker thread is still inside a call
that will not return soon (a database read on a hung PostgreSQL): asyncio.run and the interpreter would
otherwise join that thread for the driver's whole query timeout (chimera.cli.serving._exit_when_stopped;
found by test_hung_postgres's SIGTERM test in a fresh-clone run)."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import asyncio, sys, time
from chimera.cli.serving import _exit_when_stopped

async def gateway(fail):
    asyncio.get_running_loop().run_in_executor(None, time.sleep, 60)  # a read stuck on a hung database
    await asyncio.sleep(0.2)
    print("stopped", flush=True)
    if fail:
        raise RuntimeError("boom")

asyncio.run(_exit_when_stopped(gateway(sys.argv[1] == "fail")))
"""


def run(mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=50)
    return proc, time.monotonic() - t0


def test_a_stuck_worker_thread_does_not_hold_the_exit() -> None:
    proc, took = run("ok")
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stdout and took < 20, took  # not the 60 s the stuck call would take
    assert "exiting without waiting for" in proc.stderr  # says so, naming the threads


def test_a_gateway_that_failed_still_exits_non_zero() -> None:
    proc, took = run("fail")
    assert proc.returncode == 1 and took < 20, (proc.returncode, took, proc.stderr)
    assert "boom" in proc.stderr
