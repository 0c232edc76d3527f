"""SIGKILL of a real `chimera serve` process under load, on its own PostgreSQL (up, and stopped so every
row goes through the spill file), then a gateway started again on the same spill directory: the
predictions answered OK and missing from the database are compared with README's stated bound
(Failure modes, Durability: only rows answered within the last LOSS_WINDOW_S before the kill may be
lost; nothing older, nothing stored twice, nothing nobody sent).

test_durability_kill.py measures the same window on the prediction log alone in a child process; this
one kills the whole gateway (gRPC server, batcher, Ray calls, log writer) as an OOM kill would."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from tests.harness import wait_for
from tests.integration.test_hung_postgres import (
    FEATURES,
    ServeProcess,
    publish,
    stored,
    undeploy,
)
from tests.pg import PostgresServer

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
LOSS_WINDOW_S = 1.0  # README, Failure modes, Durability: the bound, as test_durability_kill.py holds it
LOAD_S = 5.0


@pytest.mark.parametrize("database", ["up", "stopped"])
def test_sigkill_of_the_gateway_under_load_loses_only_the_last_moments(tmp_path: Path,
                                                                       own_postgres: PostgresServer,
                                                                       database: str) -> None:
    url = own_postgres.create_database()
    model = publish(url)
    serve = ServeProcess(tmp_path, url).start()
    answered: list[tuple[float, str]] = []
    sent: set[str] = set()
    stop = threading.Event()

    def client(worker: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{serve.port}")
        stub = pb_grpc.PredictionServiceStub(channel)
        i = 0
        while not stop.is_set():
            rid = f"k{worker}-{i}-{uuid.uuid4().hex[:6]}"
            i += 1
            sent.add(rid)
            try:
                stub.Predict(pb.PredictRequest(model=model, request_id=rid, routing_key=rid, dense=FEATURES),
                             timeout=10)
            except grpc.RpcError:
                time.sleep(0.05)  # the kill: the call failed, the client was told
                continue
            answered.append((time.monotonic(), rid))
        channel.close()

    paused = False
    workers = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(4)]
    try:
        if database == "stopped":
            own_postgres.pause()
            paused = True
        for w in workers:
            w.start()
        time.sleep(LOAD_S)
        killed_at = time.monotonic()
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(30)
        stop.set()
        for w in workers:
            w.join(30)
        if paused:
            assert any(serve.spill_dir.glob("predictions-*.spill*")), "nothing was spilled"
            own_postgres.resume()
            paused = False
        serve.start()  # same port and directory: replays the spill the killed process left
        ids = {rid for _, rid in answered}

        def settled() -> bool:  # the replay has run: the spill is gone (or there never was one)
            return not any(p.stat().st_size for p in serve.spill_dir.glob("predictions-*.spill*"))

        wait_for(settled, 120, "the spill replayed")
        time.sleep(1.0)
        counts, _ = stored(url, model)
        lost = [(t, rid) for t, rid in answered if rid not in counts]
        oldest = min((t for t, _ in lost), default=killed_at)
        print(f"database {database}: {len(ids)} answered in {LOAD_S:.0f} s, {len(lost)} lost, the oldest "
              f"answered {killed_at - oldest:.3f} s before SIGKILL (bound {LOSS_WINDOW_S} s)")
        assert len(ids) > 200, len(ids)
        assert killed_at - oldest <= LOSS_WINDOW_S, "a row answered before the stated window was lost"
        assert all(n == 1 for n in counts.values()), "a row was stored twice"
        assert set(counts) <= sent, "a row nobody sent was stored"
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 0, serve.logs()
    finally:
        stop.set()
        if paused:
            own_postgres.resume()
        serve.kill()
        undeploy(model)
