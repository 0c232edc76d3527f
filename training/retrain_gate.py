"""Retraining, step "load test before the canary": the gate is INJECTED.

Training never imports loadtest (the floors in ARCHITECTURE.md): what retraining needs from a load test
is this small protocol, `CandidateLoadTest`; the implementation that drives the product's open-loop
load test through a gateway is `loadtest.candidate_gate.LoadTestGate`, built by the composition root
(the CLI, the scheduler's caller, the demo) and passed in through `RetrainConfig.loadtest`.

A candidate that fails its SLO, or whose load test cannot run, is published but not canaried (the run
says why). Without a gate nothing changes, and the run notes that promotion will wait for a passing
load test of the candidate (promotion, manual and the controller's, requires one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from registry import Registry, VersionInfo
from registry.loadtests import LoadTestRecord
from training.retrain_errors import LoadTestFailed


class CandidateLoadTest(Protocol):
    """Load-tests a just-published candidate and stores the run against it in `load_tests`.

    `run` returns the stored record (passed or not, with the failed SLOs), or raises LoadTestFailed
    when the test cannot run. `to_dict` is stored with the retrain run's parameters: never secrets."""

    @property
    def target(self) -> str: ...

    @property
    def rps(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...

    def run(self, registry: Registry, model: str, version: VersionInfo) -> LoadTestRecord: ...


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided: `passed` lets the canary start; `record` goes to the run's metrics
    ("loadtest"); `note` to the run's reason; `loadtest` is the stored record when a test ran."""

    passed: bool
    record: dict[str, Any]
    note: str
    loadtest: LoadTestRecord | None = None


def run_gate(gate: CandidateLoadTest, registry: Registry, model: str, version: VersionInfo) -> GateVerdict:
    """Run the injected load test of `version` and turn its outcome into a verdict."""
    try:
        lt = gate.run(registry, model, version)
    except LoadTestFailed as exc:
        return GateVerdict(False, {"passed": False, "error": str(exc), "target": gate.target},
                           f"not canaried: {exc}")
    p99 = (lt.report.get("latency_ms") or {}).get("p99")
    record = {"id": lt.id, "passed": lt.passed, "failures": list(lt.failures), "target": gate.target,
              "slo": dict(lt.slo), "p99_ms": p99}
    if lt.passed:
        note = f"load test #{lt.id} passed ({gate.rps:g} req/s, p99 {_fmt_ms(p99)})"
    else:
        note = (f"not canaried: load test #{lt.id} of v{version.version} failed its SLO: "
                + "; ".join(lt.failures))
    return GateVerdict(lt.passed, record, note, lt)


def no_gate_note(model: str, version: int) -> str:
    """The run's note when no load-test gate was given: promotion waits for one."""
    return (f"promotion will wait for a passing load test of v{version} (no load-test target: set "
            f"CHIMERA_GATEWAY_TARGET or --loadtest-target, or run `chimera loadtest --model {model} "
            f"--version {version}`)")


def _fmt_ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) and math.isfinite(value) else "n/a"
