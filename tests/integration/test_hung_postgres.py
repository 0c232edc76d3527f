"""PostgreSQL hung (every server process SIGSTOPped: connections accepted, nothing answers) under a real
`chimera serve` process on a PostgreSQL of the test's own, with the gateway's default database settings.

- Hung for 30 s under load: Predict keeps answering from the cached split with a bounded p99, every
  RecordOutcome is answered within a bound (accepted into the outcome spill instead of waiting out the
  driver's 60 s query timeout), no call fails, and once the server runs again every answered prediction
  and every accepted outcome is in the database exactly once (0 lost, 0 duplicated).
- SIGTERM with PostgreSQL hung and 100k rows queued in the prediction log (the writer stuck in an insert
  that cannot return): the gateway exits in bounded time with code 0, having spilled the queue; a gateway
  started again on the same spill directory replays every row, each stored once.

The PredictionLog-level versions of the second case (no process, no signal) are in
test_spill_durability.py; this file checks the whole gateway does the same. The outcome intake's bound
on one hung database call is also checked on its own, without a gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import func, select

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from loadtest.ports import free_port
from registry import Registry
from registry.models import Outcome, Prediction
from tests.harness import small_onnx, wait_for
from tests.integration.test_spill_durability import tiny_disk
from tests.pg import PostgresServer, continue_all

GATEWAY = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
__all__ = ["tiny_disk"]  # the fixture (a real 256 KiB tmpfs), imported for pytest
FEATURES = [0.1, 0.2, 0.3, 0.4]
HUNG_S = 30.0
PREDICT_P99_BOUND_S = 1.0  # README, Failure modes: Predict while PostgreSQL hangs
OUTCOME_BOUND_S = 5.0  # README, Failure modes: the longest a RecordOutcome waits on a hung database


def hang(server: PostgresServer) -> list[int]:
    pids = server.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


class ServeProcess:
    """One `chimera serve` on loopback, restartable on the same spill directory (cwd/.chimera), with the
    product's default database timeouts unless `env` says otherwise."""

    def __init__(self, tmp: Path, url: str, grace_s: float = 8.0, **env: str) -> None:
        import ray

        self.tmp, self.port, self.metrics_port, self.grace_s = tmp, free_port(), free_port(), grace_s
        self.env = {**os.environ, "CHIMERA_REGISTRY_URL": url, "CHIMERA_REPLICA_NUM_CPUS": "0.1",
                    "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **env}
        for name in ("CHIMERA_PREDICT_TOKEN", "CHIMERA_OUTCOMES_TOKEN", "CHIMERA_ADMIN_TOKEN"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def spill_dir(self) -> Path:
        return self.tmp / ".chimera"

    def start(self) -> ServeProcess:
        self.starts += 1
        log = open(self.tmp / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimera", "serve", "--port", str(self.port), "--metrics-port",
             str(self.metrics_port), "--host", "127.0.0.1", "--controller-interval", "0",
             "--grace", str(self.grace_s), "--drain-delay", "0.5"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=180)
        finally:
            channel.close()
        return self

    def metric(self, name: str) -> float:
        """One unlabelled sample from the gateway's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.tmp.glob("serve-*.log")))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def undeploy(model: str) -> None:
    """The replicas stay on the session's shared Ray after a gateway stops: remove them (2 shared cores)."""
    from replicas.deployment import undeploy_version

    undeploy_version(model, 1)


def publish(url: str) -> str:
    reg = Registry(url)
    try:
        reg.upgrade()
        model = "hung" + uuid.uuid4().hex[:6]
        reg.publish_version(model, small_onnx(seed=5)[0], [f"f{i}" for i in range(4)], status="production")
        reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    finally:
        reg.dispose()
    return model


def stored(url: str, model: str) -> tuple[dict[str, int], dict[str, float]]:
    """Stored predictions of `model` (request id -> times stored) and every stored outcome."""
    reg = Registry(url)
    try:
        with reg.session() as s:
            ids = list(s.scalars(select(Prediction.request_id).where(Prediction.model == model)))
            outcomes = dict(s.execute(select(Outcome.request_id, Outcome.value)).tuples().all())
            assert s.scalar(select(func.count()).select_from(Outcome)) == len(outcomes)
    finally:
        reg.dispose()
    counts: dict[str, int] = {}
    for rid in ids:
        counts[rid] = counts.get(rid, 0) + 1
    return counts, outcomes


class Clients:
    """Closed-loop clients: Predict with unique ids, an outcome for every other answer; each call's
    (start, latency) kept so the hung window can be cut out afterwards."""

    def __init__(self, port: int, model: str, threads: int = 3) -> None:
        self.port, self.model = port, model
        self.ok: list[str] = []
        self.predict_times: list[tuple[float, float]] = []
        self.outcome_times: list[tuple[float, float]] = []
        self.outcomes_ok: dict[str, float] = {}
        self.errors: list[tuple[str, str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(threads)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def _run(self, worker: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = pb_grpc.PredictionServiceStub(channel)
        i = 0
        while not self.stop.is_set():
            rid = f"h{worker}-{i}"
            i += 1
            t0 = time.monotonic()
            try:
                stub.Predict(pb.PredictRequest(model=self.model, request_id=rid, routing_key=rid,
                                               dense=FEATURES), timeout=30)
                self.predict_times.append((t0, time.monotonic() - t0))
                self.ok.append(rid)
            except grpc.RpcError as exc:
                self.errors.append(("Predict", exc.code().name, exc.details() or ""))
                time.sleep(0.05)
                continue
            if i % 2 == 0:
                value = float(i % 4 == 0)
                t0 = time.monotonic()
                try:
                    stub.RecordOutcome(pb.RecordOutcomeRequest(request_id=rid, value=value), timeout=60)
                    self.outcomes_ok[rid] = value
                except grpc.RpcError as exc:
                    self.errors.append(("RecordOutcome", exc.code().name, exc.details() or ""))
                self.outcome_times.append((t0, time.monotonic() - t0))
            time.sleep(0.005)
        channel.close()


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


@GATEWAY[0]
@GATEWAY[1]
def test_postgres_hung_30s_under_load_bounded_answers_nothing_lost(tmp_path: Path,
                                                                    own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database()
    model = publish(url)
    serve = ServeProcess(tmp_path, url).start()
    hung: list[int] = []
    try:
        with Clients(serve.port, model) as clients:
            time.sleep(4.0)
            before = [lat for _, lat in clients.predict_times]
            hung = hang(own_postgres)
            hung_at = time.monotonic()
            time.sleep(HUNG_S)
            continue_all(hung)
            resumed_at = time.monotonic()
            hung = []
            time.sleep(3.0)
        # Every call that overlapped the hang, including those caught in flight when it began.
        during = [lat for t, lat in clients.predict_times if t < resumed_at and t + lat > hung_at]
        outcomes_during = [lat for t, lat in clients.outcome_times if t < resumed_at and t + lat > hung_at]
        summary = (f"Predict p99 before {p99(before) * 1e3:.0f} ms, while hung {p99(during) * 1e3:.0f} ms "
                   f"(max {max(during, default=0) * 1e3:.0f} ms, {len(during)} calls); RecordOutcome while "
                   f"hung: max {max(outcomes_during, default=0) * 1e3:.0f} ms, {len(outcomes_during)} calls; "
                   f"errors {len(clients.errors)}")
        print(summary)
        assert not clients.errors, (clients.errors[:5], summary)
        assert len(during) > 200, summary  # the gateway kept serving while the database hung
        assert p99(during) < PREDICT_P99_BOUND_S, summary
        assert len(outcomes_during) > 50 and max(outcomes_during) < OUTCOME_BOUND_S, summary

        answered = set(clients.ok)

        def complete() -> bool:
            counts, outcomes = stored(url, model)
            return answered <= counts.keys() and clients.outcomes_ok.keys() <= outcomes.keys()

        wait_for(complete, 120, "every answered prediction and accepted outcome in the database")
        counts, outcomes = stored(url, model)
        assert set(counts) == answered and all(n == 1 for n in counts.values())
        assert {rid: outcomes[rid] for rid in clients.outcomes_ok} == clients.outcomes_ok
        assert set(outcomes) == set(clients.outcomes_ok)  # nothing nobody sent
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 0, serve.logs()
    finally:
        continue_all(hung)
        serve.kill()
        undeploy(model)


QUEUED = 100_000
BATCH = 10_000


@GATEWAY[0]
@GATEWAY[1]
def test_sigterm_with_postgres_hung_and_100k_rows_queued_loses_nothing(tmp_path: Path,
                                                                       own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database()
    model = publish(url)
    serve = ServeProcess(tmp_path, url).start()
    hung: list[int] = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{serve.port}")
        stub = pb_grpc.PredictionServiceStub(channel)
        warm = stub.Predict(pb.PredictRequest(model=model, request_id="warm", dense=FEATURES), timeout=30)
        wait_for(lambda: serve.metric("chimera_prediction_log_inserted_rows") >= 1, 30, "the warm row stored")
        hung = hang(own_postgres)
        answered: list[str] = [warm.request_id]
        x = np.tile(np.asarray(FEATURES, "<f4"), (BATCH, 1))
        for b in range(QUEUED // BATCH + 1):  # one batch more: the writer's stuck insert holds one batch
            ids = [f"q{b}-{i}" for i in range(BATCH)]
            resp = stub.PredictBatch(pb.PredictBatchRequest(model=model, matrix=pb.DenseMatrix(
                f32=x.tobytes(), cols=4, request_ids=ids)), timeout=60)
            assert list(resp.request_ids) == ids
            answered += ids
        channel.close()
        depth = serve.metric("chimera_prediction_log_queue_depth")
        assert depth >= QUEUED, f"only {depth:.0f} rows queued"
        assert serve.proc is not None
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        rc = serve.proc.wait(90)
        exited = time.monotonic() - t0
        print(f"{depth:.0f} rows queued behind a hung PostgreSQL; SIGTERM -> exit {rc} in {exited:.1f} s")
        assert rc == 0, serve.logs()
        # The grace period, then at most the writer's 5 s stall watch, plus start-up slack of the interpreter.
        assert exited < serve.grace_s + 5.0 + 10.0, (exited, serve.logs())
        assert "spilling" in serve.logs()
        spilled = sum(p.stat().st_size for p in serve.spill_dir.glob("predictions-*.spill*"))
        assert spilled > 0, sorted(p.name for p in serve.spill_dir.iterdir())
        continue_all(hung)
        hung = []
        serve.start()  # same port and directory: replays what the first run spilled

        def count() -> int:
            counts, _ = stored(url, model)
            return len(counts)

        wait_for(lambda: count() >= len(answered), 120, f"{len(answered)} rows in the database")
        counts, _ = stored(url, model)
        assert set(counts) == set(answered) and all(n == 1 for n in counts.values())
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 0, serve.logs()
    finally:
        continue_all(hung)
        serve.kill()
        undeploy(model)


def test_outcome_intake_waits_a_bounded_time_on_a_hung_database(tmp_path: Path) -> None:
    """A store call that never returns: the outcome is accepted into the spill after `db_wait_s`, later
    outcomes skip the database while that call is stuck, and once it returns the database is used
    again (NOT_FOUND is heard again). The spill replays every accepted outcome, each stored once."""
    import asyncio

    from gateway.records.outcome_intake import OutcomeIntake
    from gateway.records.outcome_log import OutcomeLog
    from gateway.records.prediction_log import PredictionLog
    from registry import NotFoundError
    from registry.repository import PredictionRow

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    reg.upgrade()
    reg.insert_predictions([PredictionRow(request_id=f"p{i}", model="m", version=1, score=0.5, latency_ms=1.0)
                            for i in range(4)])
    log = PredictionLog(reg, tmp_path / "p.spill")
    spill = OutcomeLog(reg, tmp_path / "o.spill")
    intake = OutcomeIntake(reg, log, spill, db_wait_s=0.5)
    release = threading.Event()
    real = reg.record_outcome

    def hung(request_id: str, value: float) -> None:
        release.wait(30)
        real(request_id, value)

    reg.record_outcome = hung  # type: ignore[method-assign]

    async def timed(request_id: str) -> float:
        t0 = time.monotonic()
        await intake.record(request_id, 1.0)
        return time.monotonic() - t0

    first = asyncio.run(timed("p0"))
    assert 0.4 < first < 2.0, first  # waited db_wait_s, then accepted
    assert asyncio.run(timed("p1")) < 0.3  # the stuck call is remembered: straight to the spill
    assert asyncio.run(timed("p2")) < 0.3
    assert spill.stats.spilled == 3
    release.set()  # the database answers: the stuck call stores p0 after all
    wait_for(lambda: not intake._stalled, 10, "the stuck call to return")
    reg.record_outcome = real  # type: ignore[method-assign]
    with pytest.raises(NotFoundError):  # the database is asked again
        asyncio.run(intake.record("no-such-id", 1.0))
    assert spill.replay() is True  # p0 already stored with the same value: counted as stored, not twice
    _, outcomes = stored(reg.url, "m")
    assert outcomes == {"p0": 1.0, "p1": 1.0, "p2": 1.0}
    # An outcome right after its Predict, while the log's writer is stuck in an insert on the hung
    # database: the flush that would let it find its prediction is waited for db_wait_s, not 30 s.
    entered = threading.Event()

    def stuck_insert(rows):  # noqa: ANN001, ANN202
        entered.set()
        release2.wait(30)
        raise ConnectionError("gave up")

    release2 = threading.Event()
    log.insert_rows = stuck_insert
    log.start()
    log.log_one("queued", "m", 1, "", 0.5, 1.0)
    assert entered.wait(10)
    t = asyncio.run(timed("queued"))
    assert t < 2.0, t  # NOT_FOUND from the database, then 0.5 s for the flush, then accepted
    assert spill.stats.spilled == 4
    release2.set()
    log.stop(timeout=10, stall_s=1.0)
    reg.dispose()


@GATEWAY[0]
@GATEWAY[1]
def test_full_spill_disk_on_a_live_gateway_is_resource_exhausted_and_loses_nothing(
        own_postgres: PostgresServer, tiny_disk: Path) -> None:
    """The spill directory on a real 256 KiB tmpfs and PostgreSQL stopped: Predict and RecordOutcome are
    answered OK until the disk is full, then RESOURCE_EXHAUSTED naming the spill (never INTERNAL, and a
    refused Predict is not logged); when the database is back every prediction answered OK is stored,
    and every accepted outcome too. (test_spill_durability.py checks the log alone on the same disk.)"""
    from tests.harness import GatewayThread

    url = own_postgres.create_database()
    model = publish(url)
    gw = GatewayThread(url, tiny_disk, controller_interval_s=0).start()
    answered: list[str] = []
    outcomes_ok: dict[str, float] = {}
    codes: dict[str, int] = {}
    paused = False
    try:
        gw.predict.Predict(pb.PredictRequest(model=model, request_id="warm", dense=FEATURES), timeout=30)
        answered.append("warm")
        assert gw.gateway.log.flush()
        own_postgres.pause()
        paused = True
        refused_predict = refused_outcome = 0
        for i in range(20_000):
            rid = f"d-{i}"
            try:
                gw.predict.Predict(pb.PredictRequest(model=model, request_id=rid, dense=FEATURES), timeout=30)
                answered.append(rid)
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
                assert "spill" in (exc.details() or ""), exc.details()
                refused_predict += 1
            try:
                outcome = pb.RecordOutcomeRequest(request_id=answered[-1], value=1.0)
                gw.predict.RecordOutcome(outcome, timeout=30)
                outcomes_ok[answered[-1]] = 1.0
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
                refused_outcome += 1
            if refused_predict > 20 and refused_outcome > 20:
                break
        print(f"full disk: {len(answered)} answered, refused {refused_predict} Predicts and "
              f"{refused_outcome} outcomes, codes {codes}")
        assert refused_predict > 20 and refused_outcome > 20, codes
        assert set(codes) == {"RESOURCE_EXHAUSTED"}, codes
        own_postgres.resume()
        paused = False

        def complete() -> bool:
            counts, outcomes = stored(url, model)
            return set(answered) <= counts.keys() and outcomes_ok.keys() <= outcomes.keys()

        wait_for(complete, 120, "every answered prediction and accepted outcome in the database")
        counts, outcomes = stored(url, model)
        assert set(counts) == set(answered) and all(n == 1 for n in counts.values())
        assert {rid: outcomes[rid] for rid in outcomes_ok} == outcomes_ok
    finally:
        if paused:
            own_postgres.resume()
        gw.stop()
