"""A throwaway PostgreSQL server for the test session, from Debian's postgresql package.

initdb/pg_ctl refuse to run as root, so as root they run as the `postgres` user on a data
directory that user owns. One server per test session; one fresh database per test that asks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from loadtest.ports import free_port  # stdlib only: cheap for conftest to import


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found: install Debian's postgresql package "
                               "(make test does this when run as root)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="chimera-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> None:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> PostgresServer:
        self._run(self.bindir / "initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-o", opts, "-l", self.root / "log",
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def pause(self) -> None:
        """Stop the server keeping its data (for outage tests); resume() brings it back."""
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c max_connections=200")
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-o", opts, "-l", self.root / "log",
                  "-w", "-t", "60", "start")

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, background workers): what a test SIGSTOPs to hang
        the server the way a frozen VM would (connections stay open, nothing answers)."""
        import subprocess as sp

        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        children = sp.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def unfreeze(self) -> None:
        """SIGCONT every process of the server (after a test hung it with SIGSTOP)."""
        continue_all(self.pids())

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a fresh random name unless `name` is given); returns its SQLAlchemy URL."""
        import psycopg2

        name = name or "t_" + uuid.uuid4().hex[:12]
        for _ in range(50):
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.1)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)


def continue_all(pids: list[int]) -> None:
    """SIGCONT each pid that still exists (a hung server's processes, or some of them)."""
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
