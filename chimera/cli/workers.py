"""`chimera serve --processes N`: N gateway processes on one port, for a machine with the cores for them.

Why: one gateway is one grpc.aio event loop, and it tops out near one core (docs/performance.md). On a
machine with more cores, more processes serve more calls; on this 2-core machine they do not (measured
there too).

How: this process becomes a supervisor that serves nothing itself. It joins the Ray cluster named by
RAY_ADDRESS or starts a local one that every worker joins, then starts worker 0 (`chimera serve --worker
0 ...`) and waits until it listens: its replicas are deployed by then, so the other workers adopt them
instead of racing to deploy the same applications. Then it starts workers 1..N-1. Every worker binds
the same port with SO_REUSEPORT, and the kernel spreads incoming *connections* over them: a client with
one HTTP/2 connection (grpc-go's default ClientConn) talks to one worker, so spreading a caller's load
takes several connections (a pool of ClientConns, or a load balancer in front).

Per worker: its metrics on `--metrics-port + i` (one Prometheus target each), its own spill files
(gateway.config.GatewayConfig.worker), and the rollout controller in worker 0 only (the others run with
`--controller-interval 0`; the controller's fence would make two safe, one is enough). Worker i's
output lines are printed prefixed with `[worker i]`; its logging goes to the same stderr.

Signals: SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each drains as a single gateway
does (gateway.drain), and the supervisor waits for them, killing only a worker still alive
`stop_timeout_s` later. A worker that exits on its own after it has listened is restarted with the same
index (so it replays its own spill file), after 1 s, doubling up to 30 s while it keeps failing; a worker
that exits before it ever listened (a bad setting, a taken port) stops the whole command with its exit
status instead of restarting forever.

Written here rather than with a process manager (supervisord, circus): those are daemons with their
own configuration, and this needs exactly three things they do not do by themselves: give each worker
its index, start worker 0 before the others, and treat "exited before listening" as a failure of the
command."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)
READY_MARK = "chimera gateway listening on"  # what gateway.server.serve_forever prints once it serves
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
POLL_S = 0.1


class _Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[str] | None = None
        self.listening = threading.Event()
        self.restart_at: float | None = None
        self.backoff_s = RESTART_MIN_S
        self.restarts = 0


class Workers:
    """Start `n` workers (`command(i)` is worker i's argv), keep them running, stop them on a signal."""

    def __init__(self, n: int, command: Callable[[int], list[str]], env: dict[str, str],
                 stop_timeout_s: float, out: IO[str] | None = None) -> None:
        if n < 1:
            raise ValueError("at least one worker")
        self.command = command
        self.env = env
        self.stop_timeout_s = stop_timeout_s
        self.out = out if out is not None else sys.stdout
        self.workers = [_Worker(i) for i in range(n)]
        self.stopping = threading.Event()
        self._out_lock = threading.Lock()

    # ---------------------------------------------------------------- output
    def say(self, text: str) -> None:
        with self._out_lock:
            self.out.write(text + "\n")
            self.out.flush()

    def _relay(self, w: _Worker, proc: subprocess.Popen[str]) -> None:
        """Copy the worker's stdout, prefixed; notice when it listens."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if READY_MARK in line and proc is w.proc:
                w.listening.set()
            self.say(f"[worker {w.index}] {line.rstrip()}")

    # ---------------------------------------------------------------- lifecycle
    def _start(self, w: _Worker) -> None:
        w.listening.clear()
        w.proc = subprocess.Popen(self.command(w.index), env=self.env, stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
        self.say(f"chimera serve: worker {w.index} started (pid {w.proc.pid})")
        threading.Thread(target=self._relay, args=(w, w.proc), name=f"chimera-worker-{w.index}-out",
                         daemon=True).start()

    def _wait_listening(self, ws: list[_Worker]) -> int | None:
        """Until every worker in `ws` listens (None), one exits first (its exit status), or a stop."""
        while not self.stopping.is_set():
            for w in ws:
                assert w.proc is not None
                code = w.proc.poll()
                if code is not None and not w.listening.is_set():
                    self.say(f"chimera serve: worker {w.index} exited with status {code} before it listened")
                    return code or 1
            if all(w.listening.is_set() for w in ws):
                return None
            time.sleep(POLL_S)
        return None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status for the command (0: every worker stopped
        cleanly)."""
        previous = {sig: signal.signal(sig, lambda *_: self.stopping.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        first, rest = self.workers[0], self.workers[1:]
        self._start(first)
        failed = self._wait_listening([first])
        if failed is None and rest and not self.stopping.is_set():
            for w in rest:
                self._start(w)
            failed = self._wait_listening(rest)
        if failed is None and not self.stopping.is_set():
            self.say(f"chimera serve: {len(self.workers)} workers listening")
            self._watch()
        status = self._stop()
        return status if failed is None else failed

    def _watch(self) -> None:
        """Restart a worker that exited on its own, with backoff, until a stop is asked for."""
        while not self.stopping.wait(POLL_S):
            now = time.monotonic()
            for w in self.workers:
                assert w.proc is not None
                if w.restart_at is None:
                    code = w.proc.poll()
                    if code is None:
                        if w.listening.is_set():
                            w.backoff_s = RESTART_MIN_S  # it came back: the next failure starts over
                        continue
                    w.restart_at = now + w.backoff_s
                    self.say(f"chimera serve: worker {w.index} (pid {w.proc.pid}) exited with status {code}; "
                             f"restarting it in {w.backoff_s:g} s")
                    w.backoff_s = min(w.backoff_s * 2, RESTART_MAX_S)
                elif now >= w.restart_at:
                    w.restart_at = None
                    w.restarts += 1
                    self._start(w)

    def _stop(self) -> int:
        """SIGTERM to every live worker, wait for all (killing any still alive after stop_timeout_s);
        0 when every worker exited with 0."""
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.stop_timeout_s
        status = 0
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                code = w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"chimera serve: worker {w.index} (pid {w.proc.pid}) did not stop in "
                         f"{self.stop_timeout_s:g} s; killing it")
                w.proc.kill()
                code = w.proc.wait()
            if code != 0 and w.restart_at is None:
                status = 1
        return status
