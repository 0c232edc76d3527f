"""PostgreSQL stopped for 30 s under load: Predict and PredictStream keep serving from the cached split,
prediction and outcome rows go to local spill files and are replayed when the database returns (0 lost,
0 duplicated); RecordOutcome is accepted meanwhile and never hangs; the split's LISTEN connection comes
back and a split changed after the outage is routed; a gateway restarted while rows sit in the spill
files loses none of them."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from chimera.v1 import prediction_pb2 as pb
from registry import Registry
from registry.models import Outcome, Prediction
from tests.harness import BackgroundLoad, GatewayThread, small_onnx, wait_for

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
OUTAGE_S = 30.0


class Load(BackgroundLoad):
    """Client threads: Predict with unique ids, then an outcome for every other answered request."""

    def __init__(self, gw: GatewayThread, model: str, prefix: str, threads: int = 3) -> None:
        self.gw, self.model, self.prefix = gw, model, prefix
        self.ok: list[str] = []
        self.outcomes: dict[str, float] = {}
        self.errors: list[tuple[str, str, str]] = []
        self.outcome_latency: list[float] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(threads)]

    def _run(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            rid = f"{self.prefix}{worker}-{i}"
            i += 1
            try:
                req = pb.PredictRequest(model=self.model, request_id=rid, routing_key=rid,
                                        dense=[0.1, 0.2, 0.3, 0.4])
                resp = self.gw.predict.Predict(req, timeout=10)
                self.ok.append(resp.request_id)
                self.versions.add(resp.version)
            except grpc.RpcError as exc:
                self.errors.append(("Predict", exc.code().name, exc.details() or ""))
                continue
            if i % 2 == 0:
                t0 = time.monotonic()
                try:
                    value = float(i % 4 == 0)
                    outcome = pb.RecordOutcomeRequest(request_id=rid, value=value)
                    self.gw.predict.RecordOutcome(outcome, timeout=10)
                    self.outcomes[rid] = value
                except grpc.RpcError as exc:
                    self.errors.append(("RecordOutcome", exc.code().name, exc.details() or ""))
                self.outcome_latency.append(time.monotonic() - t0)
            time.sleep(0.002)


def stored(reg: Registry, model: str) -> tuple[set[str], dict[str, float], int, int]:
    with reg.engine.connect() as c:
        preds = set(c.execute(select(Prediction.request_id).where(Prediction.model == model)).scalars())
        outs = dict(c.execute(select(Outcome.request_id, Outcome.value)).tuples().all())
        n_preds = c.execute(select(func.count()).select_from(Prediction)).scalar()
        n_outs = c.execute(select(func.count()).select_from(Outcome)).scalar()
    return preds, outs, n_preds, n_outs


def wait_replayed(gw: GatewayThread, timeout: float = 90.0) -> None:
    g = gw.gateway
    assert g is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g.log.flush()
        if not g.log.has_spill and not g.outcomes.has_spill and g.log.depth == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"not replayed: predictions {g.log.has_spill}, outcomes {g.outcomes.has_spill}")


def _listens(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the split watcher's LISTEN connection was (re)made (gateway.serving.split_watch)."""
    return sum("listening for split changes" in r.getMessage() for r in caplog.records)


def test_postgres_outage_under_load_loses_and_duplicates_nothing(postgres, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.serving.split_watch")
    url = postgres.create_database()
    reg = Registry(url)
    reg.upgrade()
    model = "pg" + uuid.uuid4().hex[:6]
    onnx, names = small_onnx(seed=4)
    reg.publish_version(model, onnx, names)
    reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    gw = GatewayThread(url, tmp_path, controller_interval_s=0, outcome_unknown_grace_s=0.0).start()
    restarted: GatewayThread | None = None
    gw_stopped = False
    try:
        # An outcome stored before the outage, contradicted during it: a conflict found at replay.
        first = gw.predict.Predict(pb.PredictRequest(model=model, request_id="before", dense=[1, 2, 3, 4]),
                                   timeout=10)
        gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=first.request_id, value=1.0), timeout=10)
        with Load(gw, model, "a") as load:
            time.sleep(2.0)
            postgres.pause()
            paused_at = time.monotonic()
            try:
                time.sleep(2.0)
                # Accepted now, checked at replay: an unknown id and a conflicting value.
                gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id="no-such-request", value=1.0),
                                         timeout=10)
                gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id="before", value=0.0), timeout=10)
                # A stream of 40 rows, answered from the cached split and spilled like the rest.
                stream_ids = [f"s{i}" for i in range(40)]
                rows = [pb.PredictRequest(model=model, request_id=rid, routing_key=rid,
                                          dense=[0.1, 0.2, 0.3, 0.4]) for rid in stream_ids]
                streamed = list(gw.predict.PredictStream(iter(rows), timeout=20))
                during = len(load.ok)
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - paused_at)))
                served_while_down = len(load.ok) - during
            finally:
                postgres.resume()
            time.sleep(3.0)
        assert not load.errors, load.errors[:5]
        assert served_while_down > 100, served_while_down
        # PredictStream answers in completion order (README, "Calling Predict"): each row once, any order.
        assert sorted(m.request_id for m in streamed) == sorted(stream_ids)
        assert all(m.WhichOneof("result") == "prediction" for m in streamed), streamed[:2]
        assert max(load.outcome_latency) < 5.0  # RecordOutcome never hung on the dead database
        g = gw.gateway
        assert g is not None and g.log.stats.spilled > 0 and g.outcomes.stats.spilled > 0
        wait_replayed(gw)
        print(f"outage: {served_while_down} predictions answered while down; spilled {g.log.stats.spilled} "
              f"prediction rows and {g.outcomes.stats.spilled} outcomes; max RecordOutcome "
              f"{max(load.outcome_latency) * 1e3:.0f} ms")
        preds, outs, n_preds, n_outs = stored(reg, model)
        answered = {"before", *load.ok, *stream_ids}
        assert preds == answered, (len(preds), len(answered), sorted(answered - preds)[:5])
        assert n_preds == len(answered)  # no duplicates (request_id is unique; counted anyway)
        expected = {"before": 1.0, **load.outcomes}
        assert outs == expected, (len(outs), len(expected), sorted(set(expected) ^ set(outs))[:5])
        assert n_outs == len(expected)
        assert g.outcomes.stats.dead_letter["unknown_request_id"] == 1
        assert g.outcomes.stats.dead_letter["conflict"] == 1
        dead = g.outcomes.dead_letter_path.read_text()
        assert '"no-such-request"' in dead and '"conflict"' in dead
        metrics = g.metrics.registry
        assert metrics.get_sample_value("chimera_outcomes_dead_letter_rows", {"reason": "conflict"}) == 1
        assert metrics.get_sample_value("chimera_outcomes_replayed_rows") == g.outcomes.stats.replayed > 0

        # The split's LISTEN connection was lost with the server and is made again; a split an operator
        # changes now (v2 at 50 %) reaches the gateway, which deploys v2 and routes to it.
        wait_for(lambda: _listens(caplog) >= 2, 30, "the split LISTEN connection made again")
        reg.publish_version(model, onnx, names)
        reg.set_split(model, {1: 50, 2: 50}, expected_revision=reg.get_split(model).revision, actor="test")
        after: list[str] = []
        versions: set[int] = set()

        def routed_to_v2() -> bool:
            rid = f"after{len(after)}"
            r = gw.predict.Predict(pb.PredictRequest(model=model, request_id=rid, routing_key=rid,
                                                     dense=[0.1, 0.2, 0.3, 0.4]), timeout=10)
            after.append(r.request_id)
            versions.add(r.version)
            return 2 in versions

        wait_for(routed_to_v2, 60, "a request routed to v2 after the split change", every=0.1)
        answered |= set(after)

        # Restart while rows sit in the spill files: the new gateway replays them.
        postgres.pause()
        try:
            spilled = []
            for i in range(50):
                r = gw.predict.Predict(pb.PredictRequest(model=model, request_id=f"r{i}", dense=[1, 2, 3, 4]),
                                       timeout=10)
                gw.predict.RecordOutcome(pb.RecordOutcomeRequest(request_id=r.request_id, value=1.0),
                                         timeout=10)
                spilled.append(r.request_id)
            gw_stopped = True
            gw.stop(undeploy=False)  # the flush finds no database: everything goes to the spill files
            spill_dir = tmp_path / "spill"
            assert any(spill_dir.glob("predictions-*.spill*")) and any(spill_dir.glob("outcomes-*.spill*"))
        finally:
            postgres.resume()
        restarted = GatewayThread(url, tmp_path, controller_interval_s=0).start()
        wait_replayed(restarted)
        preds, outs, n_preds, n_outs = stored(reg, model)
        assert set(spilled) <= preds and n_preds == len(answered) + len(spilled)
        assert set(after) <= preds
        assert all(outs[rid] == 1.0 for rid in spilled) and n_outs == len(expected) + len(spilled)
    finally:
        if restarted is not None:
            restarted.stop()
        elif not gw_stopped:
            gw.stop()
        reg.dispose()
