"""Settings read from the environment, in one place so every process agrees on them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SQLITE_FILE = "chimera.db"
TRACES_EXPORTERS = ("none", "console", "otlp", "memory")  # see chimera.tracing
DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S = 24 * 3600.0
DEFAULT_LOG_FEATURES_SAMPLE = 1.0


def default_registry_url() -> str:
    """SQLite in the working directory: the embedded default, so `make demo` needs no server."""
    return f"sqlite:///{Path(DEFAULT_SQLITE_FILE).resolve()}"


def _absolute_sqlite(url: str) -> str:
    """Ray replicas run in other working directories, so a relative SQLite path must be pinned."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


@dataclass(frozen=True)
class Settings:
    registry_url: str = field(default_factory=default_registry_url)
    admin_token: str | None = None
    predict_token: str | None = None
    ray_address: str | None = None
    ray_num_cpus: int = 2
    replica_num_cpus: float = 0.25
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    traces_exporter: str = "none"
    # Promotion (manual and by the rollout controller) needs a passing load test at most this old.
    promotion_loadtest_max_age_s: float = DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S
    # Fraction of predictions logged with their scored feature row (retraining, drift checks).
    log_features_sample: float = DEFAULT_LOG_FEATURES_SAMPLE

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            registry_url=_absolute_sqlite(os.environ.get("CHIMERA_REGISTRY_URL") or default_registry_url()),
            admin_token=os.environ.get("CHIMERA_ADMIN_TOKEN") or None,
            predict_token=os.environ.get("CHIMERA_PREDICT_TOKEN") or None,
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            ray_num_cpus=int(os.environ.get("CHIMERA_RAY_NUM_CPUS", "2")),
            replica_num_cpus=float(os.environ.get("CHIMERA_REPLICA_NUM_CPUS", "0.25")),
            tls_cert=_path(os.environ.get("CHIMERA_TLS_CERT")),
            tls_key=_path(os.environ.get("CHIMERA_TLS_KEY")),
            tls_client_ca=_path(os.environ.get("CHIMERA_TLS_CLIENT_CA")),
            traces_exporter=traces_exporter_from_env(),
            promotion_loadtest_max_age_s=promotion_loadtest_max_age_from_env(),
            log_features_sample=log_features_sample_from_env(),
        )


def traces_exporter_from_env() -> str:
    """CHIMERA_TRACES_EXPORTER (none | console | otlp | memory; default none). An unknown value fails
    at start-up rather than silently turning tracing off."""
    value = (os.environ.get("CHIMERA_TRACES_EXPORTER") or "none").strip().lower()
    if value not in TRACES_EXPORTERS:
        raise ValueError(f"CHIMERA_TRACES_EXPORTER: {value!r} is not one of {', '.join(TRACES_EXPORTERS)}")
    return value


def promotion_loadtest_max_age_from_env() -> float:
    """CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S (seconds; default 86400). A bad value fails at start-up."""
    name = "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S"
    return parse_promotion_loadtest_max_age(os.environ.get(name), name)


def log_features_sample_from_env() -> float:
    """CHIMERA_LOG_FEATURES_SAMPLE (fraction 0..1; default 1). A bad value fails at start-up."""
    name = "CHIMERA_LOG_FEATURES_SAMPLE"
    return parse_log_features_sample(os.environ.get(name), name)


def parse_promotion_loadtest_max_age(value: str | float | None, source: str) -> float:
    """Seconds a passing load test stays good for promotion: a positive, finite number (unset or empty:
    24 h). There is deliberately no value that turns the gate off: an operator who must ship without a
    load test uses `chimera promote --force`, which the audit log records."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S
    seconds = _number(value)
    if seconds is None or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source}: {value!r} is not a positive number of seconds (the load-test gate "
                         "cannot be turned off; `chimera promote --force` skips it for one promotion, "
                         "audited)")
    return seconds


def parse_log_features_sample(value: str | float | None, source: str) -> float:
    """Fraction of predictions logged with their feature row: a number within [0, 1] (unset or empty: 1,
    every row; 0: none, the predictions themselves are still logged)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_LOG_FEATURES_SAMPLE
    fraction = _number(value)
    if fraction is None or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{source}: {value!r} is not a fraction within [0, 1]")
    return fraction


def _number(value: str | float) -> float | None:
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None


def registry_url_from_env() -> str | None:
    """CHIMERA_REGISTRY_URL as given (a relative SQLite path pinned), or None when it is unset. For
    processes where falling back to a local SQLite file would be wrong, such as Ray pods."""
    url = os.environ.get("CHIMERA_REGISTRY_URL")
    return _absolute_sqlite(url) if url else None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
