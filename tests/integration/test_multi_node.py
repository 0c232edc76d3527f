"""Chimera on a Ray cluster of several nodes, behind two gateways (issue 16): a head with no CPUs and two
worker nodes on this machine, each node its own process tree (tests/multinode.py), two `chimera serve`
processes on one PostgreSQL, and one client spreading calls over both gateways the way a Go service
would (one channel, round robin over both addresses, gRPC's own retry policy for UNAVAILABLE).

Under that steady load:
- every replica runs on a worker node (the head offers no CPUs);
- a worker node is SIGKILLed as a whole (a lost machine): the replicas it held are replaced on the
  other node, the calls that fail are only ones that were in flight at the kill, and every prediction
  answered OK is in the database exactly once;
- one gateway gets SIGTERM: it drains, and the client loses no call (the other gateway answers).

Runs on its own cluster, never the session's (tests/conftest.py ray_cluster), and the pytest process
never joins it: gRPC to the gateways, SQL to PostgreSQL, the observer's reports for the cluster."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from chimera.v1 import prediction_pb2 as pb
from chimera.v1 import prediction_pb2_grpc as pb_grpc
from registry import Registry
from registry.models import Prediction
from tests.harness import round_robin_channel, small_onnx
from tests.multinode import Cluster, Gateway, Observer, replica_nodes
from tests.pg import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # its own three-node Ray (tests/conftest.py)
CONCURRENCY = 6  # client threads, each with at most one call in flight (2 shared cores: modest on purpose)
PAUSE_S = 0.02  # between one thread's calls: steady, not flat out
REPLICAS = 2
FEATURES = [0.1, 0.2, 0.3, 0.4]


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    request_id: str
    code: str


class Load:
    """CONCURRENCY threads calling Predict over one channel to both gateways; every call recorded."""

    def __init__(self, ports: list[int], model: str) -> None:
        self.channel = round_robin_channel(ports)
        self.stub = pb_grpc.PredictionServiceStub(self.channel)
        self.model = model
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                         for w in range(CONCURRENCY)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            rid = f"mn{worker}-{i}-{uuid.uuid4().hex[:8]}"
            i += 1
            started = time.monotonic()
            try:
                self.stub.Predict(pb.PredictRequest(model=self.model, request_id=rid, routing_key=rid,
                                                    dense=FEATURES), timeout=15)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            self.calls.append(Call(started, time.monotonic(), rid, code))
            time.sleep(PAUSE_S)

    def since(self, t: float) -> list[Call]:
        return [c for c in self.calls if c.started >= t]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.channel.close()


def stored_counts(url: str, model: str) -> Counter[str]:
    reg = Registry(url)
    try:
        with reg.session() as s:
            rows = s.execute(select(Prediction.request_id, func.count()).where(Prediction.model == model)
                             .group_by(Prediction.request_id)).tuples().all()
    finally:
        reg.dispose()
    return Counter(dict(rows))


def publish(url: str) -> str:
    reg = Registry(url)
    try:
        reg.upgrade()
        model = "mn" + uuid.uuid4().hex[:6]
        reg.publish_version(model, small_onnx(seed=7)[0], [f"f{i}" for i in range(4)], status="production")
        reg.set_split(model, {1: 100}, expected_revision=0, actor="test")
    finally:
        reg.dispose()
    return model


def test_two_gateways_on_a_three_node_cluster_survive_a_lost_node_and_a_drained_gateway(
        tmp_path: Path, own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database()
    model = publish(url)
    app = f"chimera-{model}-v1"
    # /tmp, short: Ray's socket paths under --temp-dir must fit in 107 bytes.
    root = Path(f"/tmp/mn-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    cluster = Cluster(root, workers=2, node_env={"CHIMERA_REGISTRY_URL": url})  # replicas read it on the node
    gateways: list[Gateway] = []
    observer: Observer | None = None
    load: Load | None = None
    try:
        cluster.start()
        observer = Observer(cluster, f"chimera-{model}-", tmp_path / "observer.log")
        observer.wait(lambda r: sorted(n["name"] for n in r["nodes"].values() if n["alive"])
                      == ["head", "worker-0", "worker-1"], 120, "the head and both worker nodes")
        t0 = time.monotonic()
        scaling = {"CHIMERA_REPLICAS_MIN": str(REPLICAS), "CHIMERA_REPLICAS_MAX": str(REPLICAS)}
        gateways.append(Gateway("gw1", tmp_path, cluster, url, **scaling))
        gateways[0].wait_ready(180)
        report = observer.wait(lambda r: r["apps"].get(app, {}).get("status") == "RUNNING"
                               and len(replica_nodes(r)) == REPLICAS, 180, "the first gateway's replicas")
        first_replicas = replica_nodes(report)
        gateways.append(Gateway("gw2", tmp_path, cluster, url, **scaling))
        gateways[1].wait_ready(180)
        print(f"cluster and two gateways ready in {time.monotonic() - t0:.0f} s; replicas {first_replicas}")

        # Steady load over both gateways; the second reuses the first's replicas (same fingerprint).
        scored_before = [g.rows_scored() for g in gateways]
        load = Load([g.port for g in gateways], model).start()
        time.sleep(5.0)
        warm = list(load.calls)
        shares = [g.rows_scored() - b for g, b in zip(gateways, scored_before, strict=True)]
        assert warm and all(c.code == "OK" for c in warm), Counter(c.code for c in warm)
        assert min(shares) >= 0.25 * len(warm), f"not spread over both gateways: {shares} of {len(warm)}"
        placed = replica_nodes(observer.latest)
        assert placed == first_replicas, "the second gateway replaced the first one's replicas"
        assert set(placed.values()) <= {"worker-0", "worker-1"}, f"a replica off the worker nodes: {placed}"
        # Serve's default placement (SPREAD) puts one replica on each worker; were both on one node,
        # losing it would stop the version until Serve starts new ones elsewhere (~20 s here).
        assert set(placed.values()) == {"worker-0", "worker-1"}, f"replicas not spread: {placed}"

        # Lose a worker node: one replica goes with it.
        victim = Counter(placed.values()).most_common(1)[0][0]
        survivor = ({"worker-0", "worker-1"} - {victim}).pop()
        refused_before = sum(g.refused() for g in gateways)
        lost = {rid for rid, node in placed.items() if node == victim}
        killed_at = time.monotonic()
        cluster.workers[victim].kill()
        report = observer.wait(
            lambda r: r["apps"].get(app, {}).get("status") == "RUNNING"
            and len(replica_nodes(r)) == REPLICAS and set(replica_nodes(r).values()) == {survivor},
            120, f"{REPLICAS} replicas running on {survivor} after {victim} was killed")
        replaced_in = time.monotonic() - killed_at
        assert not lost & set(replica_nodes(report)), "a replica of the killed node is still counted"
        time.sleep(3.0)  # load on the replacements
        after_kill = [c for c in load.calls if c.ended >= killed_at]
        failed = [c for c in after_kill if c.code != "OK"]
        replacing = [c for c in after_kill if killed_at < c.started < killed_at + replaced_in]
        in_flight = [c for c in failed if c.started <= killed_at]
        # What the client's retry policy absorbed: Predicts the gateways answered with an error.
        refused = sum(g.refused() for g in gateways) - refused_before
        version_failures = sum(g.metric("chimera_version_failures_total") for g in gateways)
        print(f"killed {victim} ({len(lost)} replicas): replaced on {survivor} in {replaced_in:.1f} s "
              f"({len(replacing)} calls meanwhile); {len(after_kill)} calls since the kill, "
              f"{len(failed)} failed ({Counter(c.code for c in failed)}), "
              f"{len(in_flight)} of them in flight at the kill; the gateways answered {refused:.0f} "
              f"Predicts with an error (retried by the client), {version_failures:.0f} rows failed on "
              "a replica")
        assert failed == in_flight, f"calls started after the kill failed: {failed[:5]}"
        assert len(failed) <= CONCURRENCY
        assert len(replacing) > 50, "the surviving replica did not carry the load while Serve replaced"
        assert sum(c.code == "OK" for c in load.since(killed_at + replaced_in)) > 50

        # SIGTERM one gateway under load: it drains, the client goes on with the other, no call lost.
        sigterm_at = time.monotonic()
        assert gateways[0].stop(signal.SIGTERM) == 0, gateways[0].logs()
        drained_in = time.monotonic() - sigterm_at
        time.sleep(3.0)
        load.stop()
        during = load.since(sigterm_at)
        print(f"gw1 drained and exited in {drained_in:.1f} s; {len(during)} calls since SIGTERM, "
              f"{Counter(c.code for c in during)}")
        assert during and all(c.code == "OK" for c in during), (
            Counter(c.code for c in during), drained_in,
            [(round(c.started - sigterm_at, 3), round(c.ended - sigterm_at, 3), c.code) for c in during
             if c.code != "OK"])
        assert sum(c.started > sigterm_at + drained_in for c in during) > 50, "no calls after gw1 exited"

        # No replica, in any state, was ever seen on the head, in any report of the whole run.
        seen = {node for report in observer.history for node in replica_nodes(report, states=()).values()}
        assert seen == {"worker-0", "worker-1"}, seen

        # Every OK answer logged exactly once (gw2 flushes its log on SIGTERM; gw1 already did).
        assert gateways[1].stop(signal.SIGTERM) == 0, gateways[1].logs()
        counts = stored_counts(url, model)
        ok = {c.request_id for c in load.calls if c.code == "OK"}
        sent = {c.request_id for c in load.calls}
        print(f"{len(load.calls)} calls, {len(ok)} OK, {len(counts)} stored")
        assert ok - set(counts) == set(), f"{len(ok - set(counts))} OK answers not stored"
        assert {rid: n for rid, n in counts.items() if n != 1} == {}, "a prediction stored twice"
        assert set(counts) <= sent, "a prediction nobody sent was stored"
    except BaseException:
        for g in gateways:
            print(f"--- {g.name}\n{g.logs()}")
        print(cluster.logs())
        raise
    finally:
        if load is not None:
            load.stop()
        for g in gateways:
            g.stop()
        if observer is not None:
            observer.stop()
        cluster.stop()
