"""py-spy of the gateway during one `chimera bench` case (`--profile S`), when py-spy is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def start_profile(pid: int, seconds: float, out: Path,
                  log: Callable[[str], None]) -> subprocess.Popen[bytes] | None:
    """py-spy record of the gateway: a speedscope (.json), raw (.txt) or flamegraph (else) file. None
    (and a log line) when py-spy is not installed. The caller waits for the returned process."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        log("py-spy not installed (pip install py-spy); skipping the profile")
        return None
    fmt = "speedscope" if out.suffix == ".json" else ("raw" if out.suffix == ".txt" else "flamegraph")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
           "--format", fmt, "--output", str(out), "--nonblocking", "--gil"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
