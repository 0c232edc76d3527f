"""`make bench-compare OLD=<rev>`: the same `chimera bench` cases on an earlier revision and on this tree,
interleaved, so "no slower than before the change" (issue 13) is a measurement anyone can repeat.

Why interleaved rounds and medians: on this 2-core machine one case varies by ±20 % between runs
of the same tree (other processes, CPU frequency, Ray's start-up), more than most changes being judged.
Alternating the trees (old, new, new, old, old, new, ...) spreads slow periods over both, and the
per-case median of each side is compared, with every run kept in the JSON output.

Each gateway case is also judged on the gateway's CPU per answered row (`gateway_cpu_us_per_row`,
loadtest.bench_scrape.gateway_cpu), which moves far less between runs than rows/s: a tree whose code
costs more per row shows it there even when the machine's noise hides it in the throughput.

The earlier revision is checked out with `git worktree` into the output directory and installed there
by its own `make install` (its own .venv); so is the later one when `--new REV` names it (default: this
tree as it is), which measures one change on its own, without what landed after it.

Every run is this tree's `chimera bench` with the Go client
(as Chimera's Go callers see it; the grpc.aio client spends much of the two cores itself and varied
more between runs than the change being judged), given `--gateway-tree`: the old revision's checkout
on the "old" side, this one on the "new" side. The gateway it measures is then that tree's
`chimera serve`, on a registry that tree's code made, with replicas on a Ray that tree's Python started
(the same way on both sides). Everything else (client, model, the reference cases) is the same code on
both sides, so only the serving code differs. The worktrees are removed at the end; only processes this
command started are stopped (each bench stops its own Ray and gateway)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _bench_cmd(gateway_tree: Path, duration: float, warmup: float, out: Path) -> list[str]:
    """This tree's bench (Go client) measuring `gateway_tree`'s gateway and replicas."""
    return [sys.executable, "-m", "loadtest.bench", "--client", "go", "--duration", str(duration),
            "--warmup", str(warmup), "--json", str(out), "--gateway-tree", str(gateway_tree)]


def order(rounds: int) -> list[str]:
    """old, new, new, old, old, new, ...: each tree runs first in half of the rounds."""
    return [side for r in range(rounds) for side in (("old", "new") if r % 2 == 0 else ("new", "old"))]


# The reference each gateway case is read against within its own run: the do-nothing server at the same
# concurrency for unary and stream calls, raw onnxruntime at batch 256 for PredictBatch (issue 17's
# ratios). Both are the same code on both sides, so a run on a slower moment of the machine (other
# tenants, CPU frequency) lowers both and the ratio keeps only what the gateway changed.
ANCHORS = {"chimera_c1": "echo_c1", "chimera_batch256": "onnx_batch256", "chimera_packed256": "onnx_batch256"}
DEFAULT_ANCHOR = "echo_c64"


def anchor_of(name: str) -> str | None:
    return ANCHORS.get(name, DEFAULT_ANCHOR) if name.startswith("chimera_") else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per case: each side's median rows/s and p99, and new/old for both; for gateway cases also each
    run's rows/s over its anchor's in the same run (`anchor_of`), and new/old of those medians."""
    out: dict[str, dict[str, Any]] = {}
    for name in runs["old"][0]["cases"]:
        row: dict[str, Any] = {}
        for side in ("old", "new"):
            cases = [r["cases"][name] for r in runs[side] if name in r["cases"]]
            rps, p99 = [c["rows_per_s"] for c in cases], [c["p99_ms"] for c in cases]
            row[side] = {"rows_per_s": rps, "p99_ms": p99,
                         "median_rows_per_s": statistics.median(rps) if cases else None,
                         "median_p99_ms": statistics.median(p99) if cases else None}
        o, n = row["old"], row["new"]
        if o["median_rows_per_s"] and n["median_rows_per_s"] is not None:
            row["rows_per_s_new_over_old"] = n["median_rows_per_s"] / o["median_rows_per_s"]
            row["p99_new_over_old"] = n["median_p99_ms"] / o["median_p99_ms"] if o["median_p99_ms"] else None
        anchor = anchor_of(name)
        if anchor is not None:
            for side in ("old", "new"):
                both = [r["cases"] for r in runs[side]
                        if name in r["cases"] and r["cases"].get(anchor, {}).get("rows_per_s")]
                ratios = [c[name]["rows_per_s"] / c[anchor]["rows_per_s"] for c in both]
                row[side]["over_anchor"] = ratios
                row[side]["median_over_anchor"] = statistics.median(ratios) if ratios else None
            if row["old"]["median_over_anchor"] and row["new"]["median_over_anchor"] is not None:
                row["anchor"] = anchor
                row["anchored_new_over_old"] = (row["new"]["median_over_anchor"]
                                                / row["old"]["median_over_anchor"])
        for side in ("old", "new"):
            cpu = [c["gateway_cpu_us_per_row"] for r in runs[side]
                   if (c := r["cases"].get(name)) and c.get("gateway_cpu_us_per_row")]
            row[side]["gateway_cpu_us_per_row"] = cpu
            row[side]["median_gateway_cpu_us_per_row"] = statistics.median(cpu) if cpu else None
        if row["old"]["median_gateway_cpu_us_per_row"] and row["new"]["median_gateway_cpu_us_per_row"]:
            row["cpu_per_row_new_over_old"] = (row["new"]["median_gateway_cpu_us_per_row"]
                                               / row["old"]["median_gateway_cpu_us_per_row"])
        out[name] = row
    return out


def load_runs(out: Path) -> dict[str, list[dict[str, Any]]]:
    """The runs a comparison wrote into `out` (run<i>-<side>.json), by side, in run order."""
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for path in sorted(out.glob("run*-*.json"), key=lambda p: int(p.name[3:].split("-")[0])):
        runs[path.stem.split("-")[1]].append(json.loads(path.read_text()))
    return runs


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'case':<20} {'old rows/s':>11} {'new rows/s':>11} {'new/old':>8} {'old p99':>8} "
             f"{'new p99':>8} {'anchored new/old':>17} {'gw CPU/row old':>15} {'new':>7} {'new/old':>8}"]
    for name, row in summary.items():
        o, n = row["old"], row["new"]
        if o["median_rows_per_s"] is None or n["median_rows_per_s"] is None:
            continue
        lines.append(f"{name:<20} {o['median_rows_per_s']:>11.0f} {n['median_rows_per_s']:>11.0f} "
                     f"{row.get('rows_per_s_new_over_old', float('nan')):>8.3f} {o['median_p99_ms']:>8.1f} "
                     f"{n['median_p99_ms']:>8.1f} {row.get('anchored_new_over_old', float('nan')):>17.3f}"
                     f"{_us(o.get('median_gateway_cpu_us_per_row')):>16} "
                     f"{_us(n.get('median_gateway_cpu_us_per_row')):>7} "
                     f"{row.get('cpu_per_row_new_over_old', float('nan')):>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-compare", description=__doc__.splitlines()[0])
    p.add_argument("--old", default=None, help="the earlier revision (commit, tag or branch)")
    p.add_argument("--new", default=None,
                   help="the later revision (default: this tree as it is); with it, the change between two "
                        "commits is measured on its own, without what landed after it")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (old, new) runs (default 3)")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None, help="directory for every run's JSON and the summary")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: summarize the run*.json files already in --out")
    args = p.parse_args(argv)
    if args.summarize_only:
        if args.out is None:
            p.error("--summarize-only needs --out")
        print(format_table(summarize(load_runs(args.out))))
        return 0
    if args.old is None:
        p.error("--old is required")
    out = args.out or Path(tempfile.mkdtemp(prefix="chimera-bench-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    checkouts = {"old": (args.old, out / "old-tree")}
    if args.new is not None:
        checkouts["new"] = (args.new, out / "new-tree")
    trees = {"new": ROOT}
    try:
        for side, (rev, tree) in checkouts.items():
            subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), rev], cwd=ROOT,
                           check=True)
            subprocess.run(["make", "install"], cwd=tree, check=True)
            trees[side] = tree
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for i, side in enumerate(order(args.rounds)):
            path = out / f"run{i + 1}-{side}.json"
            print(f"run {i + 1}: {side} ({trees[side]})", flush=True)
            subprocess.run(_bench_cmd(trees[side], args.duration, args.warmup, path), cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            runs[side].append(json.loads(path.read_text()))
        summary = summarize(runs)
        meta = {"old": args.old, "new": args.new or "this tree", "order": order(args.rounds)}
        (out / "summary.json").write_text(json.dumps({**meta, "cases": summary}, indent=2))
        print(format_table(summary))
        print(f"every run and the summary: {out}")
    finally:
        for _, tree in checkouts.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
