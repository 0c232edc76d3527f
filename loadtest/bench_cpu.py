"""Where the machine's cores went during one bench case, by part: the server under test (the gateway,
or the do-nothing server), the Ray Serve replicas, Ray's own processes (raylet, GCS, the Serve
controller and proxy), the load client, the database server, the bench process itself, and the rest.

Why: on two shared cores every part competes with every other, so a case's rate is limited by the sum
of what each part spends a row, not by the gateway's CPU alone (which `gateway_cpu_us_per_row` gives).
Issue 17 asks docs/performance.md for "what limits each one now"; this split is that answer from one
run, where it used to be pieced together from separate /proc samples. psutil reads the per-process
counters; the grouping by process title is Chimera's own (no library knows Ray's titles).

The load client runs as this process's child and is waited for before the second snapshot, so its CPU
is read from RUSAGE_CHILDREN (a process's counters vanish with it). A process that ends inside the
window takes its CPU with it; one that starts inside it counts from zero. `other` is the machine's busy
time (every core's non-idle time, /proc/stat) minus all the parts: other tenants, kernel threads, and
interrupt work no process is charged for."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import psutil

PARTS = ("server", "replicas", "ray", "client", "database", "bench", "other")


@dataclass(frozen=True)
class CpuSnapshot:
    at: float  # time.monotonic()
    per_pid: dict[int, tuple[str, float]]  # pid -> (part, user + system CPU seconds so far)
    children_s: float  # CPU seconds of this process's waited-for children (the load client)
    machine_busy_s: float  # every core's non-idle seconds since boot


def part_of(title: str, name: str) -> str | None:
    """The part a process belongs to, from its title (argv[0] as the process set it) and name; None
    for a process that is none of the bench's parts (it lands in `other`)."""
    if title.startswith("ray::ServeReplica"):
        return "replicas"
    if title.startswith("ray::") or name in ("raylet", "gcs_server") or "/ray/" in title:
        return "ray"  # workers and actors by title; the dashboard and monitors run scripts under ray/
    if name == "postgres" or title.startswith("postgres"):
        return "database"
    return None


def _tree(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.Error:
        return set()


def snapshot(server_pid: int | None) -> CpuSnapshot:
    """Every process's CPU so far, grouped. `server_pid` is the server under test (with its
    descendants: `chimera serve --processes N`'s workers)."""
    server, me = _tree(server_pid), psutil.Process().pid
    per_pid: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        info = p.info
        times = info.get("cpu_times")
        if times is None:
            continue
        if p.pid in server:
            part: str | None = "server"
        elif p.pid == me:
            part = "bench"
        else:
            argv = info.get("cmdline") or []
            part = part_of(" ".join(argv[:2]) if argv else "", info.get("name") or "")
        if part is not None:
            per_pid[p.pid] = (part, times.user + times.system)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return CpuSnapshot(time.monotonic(), per_pid, kids.ru_utime + kids.ru_stime, busy)


def split(before: CpuSnapshot, after: CpuSnapshot, rows_per_s: float | None = None) -> dict[str, object]:
    """Cores each part used on average between two snapshots (1.0 = one core busy all the time), the
    machine's busy cores, and, given the case's rows per second, each part's CPU microseconds a row."""
    wall = after.at - before.at
    if wall <= 0:
        return {}
    spent = dict.fromkeys(PARTS, 0.0)
    for pid, (part, cpu) in after.per_pid.items():
        was = before.per_pid.get(pid)
        spent[part] += cpu - (was[1] if was is not None and was[0] == part else 0.0)
    spent["client"] += after.children_s - before.children_s
    busy = after.machine_busy_s - before.machine_busy_s
    spent["other"] = max(0.0, busy - sum(v for k, v in spent.items() if k != "other"))
    cores = {k: round(max(v, 0.0) / wall, 3) for k, v in spent.items()}
    out: dict[str, object] = {"cpu_cores": cores, "machine_busy_cores": round(busy / wall, 3),
                              "cores": psutil.cpu_count() or 0}
    if rows_per_s:
        out["cpu_us_per_row_by_part"] = {k: round(v / rows_per_s * 1e6, 2) for k, v in cores.items()}
    return out


def describe(c: dict[str, object]) -> str:
    """The split as a short log line: `cores: server 1.02 replicas 0.41 ... (busy 1.95 of 2)`."""
    cores = c.get("cpu_cores")
    if not isinstance(cores, dict):
        return ""
    parts = " ".join(f"{k} {v:.2f}" for k, v in cores.items() if v >= 0.005)
    return f"cores: {parts} (busy {c.get('machine_busy_cores', 0):.2f} of {c.get('cores', '?')})"
