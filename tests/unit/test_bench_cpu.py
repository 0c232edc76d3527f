"""`chimera bench`'s split of the machine's cores by part (loadtest.bench_cpu), on real processes: a busy
server process is charged to `server`, a busy child that has been waited for (as the load client is)
to `client`, and nothing is charged twice."""

from __future__ import annotations

import subprocess
import sys
import time

from loadtest import bench_cpu

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_busy_server_and_a_waited_client_are_each_charged_to_their_part() -> None:
    server = subprocess.Popen([sys.executable, "-c", SPIN.format(s=1.0) + "import time; time.sleep(30)"])
    try:
        before = bench_cpu.snapshot(server.pid)
        subprocess.run([sys.executable, "-c", SPIN.format(s=0.6)], check=True)  # the "client", waited for
        deadline = time.monotonic() + 30
        while bench_cpu.snapshot(server.pid).per_pid[server.pid][1] < 0.9:  # the server's spin is done
            assert time.monotonic() < deadline, "the server process never spun"
            time.sleep(0.05)
        after = bench_cpu.snapshot(server.pid)
    finally:
        server.kill()
        server.wait()
    out = bench_cpu.split(before, after, rows_per_s=1000.0)
    cores = out["cpu_cores"]
    wall = after.at - before.at
    assert 0.6 <= cores["client"] * wall <= 1.0, out  # its 0.6 s of spin plus its interpreter's start
    assert 0.7 <= cores["server"] * wall <= 1.1, out  # up to 1.0 s of spin, some before `before`
    # (Replicas and database are whatever else runs: in `make test` the session's Ray and PostgreSQL.)
    # The parts never add up to more than the machine was busy (the kernel's ticks round both).
    assert sum(cores.values()) <= out["machine_busy_cores"] * 1.05 + 0.05, out
    assert out["cpu_us_per_row_by_part"]["client"] == round(cores["client"] / 1000.0 * 1e6, 2)
    assert "client" in bench_cpu.describe(out) and "server" in bench_cpu.describe(out)


def test_ray_and_database_processes_are_known_by_their_titles() -> None:
    assert bench_cpu.part_of("ray::ServeReplica:bench:v1", "python") == "replicas"
    assert bench_cpu.part_of("ray::ServeController", "python") == "ray"
    assert bench_cpu.part_of("/usr/bin/raylet --node_id", "raylet") == "ray"
    monitor = ".venv/bin/python .venv/lib/python3.11/site-packages/ray/_private/log_monitor.py"
    assert bench_cpu.part_of(monitor, "python") == "ray"
    assert bench_cpu.part_of("postgres: postgres bench 127.0.0.1(5432) COPY", "postgres") == "database"
    assert bench_cpu.part_of("/usr/bin/python3 -m loadtest.bench", "python3") is None  # not a part: `other`
