"""The SLO gate: which objectives a run must meet, and a plain-words reason for each one it misses.

Defaults are part of the gate on purpose: a run that reached less than 90 % of the target rate, or
where more than 1 % of requests failed, proves nothing about latency at the expected load, so it must
not count as a pass even when no latency objective was given. Pass `--max-error-rate 1` or
`--min-achieved-ratio 0` to switch those off explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1  # the test could not run (unreachable target, bad payload, ...)
EXIT_USAGE = 2  # bad options (Typer's own code)
EXIT_SLO_FAILED = 3  # the test ran and at least one SLO failed


@dataclass(frozen=True)
class SLO:
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p99_9_ms: float | None = None
    max_error_rate: float | None = 0.01
    min_achieved_ratio: float | None = 0.9

    def validate(self) -> None:
        for name in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--slo-{name[:-3].replace('_', '')}-ms: must be > 0, got {v}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"--max-error-rate: must be within 0..1, got {self.max_error_rate}")
        if self.min_achieved_ratio is not None and not 0 <= self.min_achieved_ratio <= 1:
            raise ValueError(f"--min-achieved-ratio: must be within 0..1, got {self.min_achieved_ratio}")

    def stated(self) -> dict[str, float]:
        """The objectives in force (None = not checked), as stored with the run."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_LABELS = {"p50_ms": "p50", "p90_ms": "p90", "p99_ms": "p99", "p99_9_ms": "p99.9"}


def evaluate_slo(slo: SLO, *, latency_ms: Mapping[str, Any], error_rate: float, achieved_ratio: float,
                 target_rps: float | None = None) -> list[str]:
    """Reasons the run fails its SLOs, one line each naming the objective; empty means it passed."""
    failures: list[str] = []
    for field_name, label in _LABELS.items():
        limit = getattr(slo, field_name)
        if limit is None:
            continue
        value = latency_ms.get(label.replace(".", "_"))
        if value is None:
            failures.append(f"{label} latency SLO ({limit:g} ms): no successful response to measure")
        elif value > limit:
            failures.append(f"{label} latency {value:.3f} ms exceeds the SLO of {limit:g} ms")
    if slo.max_error_rate is not None and error_rate > slo.max_error_rate:
        failures.append(f"error rate {error_rate:.2%} exceeds the SLO of {slo.max_error_rate:.2%}")
    if slo.min_achieved_ratio is not None and achieved_ratio < slo.min_achieved_ratio:
        rate = f" of the target {target_rps:g} req/s" if target_rps else ""
        failures.append(f"achieved rate {achieved_ratio:.1%}{rate} is below the minimum "
                        f"{slo.min_achieved_ratio:.0%}")
    return failures
