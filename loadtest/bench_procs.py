"""`chimera bench`'s child processes: the bare grpc.aio echo server (the ceiling for Python gRPC on this
machine) and the Chimera gateway (`chimera serve`, joined to the bench's Ray cluster). Only processes
started here are ever stopped, by their own handle."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from loadtest.ports import free_port, free_ports


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def spawned_children(pid: int) -> list[int]:
    """Children of `pid` started by multiprocessing's spawn (the gateway's rollout look process,
    rollout.lookprocess): their command line runs `spawn_main`."""
    out: list[int] = []
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        return out
    for kid in kids:
        try:
            if any("spawn_main" in arg for arg in kid.cmdline()):
                out.append(kid.pid)
        except psutil.Error:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process (all its threads) and its live descendants have used so
    far (`chimera serve --processes N`: the supervisor and its workers). A descendant that ends between
    two reads takes its CPU with it."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# --------------------------------------------------------------------------- grpc.aio echo (ceiling)
def echo_server_main(port: int) -> None:
    """A bare grpc.aio server answering Predict with a constant: the most any Python gRPC server can
    do on this machine with this client (no routing, no Ray, no logging)."""
    import asyncio

    import grpc

    from chimera.v1 import prediction_pb2 as pb
    from chimera.v1 import prediction_pb2_grpc as pb_grpc

    class Echo(pb_grpc.PredictionServiceServicer):
        async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
            return pb.PredictResponse(request_id=request.request_id or "echo", model=request.model, version=1,
                                      score=0.5)

    async def serve_echo() -> None:
        server = grpc.aio.server()
        pb_grpc.add_PredictionServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve_echo())


class EchoProcess:
    """`python -m loadtest.bench --echo-server PORT` (echo_server_main) in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "loadtest.bench", "--echo-server", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_serving(self, timeout: float = 60.0) -> None:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            grpc.channel_ready_future(ch).result(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by handle
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --------------------------------------------------------------------------- Chimera gateway
ROOT = Path(__file__).resolve().parents[1]
SPLIT_REASON = "bench 90/10"
# Run by another checkout's Python (`--gateway-tree`): that tree's registry code creates its own schema
# and publishes the two versions 90/10, with the API every revision since the first design has.
_SETUP_IN_TREE = """
import json, sys
from registry import Registry
url, model, one, two, names, reason = sys.argv[1:7]
reg = Registry(url)
reg.upgrade()
for path in (one, two):
    with open(path, "rb") as f:
        reg.publish_version(model, f.read(), json.loads(names))
reg.set_split(model, {1: 90, 2: 10}, expected_revision=0, actor="chimera-bench", reason=reason)
"""


def tree_python(tree: Path | None, name: str = "python") -> Path:
    """An executable of another checkout's own virtual environment (made by its `make install`);
    `tree` None: this process's own."""
    if tree is None:
        return Path(sys.executable).with_name(name)
    exe = tree / ".venv" / "bin" / name
    if not exe.exists():
        raise RuntimeError(f"{exe} does not exist: run `make install` in {tree} first")
    return exe


def setup_registry_in(tree: Path | None, url: str, model: str, versions: tuple[bytes, bytes],
                      names: list[str], workdir: Path) -> None:
    """The bench's registry (two versions of `model`, split 90/10) made by `tree`'s own code (None:
    this tree's), the same script either way."""
    paths = []
    for i, onnx in enumerate(versions, 1):
        paths.append(workdir / f"v{i}.onnx")
        paths[-1].write_bytes(onnx)
    subprocess.run([str(tree_python(tree)), "-c", _SETUP_IN_TREE, url, model, *map(str, paths),
                    json.dumps(names), SPLIT_REASON], cwd=tree or ROOT, check=True)


# Another checkout's Ray: its replicas must run its own code (Ray's workers import the replica classes
# from the Python path of the process that started the cluster), so that tree's Python starts it.
_RAY_HOST = """
import os, sys
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray
from ray import serve
from ray.serve.config import HTTPOptions
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options=HTTPOptions(host="127.0.0.1", port=int(sys.argv[1])))
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
serve.shutdown()
ray.shutdown()
"""


class TreeRay:
    """A local Ray (num_cpus=2) with Serve, hosted by a child process running `tree`'s Python; it
    shuts its cluster down when its stdin closes (`stop`), and is killed by pid if it does not."""

    def __init__(self, tree: Path, timeout: float = 180.0) -> None:
        self.proc = subprocess.Popen([str(tree_python(tree)), "-c", _RAY_HOST, str(free_port())], cwd=tree,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)  # bounded: a hung start stops
        line = self.proc.stdout.readline().strip() if ready else ""  # the GCS address, once Serve is up
        if not line:
            self.stop()
            raise RuntimeError(f"Ray of {tree} did not start within {timeout:.0f} s")
        self.address = line

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by handle
                self.proc.wait(10)


class GatewayProcess:
    """`chimera serve` in its own process, joined to this process's Ray cluster: this tree's, or that
    of another checkout (`tree`, with its own .venv)."""

    def __init__(self, registry_url: str, ray_address: str, workdir: Path, admin_token: str,
                 tree: Path | None = None, processes: int = 1, controller_interval_s: float = 0.0,
                 event_loop: str | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_ports(processes)
        self.metrics_ports = [self.metrics_port + i for i in range(processes)]  # one per worker
        self.log_path = workdir / "gateway.log"
        exe = Path(sys.executable).with_name("chimera") if tree is None else tree_python(tree, "chimera")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "chimera"]
        cmd += ["serve", "--port", str(self.port), "--host", "127.0.0.1", "--metrics-port",
                str(self.metrics_port), "--controller-interval", f"{controller_interval_s:g}", "--grace", "5"]
        cmd += ["--processes", str(processes)] if processes > 1 else []
        cmd += ["--loop", event_loop] if event_loop else []
        env = dict(os.environ, CHIMERA_REGISTRY_URL=registry_url, RAY_ADDRESS=ray_address,
                   CHIMERA_ADMIN_TOKEN=admin_token, RAY_USAGE_STATS_ENABLED="0")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def wait_serving(self, timeout: float = 240.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log_path}:\n"
                                       + self.tail())
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service="chimera.v1.PredictionService"),
                                   timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING and self._all_workers_up():
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"gateway not serving after {timeout:.0f} s; see {self.log_path}:\n" + self.tail())

    def _all_workers_up(self) -> bool:
        """Every worker answers on its metrics port (with --processes, the others start after worker 0
        serves; connections made before they listen would all land on worker 0)."""
        import urllib.request

        for port in self.metrics_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    pass
            except OSError:
                return False
        return True

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (graceful: drains calls, flushes the log), then SIGKILL after 60 s. Only our pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
