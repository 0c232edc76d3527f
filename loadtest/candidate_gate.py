"""The load test retraining runs before a candidate's canary: `LoadTestGate`, the loadtest-based
implementation of `training.retrain_gate.CandidateLoadTest`.

Training never imports loadtest; the composition root (`chimera retrain`, `chimera scheduler`, the
demo) builds this gate and injects it through `RetrainConfig.loadtest` / `Scheduler(loadtest_gate=)`.
The run is the product's open-loop load test pinned to the candidate (what `chimera loadtest
--version N` does), stored against it in `load_tests`, which is what promotion (manual and the
controller's) requires.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chimera.settings import (
    DEFAULT_RETRAIN_LOADTEST_DURATION_S,
    DEFAULT_RETRAIN_LOADTEST_MAX_ERROR_RATE,
    DEFAULT_RETRAIN_LOADTEST_RPS,
    DEFAULT_RETRAIN_LOADTEST_SLO_P99_MS,
    DEFAULT_RETRAIN_LOADTEST_WARMUP_S,
    AuthSettings,
    RetrainSettings,
)
from loadtest.payload import from_schema
from loadtest.report import build_report, git_revision
from loadtest.runner import LoadTestConfig, LoadTestError, prime, run_load_test
from loadtest.slo import SLO, evaluate_slo
from registry import Registry, VersionInfo
from registry.loadtests import LoadTestRecord, record_load_test
from training.retrain_errors import LoadTestFailed

TRIGGER = "retrain"  # the actor on the pinning call and the report's "trigger"


@dataclass(frozen=True)
class LoadTestGate:
    """Load-test a published candidate through a gateway before starting its canary.

    `target` is the gateway (host:port); the run is pinned to the candidate, which needs the gateway's
    admin token (`admin_token`, default CHIMERA_ADMIN_TOKEN). The SLO is the product's gate
    (loadtest.slo.SLO): p99 at most `slo_p99_ms` (None: not checked), error rate at most
    `max_error_rate`, achieved rate at least `min_achieved_ratio` of `rps`. `visible_timeout_s` bounds
    the wait for the gateway to learn of the just-published version (its catalog polls the registry)."""

    target: str
    rps: float = DEFAULT_RETRAIN_LOADTEST_RPS
    duration_s: float = DEFAULT_RETRAIN_LOADTEST_DURATION_S
    warmup_s: float = DEFAULT_RETRAIN_LOADTEST_WARMUP_S
    slo_p99_ms: float | None = DEFAULT_RETRAIN_LOADTEST_SLO_P99_MS
    max_error_rate: float = DEFAULT_RETRAIN_LOADTEST_MAX_ERROR_RATE
    min_achieved_ratio: float = 0.9
    admin_token: str | None = field(default=None, repr=False)
    visible_timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("loadtest target: required (host:port)")
        for name in ("rps", "duration_s", "visible_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"loadtest {name}: must be > 0, got {v}")
        if not (self.warmup_s >= 0 and math.isfinite(self.warmup_s)):
            raise ValueError(f"loadtest warmup_s: must be >= 0, got {self.warmup_s}")
        self.slo().validate()

    def slo(self) -> SLO:
        return SLO(p99_ms=self.slo_p99_ms, max_error_rate=self.max_error_rate,
                   min_achieved_ratio=self.min_achieved_ratio)

    def token(self) -> str | None:
        """`admin_token`, else the process's (chimera.settings: CHIMERA_ADMIN_TOKEN), read when the
        test runs."""
        return self.admin_token or AuthSettings.from_env().admin_token

    def to_dict(self) -> dict[str, Any]:
        """Stored with the run's parameters: never the token."""
        out = dataclasses.asdict(self)
        out.pop("admin_token")
        return out

    @classmethod
    def from_settings(cls, settings: RetrainSettings, **overrides: Any) -> LoadTestGate | None:
        """The gate chimera.settings describes (CHIMERA_GATEWAY_TARGET, CHIMERA_RETRAIN_LOADTEST_*);
        keyword overrides that are not None win (the CLI's options). None without a target: no load
        test."""
        values: dict[str, Any] = {
            "target": settings.gateway_target or "", "rps": settings.loadtest_rps,
            "duration_s": settings.loadtest_duration_s, "warmup_s": settings.loadtest_warmup_s,
            "slo_p99_ms": settings.loadtest_slo_p99_ms, "max_error_rate": settings.loadtest_max_error_rate,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values["target"]:
            return None
        return cls(**values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LoadTestGate | None:
        """`from_settings` of the environment (`env`, default os.environ) as chimera.settings reads it."""
        return cls.from_settings(RetrainSettings.from_env(env), **overrides)

    def run(self, registry: Registry, model: str, version: VersionInfo) -> LoadTestRecord:
        """Run the product's open-loop load test pinned to `version` through `target`, store it in the
        registry against the version and return the stored record (passed or not, with the failed
        SLOs). LoadTestFailed when it cannot run."""
        token = self.token()
        if not token:
            raise LoadTestFailed("pinning the candidate needs the gateway's admin token: "
                                 "set CHIMERA_ADMIN_TOKEN")
        metadata = (("authorization", f"Bearer {token}"), ("x-chimera-actor", f"loadtest:{TRIGGER}"))
        payload = from_schema(version.feature_names, seed=self.seed)
        config = LoadTestConfig(target=self.target, model=model, rps=self.rps, duration_s=self.duration_s,
                                version=version.version, warmup_s=self.warmup_s, metadata=metadata,
                                seed=self.seed)
        slo = self.slo()
        try:
            config.validate()
            _wait_until_visible(config, payload.rows[0], self.visible_timeout_s)
            result = run_load_test(config, payload.rows)
        except (LoadTestError, ValueError) as exc:
            raise LoadTestFailed(f"load test of v{version.version} at {self.target} could not run: "
                                 f"{exc}") from None
        failures = evaluate_slo(slo, latency_ms=result.latency_ms(), error_rate=result.error_rate,
                                achieved_ratio=result.achieved_ratio, target_rps=self.rps)
        report = build_report(result, slo, failures, payload_source=payload.source, git=git_revision(),
                              extra={"trigger": TRIGGER})
        return record_load_test(registry, model, version.version, target=self.target, passed=not failures,
                                failures=failures, slo=slo.stated(), report=report)


def _wait_until_visible(config: LoadTestConfig, row: Mapping[str, float], timeout_s: float) -> None:
    """Prime the pinned version until the gateway knows it: a version published a moment ago reaches
    the gateway's catalog on its next registry poll (NOT_FOUND until then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            prime(config, dict(row))
            return
        except LoadTestError as exc:
            if "NOT_FOUND" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.25)
