"""A Ray cluster of several nodes on this one machine, each node its own process tree, for the multi-node
test (tests/integration/test_multi_node.py): a head with no CPUs and worker nodes that can be killed one
at a time, gateways as `chimera serve` processes, and an observer that reports where Serve's replicas run.

Why subprocesses throughout: the test session may already run its own local Ray in the pytest process
(tests/conftest.py ray_cluster); a second cluster is only safe if nothing in the pytest process joins it,
so the test talks to the gateways over gRPC, to PostgreSQL directly, and to this cluster through the
observer's output only.

Ray 2.60 facts this relies on (measured here, see also ../shared/FACTS.md):
- every node and driver must agree on token authentication: RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN
  in every environment (the token is this cluster's own, never ~/.ray/auth_token);
- `ray start --node-ip-address=127.0.0.1` is turned into the host's own address
  (services.resolve_ip_for_localhost; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 but refuses
  a second node), while other loopback addresses are taken as they are: the head is 127.0.0.2 and worker
  node i is 127.0.0.(3+i), each node its own address as on separate machines. (Ray's GCS and raylet
  gRPC servers still listen on every interface, as they always do; the nodes' addresses are loopback.)
- each node gets its own --temp-dir (Ray allows one per node) so nothing is shared with other Ray
  sessions on the machine (session_latest, ray_current_cluster), and the head its own free ports
  (GCS, client server, dashboard) so two clusters never fight over a default port;
- a driver joining by address attaches to the head node when several nodes share the host
  (services.get_node_to_connect_for_driver), so killing a worker node never takes a gateway with it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.ports import free_port

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # the venv's, as in make test
HEAD_IP = "127.0.0.2"  # a loopback address Ray takes as it is (module docstring)


def session_pids(sid: int) -> list[int]:
    """Every process of the session `sid` (a node started with start_new_session: the `ray start`
    process, its raylet, GCS, agents and the worker processes they spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is already dead
            pids.append(int(entry.name))
    return pids


class RayNode:
    """One `ray start --block` process tree in its own session (its pid is the session and group id)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self._log = open(log, "wb")  # noqa: SIM115 - owned by the process, closed in kill()
        self.log_path = log
        self.proc = subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> list[int]:
        """SIGKILL the whole node at once, as a lost machine: its process group, then any process of its
        session left outside the group. Returns the pids killed."""
        pids = session_pids(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        self._log.close()
        return pids


class Cluster:
    """A head with no CPUs and `workers` worker nodes of one CPU each, named worker-0, worker-1, ..."""

    def __init__(self, root: Path, workers: int = 2, node_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CHIMERA_"))}
        # What every node AND every driver of this cluster must share (module docstring).
        self.ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                        "RAY_USAGE_STATS_ENABLED": "0"}
        self.env = {**base, **self.ray_env}
        self.node_env = {**self.env, **(node_env or {})}
        self.n_workers = workers
        self.head: RayNode | None = None
        self.workers: dict[str, RayNode] = {}
        self._started: list[RayNode] = []  # every node process ever started, failed attempts included

    def start(self) -> Cluster:
        """The head, then each worker, one at a time: each waits until its node is up (nodes started
        together on a loaded 2-core machine miss Ray's fixed 30 s wait for a raylet to register)."""
        self.head = self._start_node("head", [
            "--head", "--num-cpus=0", f"--port={self.port}", f"--node-ip-address={HEAD_IP}",
            "--node-name=head", "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={self.root / 'head'}",
            "--disable-usage-stats"])
        for i in range(self.n_workers):
            name = f"worker-{i}"
            self.workers[name] = self._start_node(name, [
                f"--address={self.address}", "--num-cpus=1", f"--node-ip-address=127.0.0.{3 + i}",
                f"--node-name={name}", f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.root / name}"])
        return self

    def _start_node(self, name: str, args: list[str], attempts: int = 3, timeout_s: float = 120.0) -> RayNode:
        """Start a node and wait for `ray start` to report it up; a start that fails (Ray gives a raylet
        30 s to register, which a loaded machine can miss) is cleaned up and tried again."""
        for attempt in range(1, attempts + 1):
            node = RayNode(name, args, self.node_env, self.root / f"{name}.{attempt}.log")
            self._started.append(node)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and node.proc.poll() is None:
                if b"Ray runtime started" in node.log_path.read_bytes():
                    return node
                time.sleep(0.25)
            node.kill()
        raise RuntimeError(f"Ray node {name} did not start in {attempts} attempts:\n{self.logs()}")

    def stop(self) -> None:
        """Kill every node this cluster started (the head last), then remove its temp dirs."""
        for node in reversed(self._started):
            if node.proc.poll() is None or session_pids(node.proc.pid):
                node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))


# Runs as a driver of the cluster (never in the pytest process): one JSON line a second with the nodes
# and, for the applications whose name starts with argv[2], their status and replicas with their node.
OBSERVER = r"""
import json, sys, time
import ray
from ray.serve.context import _get_global_client

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
prefix = sys.argv[2]

def plain(v):
    return str(getattr(v, "value", v))

while True:
    nodes = {n["NodeID"]: {"name": n.get("NodeName"), "alive": n["Alive"],
                           "cpus": n.get("Resources", {}).get("CPU", 0)} for n in ray.nodes()}
    apps = {}
    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        details = client.get_serve_details() if client is not None else {}
    except Exception as exc:  # the controller is busy or restarting: report, keep going
        details = {"error": repr(exc)}
    for name, app in (details.get("applications") or {}).items():
        if name.startswith(prefix):
            reps = [{"id": r["replica_id"], "node": r.get("node_id"), "state": plain(r["state"]),
                     "pid": r.get("pid")} for d in app["deployments"].values() for r in d["replicas"]]
            apps[name] = {"status": plain(app["status"]), "replicas": reps}
    print(json.dumps({"t": time.time(), "nodes": nodes, "apps": apps, "error": details.get("error")}),
          flush=True)
    time.sleep(1.0)
"""


class Observer:
    """The OBSERVER driver as a subprocess; `latest` is its last report, `wait` polls a predicate on it."""

    def __init__(self, cluster: Cluster, prefix: str, log: Path) -> None:
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", OBSERVER, cluster.address, prefix],
                                     env=cluster.env, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     start_new_session=True)
        self.latest: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.latest = report
            self.history.append(report)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.latest
            if report and predicate(report):
                return report
            if self.proc.poll() is not None:
                raise AssertionError(f"the observer exited ({self.proc.returncode}) waiting for {what}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last report: {self.latest}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._err.close()


def replica_nodes(report: dict[str, Any], states: tuple[str, ...] = ("RUNNING",)) -> dict[str, str]:
    """replica id -> the name of the node it runs on, over the observed applications' replicas in one of
    `states` (empty: every replica that has a node)."""
    names = {nid: n["name"] for nid, n in report["nodes"].items()}
    return {r["id"]: names.get(r["node"], r["node"]) for app in report["apps"].values()
            for r in app["replicas"] if r["node"] and (not states or r["state"] in states)}


class Gateway:
    """One `chimera serve` process, a driver of the cluster (attached to the head node)."""

    def __init__(self, name: str, tmp: Path, cluster: Cluster, registry_url: str, **env: str) -> None:
        self.name, self.tmp, self.port, self.metrics_port = name, tmp / name, free_port(), free_port()
        self.tmp.mkdir(parents=True)
        self.env = {**cluster.env, "RAY_ADDRESS": cluster.address, "CHIMERA_REGISTRY_URL": registry_url,
                    **env}
        self._log = open(self.tmp / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimera", "serve", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--host", "127.0.0.1", "--controller-interval", "0",
             "--grace", "10", "--drain-delay", "0.5"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"gateway {self.name} not ready in {timeout:g} s:\n{self.logs()}") from None
        finally:
            channel.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples on the gateway's /metrics (`name` with its _total), over the
        samples whose labels include `labels`; a label value starting with "!" means any other value."""
        import re
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
            if all((have.get(k) != v[1:]) if v.startswith("!") else (have.get(k) == v)
                   for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def rows_scored(self) -> float:
        """Rows this gateway scored: which gateway answered is not visible to a gRPC client, so this is
        how a test sees the spread."""
        return self.metric("chimera_rows_scored_total")

    def refused(self) -> float:
        """Predict calls this gateway answered with anything but OK (a client may have retried them)."""
        return self.metric("chimera_requests_total", method="Predict", code="!OK")

    def logs(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()
