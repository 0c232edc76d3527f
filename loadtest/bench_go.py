"""`chimera bench --client go` (the default): every gRPC case measured by the Go closed-loop client in
loadtest/goload (grpc-go, one connection, N goroutines), one subprocess per case.

Why Go: Chimera's callers are Go services, and a Python client spends much of a 2-core machine itself
(the grpc.aio client reached ~3.1k req/s against a do-nothing server where the Go client reached ~6.0k),
so with Python the bench partly measures its own client. `--client python` keeps loadtest.closed_loop.

The binary is built offline from Debian's Go packages by loadtest/goload/build.sh (the way the Go
example is built) and rebuilt when its sources or the protos are newer than it. The Go client takes
the same LoadSpec and returns the same LoadResult as the Python one, so the bench and its report do not
care which client ran a case."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from loadtest.closed_loop import LoadResult, LoadSpec

ROOT = Path(__file__).resolve().parents[1]
GO_DIR = ROOT / "loadtest" / "goload"
BUILD = GO_DIR / "build.sh"
DEFAULT_BINARY = GO_DIR / "bin" / "chimera-goload"
MISSING_TOOLCHAIN = 3  # build.sh's exit code when a Debian package is missing


class GoClientError(RuntimeError):
    """The Go load client could not be built or did not give a result."""


def sources() -> list[Path]:
    return [BUILD, *GO_DIR.glob("*.go"), *(ROOT / "protos" / "chimera" / "v1").glob("*.proto")]


def build(out: Path = DEFAULT_BINARY, timeout: float = 600.0) -> Path:
    """Build the client with build.sh; GoClientError names the missing packages or the compiler's words."""
    proc = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        what = "Go toolchain missing" if proc.returncode == MISSING_TOOLCHAIN else "build failed"
        raise GoClientError(f"loadtest/goload/build.sh: {what} (exit {proc.returncode}); "
                            "`--client python` measures with the Python client instead:\n"
                            + (proc.stderr or proc.stdout)[-3000:])
    return out


def ensure_built(binary: Path | None = None) -> Path:
    """The given binary as is, or the default one, (re)built when missing or older than its sources."""
    if binary is not None:
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise GoClientError(f"{binary} is not an executable file")
        return binary
    if DEFAULT_BINARY.is_file():
        built = DEFAULT_BINARY.stat().st_mtime
        if all(p.stat().st_mtime <= built for p in sources()):
            return DEFAULT_BINARY
    return build(DEFAULT_BINARY)


def command(binary: Path, spec: LoadSpec, rows_path: Path) -> list[str]:
    cmd = [str(binary), "-target", spec.target, "-kind", spec.kind, "-c", str(spec.concurrency),
           "-duration", f"{spec.duration_s}s", "-warmup", f"{spec.warmup_s}s", "-model", spec.model,
           "-rows", str(rows_path), "-batch-rows", str(spec.batch_rows),
           "-timeout", f"{spec.timeout_s or 30}s", "-n-keys", str(spec.n_keys), "-seed", str(spec.seed)]
    if spec.feature_names:
        cmd.append("-named")
    if spec.metadata:
        cmd += ["-metadata", ",".join(f"{k}={v}" for k, v in spec.metadata)]
    if spec.rate > 0:
        cmd += ["-rate", str(spec.rate)]
    if spec.connections > 1:
        cmd += ["-conns", str(spec.connections)]
    return cmd


def run_go(spec: LoadSpec, binary: Path) -> LoadResult:
    """One closed-loop measurement by the Go client (one process, `spec.concurrency` goroutines on
    `spec.connections` connections; `spec.processes` does not apply)."""
    with tempfile.TemporaryDirectory(prefix="chimera-goload-") as tmp:
        rows_path = Path(tmp) / "rows.json"
        rows_path.write_text(json.dumps({"rows": [list(r) for r in spec.rows],
                                         "feature_names": list(spec.feature_names)}))
        limit = spec.warmup_s + spec.duration_s + (spec.timeout_s or 30) + 90
        try:
            proc = subprocess.run(command(binary, spec, rows_path), capture_output=True, text=True,
                                  timeout=limit)
        except subprocess.TimeoutExpired as exc:  # run() kills its own child before raising
            raise GoClientError(f"Go load client did not finish within {limit:.0f} s") from exc
    if proc.returncode != 0:
        raise GoClientError(f"Go load client exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    nan = float("nan")

    def ms(key: str) -> float:
        return float(out[key]) if out.get(key) is not None else nan

    return LoadResult(
        kind=out["kind"], concurrency=int(out["concurrency"]), requests=int(out["requests"]),
        rows=int(out["rows"]), errors=int(out["errors"]), error_codes=dict(out["error_codes"]),
        window_s=float(out["window_s"]), rps=float(out["rps"]), rows_per_s=float(out["rows_per_s"]),
        p50_ms=ms("p50_ms"), p90_ms=ms("p90_ms"), p99_ms=ms("p99_ms"), max_ms=ms("max_ms"),
        extra={"client": "go", "go": out.get("go"), "connect_ms": out.get("connect_ms"),
               "unmeasured_calls": out.get("unmeasured_calls"), "conns": out.get("conns")},
    )
