"""Loopback ports for the servers that the bench and the tests start as separate processes (a gateway,
an echo server, PostgreSQL, Prometheus, Ray's head): picked here, bound by the server seconds later.

Asking the OS for a port (bind to port 0) gives one from the kernel's ephemeral range, and the OS gives
that same range to anything else that binds port 0 or connects out meanwhile: Ray's workers, raylets and
agents do so all the time. CI saw a Ray process take a gateway's metrics port in the seconds between
the pick and the gateway's bind (the gateway deploys its replicas first). So ports are drawn at random
between Ray's worker ports and the ephemeral range (20000-32767 on Linux's defaults), where only a
process that asks for that number gets one; each is checked free by binding it, and this process never
hands the same one out twice. Where the ephemeral range leaves no such gap, the OS picks (with the
same checks).
No library does this: portpicker asks the OS too."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port .. --max-worker-port
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _all_free(ports: range) -> bool:
    held: list[socket.socket] = []
    try:
        for port in ports:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in held:
            s.close()


def _candidates(n: int) -> Iterator[int]:
    """First ports for `free_ports(n)`: random ones in the gap, then (no gap here, or none left) the OS's."""
    low, high = RAY_WORKER_PORTS.stop, _ephemeral_low() - n
    if high - low > 1000:
        for _ in range(200):
            yield random.randrange(low, high)
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        yield port  # after the probe socket is closed


def free_ports(n: int = 1) -> int:
    """The first of `n` consecutive loopback ports, free now and handed out once (worker i of `chimera
    serve --processes N` serves its metrics on --metrics-port + i)."""
    for base in _candidates(n):
        ports = range(base, base + n)
        if _handed_out.isdisjoint(ports) and _all_free(ports):
            _handed_out.update(ports)
            return base
    raise RuntimeError(f"no {n} consecutive free loopback ports")


def free_port() -> int:
    """One loopback port, free now and handed out once (see the module's docstring for where from)."""
    return free_ports(1)
