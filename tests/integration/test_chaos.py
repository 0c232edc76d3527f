"""Chaos under steady load, then the ledger: every fault the issue names, one after another, against a
real `chimera serve` process on its own PostgreSQL, while clients keep predicting and sending outcomes.

Timeline (CHIMERA_CHAOS_S, default 300 s; `CHIMERA_CHAOS_S=1800 pytest tests/integration/test_chaos.py`
for a longer run, documented in README), as fractions of the run:
  0.10  SIGKILL the canary's replica (Ray Serve replaces it; rows fail over or wait)
  0.25  PostgreSQL stopped for 0.10 of the run (rows and outcomes spill, then replay)
  0.50  PostgreSQL hung with SIGSTOP for 0.08 of the run (client-side timeouts, spill, replay)
  0.70  the gateway SIGTERMed and started again on the same spill directory
  1.00  load stops; wait until every spill is replayed

The ledger, checked in the database afterwards:
  - every prediction answered OK is stored exactly once, under the version that answered it;
  - every outcome the gateway accepted (OK) is stored with the value sent;
  - nothing else: no stored prediction that no client sent, no outcome for a request nobody sent.
Calls that failed (UNAVAILABLE while the gateway restarts, DEADLINE_EXCEEDED while things stall) are
allowed; they are counted and printed, and a call that failed may or may not be stored (the client
could not know), so they are excluded from "nothing else" only in that direction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from loadtest.ports import free_port
from registry import Registry
from registry.models import Outcome, Prediction
from tests.harness import replica_pids, small_onnx, wait_for
from tests.pg import PostgresServer

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
CHAOS_S = float(os.environ.get("CHIMERA_CHAOS_S", "300"))
FEATURES = [0.1, 0.2, 0.3, 0.4]


class Serve:
    """One `chimera serve` process; restartable on the same spill directory."""

    def __init__(self, tmp: Path, url: str) -> None:
        import ray

        self.tmp, self.port = tmp, free_port()
        self.env = {**os.environ, "CHIMERA_REGISTRY_URL": url, "CHIMERA_REPLICA_NUM_CPUS": "0.1",
                    "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                    "CHIMERA_DB_CONNECT_TIMEOUT_S": "2", "CHIMERA_DB_QUERY_TIMEOUT_S": "3"}
        for name in ("CHIMERA_PREDICT_TOKEN", "CHIMERA_OUTCOMES_TOKEN", "CHIMERA_ADMIN_TOKEN"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.tmp / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - owned by the process
        # The spill files live in cwd/.chimera: the same directory after a restart.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimera", "serve", "--port", str(self.port), "--metrics-port", "0",
             "--host", "127.0.0.1", "--controller-interval", "0", "--grace", "8", "--drain-delay", "0.5"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(channel).result(timeout=180)
        channel.close()

    def sigterm(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        """Teardown after a failure: the gateway this test started, by pid, never left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("serve-*.log")))


class Ledger:
    """What clients were told. Thread-safe enough: each list is appended by the GIL-atomic append."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.ok: list[tuple[str, int]] = []
        self.failed: Counter[str] = Counter()
        self.outcomes_ok: dict[str, float] = {}
        self.outcomes_sent: set[str] = set()


def load(port: int, model: str, ledger: Ledger, stop: threading.Event, worker: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.PredictionServiceStub(channel)
    i = 0
    while not stop.is_set():
        rid = f"c{worker}-{i}-{uuid.uuid4().hex[:6]}"
        i += 1
        ledger.sent.append(rid)
        try:
            request = pb.PredictRequest(model=model, request_id=rid, routing_key=rid, dense=FEATURES)
            resp = stub.Predict(request, timeout=5)
        except grpc.RpcError as exc:
            ledger.failed[f"Predict {exc.code().name}"] += 1
            time.sleep(0.05)
            continue
        ledger.ok.append((resp.request_id, resp.version))
        if i % 2 == 0:
            value = float(i % 4 == 0)
            ledger.outcomes_sent.add(rid)
            try:
                stub.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=value), timeout=5)
                ledger.outcomes_ok[rid] = value
            except grpc.RpcError as exc:
                ledger.failed[f"RecordOutcome {exc.code().name}"] += 1
        time.sleep(0.01)
    channel.close()


def stored(url: str, model: str) -> tuple[Counter[str], dict[str, int], dict[str, float]]:
    reg = Registry(url)
    try:
        with reg.session() as s:
            # One statement for every prediction row (one snapshot): a count taken by a second statement
            # races the spill replay inserting between the two, on PostgreSQL's READ COMMITTED.
            everything = s.execute(select(Prediction.request_id, Prediction.version, Prediction.model)).all()
            outcomes = dict(s.execute(select(Outcome.request_id, Outcome.value)).tuples().all())
    finally:
        reg.dispose()
    other = [r for r in everything if r[2] != model]
    assert not other, f"predictions stored under another model: {other[:10]}"
    return Counter(r[0] for r in everything), {r[0]: r[1] for r in everything}, outcomes


def test_chaos_then_ledger(tmp_path: Path, own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database()
    reg = Registry(url)
    reg.upgrade()
    model = "chaos" + uuid.uuid4().hex[:6]
    names = [f"f{i}" for i in range(4)]
    reg.publish_version(model, small_onnx(seed=1)[0], names, status="production")
    reg.publish_version(model, small_onnx(seed=2)[0], names)
    reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="test")
    reg.dispose()

    serve = Serve(tmp_path, url)
    try:
        serve.start()
        ledger, stop = Ledger(), threading.Event()
        workers = [threading.Thread(target=load, args=(serve.port, model, ledger, stop, w), daemon=True)
                   for w in range(3)]
        t0 = time.monotonic()
        for w in workers:
            w.start()

        def at(fraction: float) -> None:
            time.sleep(max(0.0, t0 + fraction * CHAOS_S - time.monotonic()))

        events: list[str] = []
        try:
            at(0.10)
            canary = replica_pids(model, 2)
            assert canary, "the canary has no live replica to kill"
            for pid in canary:
                os.kill(pid, signal.SIGKILL)
            events.append(f"{time.monotonic() - t0:.0f}s killed canary replica {sorted(canary)}")

            at(0.25)
            own_postgres.pause()
            events.append(f"{time.monotonic() - t0:.0f}s PostgreSQL stopped")
            at(0.35)
            own_postgres.resume()
            events.append(f"{time.monotonic() - t0:.0f}s PostgreSQL started")

            at(0.50)
            hung = own_postgres.pids()
            for pid in hung:
                os.kill(pid, signal.SIGSTOP)
            events.append(f"{time.monotonic() - t0:.0f}s PostgreSQL hung ({len(hung)} processes)")
            at(0.58)
            for pid in hung:
                os.kill(pid, signal.SIGCONT)
            events.append(f"{time.monotonic() - t0:.0f}s PostgreSQL resumed")

            at(0.70)
            rc = serve.sigterm()
            assert rc == 0, serve.logs()
            events.append(f"{time.monotonic() - t0:.0f}s gateway SIGTERMed (exit {rc}), restarting")
            serve.start()
            events.append(f"{time.monotonic() - t0:.0f}s gateway serving again")
            at(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join(30)

        answered = dict(ledger.ok)
        assert len(answered) > 1000, (len(answered), ledger.failed)
        # Every spill replayed: wait until the database holds every answered prediction and accepted outcome.
        def complete() -> bool:
            counts, _, outcomes = stored(url, model)
            return answered.keys() <= counts.keys() and ledger.outcomes_ok.keys() <= outcomes.keys()

        try:
            wait_for(complete, 180, "every answered prediction and accepted outcome in the database")
        finally:
            summary = (f"events: {events}\nanswered {len(answered)}, failed calls {dict(ledger.failed)}, "
                       f"outcomes accepted {len(ledger.outcomes_ok)}")
            print(summary)
        counts, versions, outcomes = stored(url, model)
        assert serve.sigterm() == 0, serve.logs()
        twice = [rid for rid, n in counts.items() if n > 1]
        assert not twice, f"stored more than once: {twice[:10]}\n{summary}"
        wrong_version = [rid for rid, v in answered.items() if versions[rid] != v]
        assert not wrong_version, f"stored under another version than answered: {wrong_version[:10]}"
        sent = set(ledger.sent)
        phantoms = [rid for rid in counts if rid not in sent]
        assert not phantoms, f"stored predictions nobody sent: {phantoms[:10]}"
        wrong_value = [rid for rid, v in ledger.outcomes_ok.items() if outcomes[rid] != v]
        assert not wrong_value, f"outcomes stored with another value: {wrong_value[:10]}"
        stray = [rid for rid in outcomes if rid.startswith("c") and rid not in ledger.outcomes_sent]
        assert not stray, f"outcomes stored that nobody sent: {stray[:10]}"
        # Each fault was felt and survived: the kill gave a new replica, and the gateway came back.
        assert serve.starts == 2
    finally:
        serve.kill()
