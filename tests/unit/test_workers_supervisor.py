"""The supervisor of `chimera serve --processes N` (chimera.cli.workers) with small real child processes in
the gateway's place: the order it starts them in, what it does when one fails before or after it listens,
and how it stops them. tests/integration/test_workers.py runs it with real gateways."""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from pathlib import Path

from chimera.cli.workers import READY_MARK, Workers

# A stand-in worker: announces it listens (as gateway.server.serve_forever prints), then serves until
# SIGTERM and exits 0. With a marker path, the first run of worker 1 exits 1 a moment after listening.
SCRIPT = f"""
import os, signal, sys, time
i, marker = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("{READY_MARK} 127.0.0.1:0", flush=True)
if i == 1 and marker != "-" and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(0.2)
    sys.exit(1)
while True:
    time.sleep(0.05)
"""


def _stop_when(workers: Workers, condition, timeout: float = 20.0) -> None:  # noqa: ANN001
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            time.sleep(0.05)
        workers.stopping.set()

    threading.Thread(target=watch, daemon=True).start()


def test_workers_start_in_order_and_stop_cleanly_on_a_signal() -> None:
    out = io.StringIO()
    workers = Workers(2, lambda i: [sys.executable, "-c", SCRIPT, str(i), "-"], {}, stop_timeout_s=10,
                      out=out)
    _stop_when(workers, lambda: "2 workers listening" in out.getvalue())
    assert workers.run() == 0
    text = out.getvalue()
    assert (text.index("worker 0 started") < text.index(f"[worker 0] {READY_MARK}")
            < text.index("worker 1 started"))
    assert f"[worker 1] {READY_MARK}" in text
    assert all(w.proc is not None and w.proc.returncode == 0 for w in workers.workers)


def test_a_worker_that_fails_before_listening_fails_the_command_and_starts_no_other() -> None:
    out = io.StringIO()
    workers = Workers(3, lambda i: [sys.executable, "-c", "import sys; sys.exit(3)"], {}, stop_timeout_s=5,
                      out=out)
    assert workers.run() == 3
    assert "worker 0 exited with status 3 before it listened" in out.getvalue()
    assert "worker 1 started" not in out.getvalue()


def test_a_worker_that_dies_after_listening_is_restarted_with_its_index(tmp_path: Path) -> None:
    out = io.StringIO()
    marker = tmp_path / "first-run-done"
    workers = Workers(2, lambda i: [sys.executable, "-c", SCRIPT, str(i), str(marker)], {}, stop_timeout_s=10,
                      out=out)
    _stop_when(workers, lambda: workers.workers[1].restarts == 1 and workers.workers[1].listening.is_set())
    # What run() must put back is whatever was there before: Python's default_int_handler, or SIG_IGN when
    # the suite was started in the background by a shell (`make test &` ignores SIGINT for its children).
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    assert workers.run() == 0
    text = out.getvalue()
    assert "worker 1 (pid" in text and "exited with status 1; restarting it in 1 s" in text
    assert text.count("worker 1 started") == 2 and text.count("worker 0 started") == 1
    assert workers.workers[1].restarts == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers put back
