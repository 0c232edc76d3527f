"""The rollout controller's looks in a process of their own: the control plane out of the serving process.

A look reads every routed request since the canary started (registry.rollouts.look_rows) and builds its
arrays in Python. On PostgreSQL at ~1,100 req/s, half an hour into a rollout, that is ~2 million rows:
tens of seconds of CPU and up to a gigabyte of transient memory per look. In the serving process that
time holds the GIL the event loop needs (p99 went from tens of milliseconds to a second, and calls
failed) and the memory shows as the gateway's RSS swinging (the bench's PostgreSQL soak,
docs/performance.md). Here the same ``RolloutController.run_once`` runs in a child process, so the
serving process only waits, in a worker thread, for a small reply.

Nothing about a decision changes: the child runs the same controller on the same registry with the same
promotion gate, takes the same advisory lock, and commits the same rows; the parent receives the
decision and calls its hooks (the gateway's metrics) as an in-process controller would.

Faults: a child that dies (killed, out of memory) is started again at the next look; one that does not
answer within ``look_timeout_s`` is killed (a look is bounded by the statement timeout, so that is a
hang, not a slow look) and started again; either way that look returns None (no decision) and the
controller loop goes on. The child exits when its pipe closes, so it never outlives its gateway.

multiprocessing's spawn context (a fresh interpreter, not a fork of a process that runs gRPC and Ray
threads); no library offers a request/reply worker with kill-on-timeout, so this is a small one.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import psutil

from registry import Registry
from registry.engine import SERVING_STATEMENT_TIMEOUT_MS, make_engine
from rollout.blas import one_blas_thread
from rollout.controller import ACTOR, DecisionHook, RolloutController, ShadowHook, loadtest_gate

log = logging.getLogger(__name__)
# Ten statement timeouts (300 s): a look that takes longer is stuck, not slow.
LOOK_TIMEOUT_S = 10 * SERVING_STATEMENT_TIMEOUT_MS / 1000


def prepare_child(log_level: int) -> None:
    """What the child sets for its life before its first look."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    one_blas_thread()  # no BLAS threads spinning beside the gateway (rollout.blas)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s [look process]: %(message)s")


def _child(conn: Connection, registry_url: str, gate_max_age_s: float | None, actor: str,
           log_level: int) -> None:
    """The child's loop: a model name in, ("ok", result, hooks fired) or ("error", text) out."""
    prepare_child(log_level)
    engine = make_engine(registry_url, statement_timeout_ms=SERVING_STATEMENT_TIMEOUT_MS)
    registry = Registry(registry_url, engine=engine)
    fired: list[tuple[str, str, int, Any]] = []
    controller = RolloutController(
        registry, promotion_gate=loadtest_gate(gate_max_age_s), actor=actor,
        on_decision=lambda model, version, d: fired.append(("decision", model, version, d)),
        on_shadow=lambda model, version, d: fired.append(("shadow", model, version, d)))
    try:
        while True:
            try:
                model = conn.recv()
            except (EOFError, OSError):
                return  # the gateway is gone
            if model is None:
                return
            fired.clear()
            try:
                result = controller.run_once(model)
                conn.send(("ok", result, list(fired)))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        registry.dispose()


class LookProcess:
    """``run_once(model)`` as ``RolloutController.run_once``, run in a child process (module docstring).
    Thread-safe (one look at a time); blocking, so the caller runs it in a worker thread."""

    def __init__(self, registry_url: str, *, gate_max_age_s: float | None = None, actor: str = ACTOR,
                 on_decision: DecisionHook | None = None, on_shadow: ShadowHook | None = None,
                 look_timeout_s: float = LOOK_TIMEOUT_S) -> None:
        self.registry_url = registry_url
        self.gate_max_age_s = gate_max_age_s
        self.actor = actor
        self.on_decision = on_decision
        self.on_shadow = on_shadow
        self.look_timeout_s = look_timeout_s
        self.started = 0  # children started so far (a restart after a fault adds one)
        self._lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (None before the first look and after close)."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def resident_bytes(self) -> int:
        """The child's resident memory, 0 when there is none: a look holds its rows in memory, so this
        peaks during looks and grows with the rollout (the gateway exports it)."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:  # ended since
            return 0

    def _ensure(self) -> Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self._stop_child()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, name="chimera-look-process", daemon=True,
                           args=(child, self.registry_url, self.gate_max_age_s, self.actor,
                                 logging.getLogger().getEffectiveLevel()))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self.started += 1
        log.info("rollout looks run in process %d", proc.pid)
        return parent

    def run_once(self, model: str) -> Any:
        """One look at one model in the child; None when there is no decision, or when the child died or
        hung (logged; the next look starts a new child)."""
        with self._lock:
            if self._closed:
                return None
            conn = self._ensure()
            try:
                conn.send(model)
                if not conn.poll(self.look_timeout_s):
                    log.error("rollout look of %s: no answer from process %s within %.0f s; killing it",
                              model, self.pid, self.look_timeout_s)
                    self._stop_child()
                    return None
                reply = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                if not self._closed:
                    log.error("rollout look of %s: the look process exited (code %s); starting another "
                              "at the next look", model, self._proc.exitcode if self._proc else None)
                self._stop_child()
                return None
        if reply[0] == "error":
            raise RuntimeError(f"rollout look of {model} failed in the look process: {reply[1]}")
        _, result, fired = reply
        for kind, name, version, d in fired:
            hook = self.on_decision if kind == "decision" else self.on_shadow
            if hook is not None:
                try:
                    hook(name, version, d)
                except Exception:  # metrics must never break a rollout
                    log.exception("%s hook failed", kind)
        return result

    def _stop_child(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()  # the child's recv() sees EOF and returns
        if proc is not None:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()  # our own child, by its handle
                proc.join(timeout=5.0)

    def close(self) -> None:
        """Stop the child. Idle: asked to exit. In the middle of a look: terminated, and the look commits
        nothing (its advisory lock and transaction end with its connection, registry.locks)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                if self._conn is not None:
                    try:
                        self._conn.send(None)
                    except OSError:
                        pass
                self._stop_child()
            finally:
                self._lock.release()
            return
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()  # the thread waiting for its answer sees EOF and cleans up
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
