"""Settings read from the environment: the ONE module that reads CHIMERA_* and RAY_ADDRESS, so every
process (gateway, CLI, replicas, scheduler, load tester, demo) agrees on names, defaults and parsing.

`Settings.from_env()` reads every section; each section also has its own `from_env(env)` for a
process (or a test) that needs only that part. `env` is any mapping (default: os.environ), so a test
can pass a dict instead of patching the process environment. A malformed number fails at start-up
with the variable's name; meaning checks that need other floors (cron specs, windows, retrain modes)
stay with their owners (training.scheduler, training.retrain).

Sections and who reads them:
    registry    CHIMERA_REGISTRY_URL                                  every command, replicas, loadtest
                CHIMERA_DB_* client timeouts (connect, query, statement, lock, idle in transaction,
                keepalives, pool, SQLite busy)                        every registry engine
    auth        CHIMERA_ADMIN_TOKEN, CHIMERA_PREDICT_TOKEN, CHIMERA_OUTCOMES_TOKEN, CHIMERA_ACTOR (else USER)
                                                                      gateway (checks), clients (send)
    ray         RAY_ADDRESS, CHIMERA_RAY_NUM_CPUS, CHIMERA_REPLICA_NUM_CPUS,
                CHIMERA_REPLICAS_MIN/_MAX, CHIMERA_REPLICA_TARGET_ONGOING,
                CHIMERA_REPLICA_UPSCALE_DELAY_S/_DOWNSCALE_DELAY_S/_LOOK_BACK_S     replicas a gateway deploys
    tls         CHIMERA_TLS_CERT, CHIMERA_TLS_KEY, CHIMERA_TLS_CLIENT_CA           the gateway's side
    client_tls  CHIMERA_TLS_CA, CHIMERA_TLS_CLIENT_CERT, CHIMERA_TLS_CLIENT_KEY,
                CHIMERA_TLS_SERVER_NAME                               how the CLI and loadtest dial
    tracing     CHIMERA_TRACES_EXPORTER                               gateway and replicas
    gateway     CHIMERA_LOG_FEATURES_SAMPLE, CHIMERA_MAX_CONCURRENT_CALLS, CHIMERA_SPILL_MAX_BYTES,
                CHIMERA_MAX_CONNECTION_AGE_S
    rollout     CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S                  gateway's promotion gate
    retrain     CHIMERA_CODE_REVISION, CHIMERA_GATEWAY_TARGET, CHIMERA_RETRAIN_LOADTEST_*
    scheduler   CHIMERA_RETRAIN_SCHEDULE, CHIMERA_DRIFT_SCHEDULE, CHIMERA_SCHEDULER_MODELS,
                CHIMERA_RETRAIN_WINDOW/_MODE/_TOLERANCE/_CANARY_PERCENT, CHIMERA_DRIFT_WINDOW,
                CHIMERA_SCHEDULER_POLL_SECONDS
The load tester needs no section of its own: it uses registry.configured_url, auth and client_tls.

Over 400 lines because it is the whole catalogue: every variable's name, default, parsing and error
message sit in this one module so that no second reader can appear; split by section, the rule "one
place reads the environment" would again be several places.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

Env = Mapping[str, str]
T = TypeVar("T")

DEFAULT_SQLITE_FILE = "chimera.db"
TRACES_EXPORTERS = ("none", "console", "otlp", "memory")  # see chimera.tracing
DEFAULT_RAY_NUM_CPUS = 2
DEFAULT_REPLICA_NUM_CPUS = 0.25
# A stopping replica waits this long before it first counts its calls in flight (Ray Serve's
# graceful_shutdown_wait_loop_s and its default): the time Serve's routers get to learn it is going.
DEFAULT_REPLICA_SHUTDOWN_WAIT_S = 2.0
DEFAULT_TRACES_EXPORTER = "none"
DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S = 24 * 3600.0
DEFAULT_LOG_FEATURES_SAMPLE = 1.0
DEFAULT_SPILL_MAX_BYTES = 1 << 30  # per spill (predictions, outcomes) of one gateway
DEFAULT_MAX_CONCURRENT_CALLS = 1000  # calls one gateway handles at once (gateway.api.wire sheds beyond)
# A client connection older than this is asked to reconnect (GOAWAY; its calls in flight finish), so that
# connections spread again over the gateways behind one address (GatewaySettings says why). Off (0) by
# default: a client without transparent retry fails the calls that race the GOAWAY.
DEFAULT_MAX_CONNECTION_AGE_S = 0.0
# A scoring call unanswered after the stall timeout fails and marks its version down, so its rows fail
# over (gateway.serving.replica_pool.BatchConfig says why it is short); the call timeout bounds it.
DEFAULT_REPLICA_STALL_TIMEOUT_S = 3.0
DEFAULT_REPLICA_CALL_TIMEOUT_S = 30.0
# The retrain load-test gate (training.retrain.LoadTestGate): 50 req/s for 10 s after 2 s of warm-up,
# p99 at most 250 ms, at most 1 % errors.
DEFAULT_RETRAIN_LOADTEST_RPS = 50.0
DEFAULT_RETRAIN_LOADTEST_DURATION_S = 10.0
DEFAULT_RETRAIN_LOADTEST_WARMUP_S = 2.0
DEFAULT_RETRAIN_LOADTEST_SLO_P99_MS: float | None = 250.0
DEFAULT_RETRAIN_LOADTEST_MAX_ERROR_RATE = 0.01
_OFF = ("", "off", "none", "disabled")


def _env(env: Env | None) -> Env:
    return os.environ if env is None else env


def _get(env: Env, name: str) -> str | None:
    """The variable's value, None when unset or empty (an empty value means "use the default")."""
    value = env.get(name)
    return value if value else None


def _parsed(env: Env, name: str, parse: Callable[[str], T], default: T, what: str) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not {what}") from None


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(raw)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# ------------------------------------------------------------------------------------ registry
def default_registry_url() -> str:
    """SQLite in the working directory: the embedded default, so `make demo` needs no server."""
    return f"sqlite:///{Path(DEFAULT_SQLITE_FILE).resolve()}"


def _absolute_sqlite(url: str) -> str:
    """Ray replicas run in other working directories, so a relative SQLite path must be pinned."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


def _seconds(env: Env, name: str, default: float) -> float:
    """A non-negative, finite number of seconds (0 turns the bound off where the README says so)."""
    value = _parsed(env, name, float, default, "a number of seconds")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: {value!r} is not a non-negative number of seconds")
    return value


@dataclass(frozen=True)
class RegistrySettings:
    """`url` is what to use (CHIMERA_REGISTRY_URL, else ./chimera.db); `configured_url` is the variable
    as given (None when unset), for processes where falling back to a local file would be wrong (Ray
    pods) or that must not create one (the load tester, the demo's own registry).

    The rest bound every database call of the process (registry.engine applies them), so a database
    that is down, unreachable or hung (accepting bytes, answering nothing) fails calls instead of
    blocking threads forever. PostgreSQL: `connect_timeout_s` to establish a connection;
    `query_timeout_s`, enforced by the client, for any wait on the server's answer (0: none);
    `statement_timeout_s` (0: the process's own default, 30 s in the gateway, none in batch jobs),
    `lock_timeout_s` and `idle_in_transaction_timeout_s`, enforced by the server (0: off); TCP keepalives
    (`keepalives_*`) to notice a vanished peer; `pool_timeout_s` to wait for a pooled connection.
    SQLite: `sqlite_busy_timeout_s` to wait for another writer."""

    url: str = field(default_factory=default_registry_url)
    configured_url: str | None = None
    connect_timeout_s: float = 5.0
    query_timeout_s: float = 60.0
    statement_timeout_s: float = 0.0
    lock_timeout_s: float = 10.0
    idle_in_transaction_timeout_s: float = 60.0
    keepalives_idle_s: float = 10.0
    keepalives_interval_s: float = 5.0
    keepalives_count: int = 2
    pool_timeout_s: float = 10.0
    sqlite_busy_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> RegistrySettings:
        e = _env(env)
        given = _get(e, "CHIMERA_REGISTRY_URL")
        configured = _absolute_sqlite(given) if given else None
        count = _parsed(e, "CHIMERA_DB_KEEPALIVES_COUNT", int, cls.keepalives_count, "a whole number")
        if count < 1:
            raise ValueError(f"CHIMERA_DB_KEEPALIVES_COUNT: {count} is not a positive whole number")
        return cls(
            url=configured or default_registry_url(), configured_url=configured,
            connect_timeout_s=_seconds(e, "CHIMERA_DB_CONNECT_TIMEOUT_S", cls.connect_timeout_s),
            query_timeout_s=_seconds(e, "CHIMERA_DB_QUERY_TIMEOUT_S", cls.query_timeout_s),
            statement_timeout_s=_seconds(e, "CHIMERA_DB_STATEMENT_TIMEOUT_S", cls.statement_timeout_s),
            lock_timeout_s=_seconds(e, "CHIMERA_DB_LOCK_TIMEOUT_S", cls.lock_timeout_s),
            idle_in_transaction_timeout_s=_seconds(e, "CHIMERA_DB_IDLE_IN_TRANSACTION_TIMEOUT_S",
                                                   cls.idle_in_transaction_timeout_s),
            keepalives_idle_s=_seconds(e, "CHIMERA_DB_KEEPALIVES_IDLE_S", cls.keepalives_idle_s),
            keepalives_interval_s=_seconds(e, "CHIMERA_DB_KEEPALIVES_INTERVAL_S", cls.keepalives_interval_s),
            keepalives_count=count,
            pool_timeout_s=_seconds(e, "CHIMERA_DB_POOL_TIMEOUT_S", cls.pool_timeout_s),
            sqlite_busy_timeout_s=_seconds(e, "CHIMERA_DB_SQLITE_BUSY_TIMEOUT_S", cls.sqlite_busy_timeout_s),
        )


# ------------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class AuthSettings:
    """Tokens: the gateway checks them, clients send them. `actor` names the person or job behind an
    admin call in the audit log (CHIMERA_ACTOR, else the login name; None: the caller's default)."""

    admin_token: str | None = field(default=None, repr=False)
    predict_token: str | None = field(default=None, repr=False)
    actor: str | None = None
    # RecordOutcome(s) require this token (or the admin token) when set; unset, they take the predict
    # token when that is set (outcomes steer rollouts: never more open than predictions).
    outcomes_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Env | None = None) -> AuthSettings:
        e = _env(env)
        return cls(admin_token=_get(e, "CHIMERA_ADMIN_TOKEN"), predict_token=_get(e, "CHIMERA_PREDICT_TOKEN"),
                   actor=_get(e, "CHIMERA_ACTOR") or _get(e, "USER"),
                   outcomes_token=_get(e, "CHIMERA_OUTCOMES_TOKEN"))


# ------------------------------------------------------------------------------------ Ray
@dataclass(frozen=True)
class ReplicaScaling:
    """How many replicas each version's application runs. `min_replicas == max_replicas`: that many,
    fixed (the default: one). Otherwise Ray Serve autoscales between them on the requests each replica
    has in flight (`target_ongoing_requests` per replica), waiting `upscale_delay_s` before adding and
    `downscale_delay_s` before removing replicas, over `look_back_s` of metrics (Ray Serve's own
    autoscaler: a replica being removed finishes its requests first). Ray's defaults for the delays.
    These are the process defaults: a model's rollout policy overrides them per version role
    (rollout.policy.RolloutPolicy.replica_scaling)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError(f"replicas: need 1 <= CHIMERA_REPLICAS_MIN ({self.min_replicas}) <= "
                             f"CHIMERA_REPLICAS_MAX ({self.max_replicas})")
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"CHIMERA_REPLICA_TARGET_ONGOING: {self.target_ongoing_requests} must be > 0")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.look_back_s) < 0:
            raise ValueError("CHIMERA_REPLICA_*_DELAY_S / _LOOK_BACK_S must be >= 0")

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > self.min_replicas

    def serve_options(self) -> dict[str, object]:
        """The Ray Serve deployment options: a fixed `num_replicas`, or an `autoscaling_config`."""
        if not self.autoscaled:
            return {"num_replicas": self.min_replicas}
        return {"autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            # Serve needs look_back_period_s > metrics_interval_s (equal: a FutureWarning now, an error in a
            # later Ray), so a short look-back gets metrics at half its length, at least two per window.
            "look_back_period_s": self.look_back_s,
            "metrics_interval_s": min(10.0, (self.look_back_s or 20.0) / 2),
        }}

    @classmethod
    def from_env(cls, env: Env | None = None) -> ReplicaScaling:
        e = _env(env)
        low = _parsed(e, "CHIMERA_REPLICAS_MIN", int, 1, "a whole number of replicas")
        return cls(
            min_replicas=low,
            max_replicas=_parsed(e, "CHIMERA_REPLICAS_MAX", int, low, "a whole number of replicas"),
            target_ongoing_requests=_parsed(e, "CHIMERA_REPLICA_TARGET_ONGOING", float, 2.0, "a number"),
            upscale_delay_s=_parsed(e, "CHIMERA_REPLICA_UPSCALE_DELAY_S", float, 30.0, "seconds"),
            downscale_delay_s=_parsed(e, "CHIMERA_REPLICA_DOWNSCALE_DELAY_S", float, 600.0, "seconds"),
            look_back_s=_parsed(e, "CHIMERA_REPLICA_LOOK_BACK_S", float, 30.0, "seconds"),
        )


@dataclass(frozen=True)
class RaySettings:
    """RAY_ADDRESS (None: start a local Ray with `num_cpus`); CPUs reserved per model replica; how many
    replicas each version runs (`scaling`); how long a stopping replica waits before it counts its calls in
    flight (`replica_shutdown_wait_s`: Serve's graceful_shutdown_wait_loop_s)."""

    address: str | None = None
    num_cpus: int = DEFAULT_RAY_NUM_CPUS
    replica_num_cpus: float = DEFAULT_REPLICA_NUM_CPUS
    scaling: ReplicaScaling = field(default_factory=ReplicaScaling)
    replica_shutdown_wait_s: float = DEFAULT_REPLICA_SHUTDOWN_WAIT_S

    def __post_init__(self) -> None:
        if not self.replica_shutdown_wait_s > 0:
            raise ValueError(f"CHIMERA_REPLICA_SHUTDOWN_WAIT_S: {self.replica_shutdown_wait_s} must be > 0 "
                             "(seconds)")

    @classmethod
    def from_env(cls, env: Env | None = None) -> RaySettings:
        e = _env(env)
        return cls(
            address=_get(e, "RAY_ADDRESS"),
            num_cpus=_parsed(e, "CHIMERA_RAY_NUM_CPUS", int, DEFAULT_RAY_NUM_CPUS, "a whole number of CPUs"),
            replica_num_cpus=_parsed(e, "CHIMERA_REPLICA_NUM_CPUS", float, DEFAULT_REPLICA_NUM_CPUS,
                                     "a number of CPUs"),
            scaling=ReplicaScaling.from_env(e),
            replica_shutdown_wait_s=_parsed(e, "CHIMERA_REPLICA_SHUTDOWN_WAIT_S", float,
                                            DEFAULT_REPLICA_SHUTDOWN_WAIT_S, "seconds"),
        )


# ------------------------------------------------------------------------------------ TLS
@dataclass(frozen=True)
class TlsSettings:
    """The gateway's side: server certificate and key (PEM); a client CA on top requires client
    certificates signed by it (mutual TLS). All None: plaintext (loopback, service meshes)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> TlsSettings:
        e = _env(env)
        return cls(_path(_get(e, "CHIMERA_TLS_CERT")), _path(_get(e, "CHIMERA_TLS_KEY")),
                   _path(_get(e, "CHIMERA_TLS_CLIENT_CA")))


@dataclass(frozen=True)
class ClientTlsSettings:
    """How a client dials: `ca` turns TLS on; a client certificate and key on top make it mutual TLS;
    `server_name` overrides the name checked against the certificate. Held as given: the pairing of
    certificate and key is checked where a channel is made (chimera.client.ClientTLS), so a half-set
    pair fails the commands that dial, not every process."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> ClientTlsSettings:
        e = _env(env)
        return cls(_path(_get(e, "CHIMERA_TLS_CA")), _path(_get(e, "CHIMERA_TLS_CLIENT_CERT")),
                   _path(_get(e, "CHIMERA_TLS_CLIENT_KEY")), _get(e, "CHIMERA_TLS_SERVER_NAME"))


# ------------------------------------------------------------------------------------ tracing
def parse_traces_exporter(value: str | None, source: str = "CHIMERA_TRACES_EXPORTER") -> str:
    """none | console | otlp | memory (unset: none). An unknown value fails at start-up rather than
    silently turning tracing off."""
    text = (value or DEFAULT_TRACES_EXPORTER).strip().lower()
    if text not in TRACES_EXPORTERS:
        raise ValueError(f"{source}: {text!r} is not one of {', '.join(TRACES_EXPORTERS)}")
    return text


@dataclass(frozen=True)
class TracingSettings:
    exporter: str = DEFAULT_TRACES_EXPORTER

    @classmethod
    def from_env(cls, env: Env | None = None) -> TracingSettings:
        return cls(parse_traces_exporter(_env(env).get("CHIMERA_TRACES_EXPORTER")))



# ------------------------------------------------------------------------------------ gateway
def parse_log_features_sample(value: str | float | None, source: str) -> float:
    """Fraction of predictions logged with their feature row: a number within [0, 1] (unset or empty: 1,
    every row; 0: none, the predictions themselves are still logged)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_LOG_FEATURES_SAMPLE
    fraction = _number(value)
    if fraction is None or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{source}: {value!r} is not a fraction within [0, 1]")
    return fraction


@dataclass(frozen=True)
class GatewaySettings:
    """Fraction of predictions logged with their scored feature row (retraining, drift checks); the cap
    on calls handled at once (CHIMERA_MAX_CONCURRENT_CALLS; beyond it RESOURCE_EXHAUSTED at once; 0: no
    cap); the bound on each local spill (CHIMERA_SPILL_MAX_BYTES; beyond it new rows are refused with
    RESOURCE_EXHAUSTED rather than filling the disk); whether scoring calls may use the local channel
    of a replica on the gateway's own Ray node (CHIMERA_LOCAL_REPLICA_CHANNEL, on by default; 0 or off:
    every call through Ray Serve; gateway.serving.local_path).

    CHIMERA_MAX_CONNECTION_AGE_S (default 0: never) is how old a client connection may grow before the
    gateway sends it a GOAWAY. A gRPC client keeps one connection for as long as it lives, and the kernel
    (`chimera serve --processes N`) or an L4 load balancer (several gateways behind a Service) places
    connections, not calls: without an age, a worker restarted after a crash, or a gateway added, gets no
    call from the clients already connected, and a few clients can all land on one worker. The GOAWAY is
    graceful (grpc's max_connection_age; the gateway sets no grace, so calls and PredictStream streams in
    flight run to their end); the client opens a new connection for its next call, which the kernel or
    the balancer places afresh. Off by default because a client whose grpc does not retry a call that
    raced the GOAWAY fails it UNAVAILABLE: grpc-go 1.33 (this machine's, the bench's Go client) failed 9
    calls of a one-second c=64 case with a 0.5 s age; grpc's C-core clients (Python) retried them (no
    failed call in tests/integration/test_workers.py).

    CHIMERA_REPLICA_STALL_TIMEOUT_S (default 3 s, at most the 30 s call timeout) is how long a scoring
    call may go unanswered before it fails and its version is marked down. It counts the queueing at the
    replica too, so a model whose calls take a second or more under load needs it raised; a larger value
    also makes a killed or hung replica's rows wait that much longer before they fail over."""

    log_features_sample: float = DEFAULT_LOG_FEATURES_SAMPLE
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS
    spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES
    local_replica_channel: bool = True
    max_connection_age_s: float = DEFAULT_MAX_CONNECTION_AGE_S
    replica_stall_timeout_s: float = DEFAULT_REPLICA_STALL_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Env | None = None) -> GatewaySettings:
        e = _env(env)
        name = "CHIMERA_LOG_FEATURES_SAMPLE"
        cap = _parsed(e, "CHIMERA_MAX_CONCURRENT_CALLS", int, DEFAULT_MAX_CONCURRENT_CALLS,
                      "a whole number of calls (0: no cap)")
        if cap < 0:
            raise ValueError(f"CHIMERA_MAX_CONCURRENT_CALLS: {cap} is negative (0 turns the cap off)")
        spill = _parsed(e, "CHIMERA_SPILL_MAX_BYTES", int, DEFAULT_SPILL_MAX_BYTES, "a whole number of bytes")
        if spill <= 0:
            raise ValueError(f"CHIMERA_SPILL_MAX_BYTES: {spill} is not a positive number of bytes")
        local = _parsed(e, "CHIMERA_LOCAL_REPLICA_CHANNEL", _switch, True, "on/off (1/0)")
        age = _parsed(e, "CHIMERA_MAX_CONNECTION_AGE_S", float, DEFAULT_MAX_CONNECTION_AGE_S,
                      "a number of seconds (0: never)")
        if not (math.isfinite(age) and age >= 0):
            raise ValueError(f"CHIMERA_MAX_CONNECTION_AGE_S: {age:g} is not a number of seconds >= 0 "
                             "(0: connections are never asked to reconnect)")
        stall = _seconds(e, "CHIMERA_REPLICA_STALL_TIMEOUT_S", DEFAULT_REPLICA_STALL_TIMEOUT_S)
        if not 0 < stall <= DEFAULT_REPLICA_CALL_TIMEOUT_S:
            raise ValueError(f"CHIMERA_REPLICA_STALL_TIMEOUT_S: {stall:g} is not a number of seconds in "
                             f"(0, {DEFAULT_REPLICA_CALL_TIMEOUT_S:g}] (the call timeout bounds it)")
        return cls(parse_log_features_sample(e.get(name), name), cap, spill, local, age, stall)



# ------------------------------------------------------------------------------------ rollout
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


@dataclass(frozen=True)
class RolloutSettings:
    """Promotion (manual and by the rollout controller) needs a passing load test at most this old."""

    promotion_loadtest_max_age_s: float = DEFAULT_PROMOTION_LOADTEST_MAX_AGE_S

    @classmethod
    def from_env(cls, env: Env | None = None) -> RolloutSettings:
        name = "CHIMERA_PROMOTION_LOADTEST_MAX_AGE_S"
        return cls(parse_promotion_loadtest_max_age(_env(env).get(name), name))



# ------------------------------------------------------------------------------------ training
def _p99(raw: str) -> float | None:
    return None if raw.lower() in ("off", "none") else float(raw)


@dataclass(frozen=True)
class RetrainSettings:
    """`code_revision`: CHIMERA_CODE_REVISION (set in container images; None: training.retrain asks
    git). The load-test gate a retrained candidate must pass before its canary: `gateway_target`
    (CHIMERA_GATEWAY_TARGET, host:port; None: no load test) and CHIMERA_RETRAIN_LOADTEST_RPS,
    _DURATION_S, _WARMUP_S, _SLO_P99_MS ("off": p99 not checked, None here), _MAX_ERROR_RATE. Ranges
    are checked by training.retrain.LoadTestGate."""

    code_revision: str | None = None
    gateway_target: str | None = None
    loadtest_rps: float = DEFAULT_RETRAIN_LOADTEST_RPS
    loadtest_duration_s: float = DEFAULT_RETRAIN_LOADTEST_DURATION_S
    loadtest_warmup_s: float = DEFAULT_RETRAIN_LOADTEST_WARMUP_S
    loadtest_slo_p99_ms: float | None = DEFAULT_RETRAIN_LOADTEST_SLO_P99_MS
    loadtest_max_error_rate: float = DEFAULT_RETRAIN_LOADTEST_MAX_ERROR_RATE

    @classmethod
    def from_env(cls, env: Env | None = None) -> RetrainSettings:
        e = _env(env)
        prefix = "CHIMERA_RETRAIN_LOADTEST_"
        return cls(
            code_revision=_get(e, "CHIMERA_CODE_REVISION"),
            gateway_target=(e.get("CHIMERA_GATEWAY_TARGET") or "").strip() or None,
            loadtest_rps=_parsed(e, prefix + "RPS", float, cls.loadtest_rps, "a number"),
            loadtest_duration_s=_parsed(e, prefix + "DURATION_S", float, cls.loadtest_duration_s, "a number"),
            loadtest_warmup_s=_parsed(e, prefix + "WARMUP_S", float, cls.loadtest_warmup_s, "a number"),
            loadtest_slo_p99_ms=_parsed(e, prefix + "SLO_P99_MS", _p99, cls.loadtest_slo_p99_ms,
                                        "a number of milliseconds or off"),
            loadtest_max_error_rate=_parsed(e, prefix + "MAX_ERROR_RATE", float, cls.loadtest_max_error_rate,
                                            "a number"),
        )


def _schedule(env: Env, name: str, default: str) -> str | None:
    value = env.get(name, default).strip()
    return None if value.lower() in _OFF else value


@dataclass(frozen=True)
class SchedulerSettings:
    """What `chimera scheduler` runs and how (see training.scheduler, which checks the cron specs,
    windows and mode). A schedule of "off" (or "none", "disabled", empty) is None: that job is off.
    `canary_percent` None: the first step of the model's rollout policy; 0: publish without a canary."""

    retrain_schedule: str | None = "0 3 * * *"
    drift_schedule: str | None = "*/30 * * * *"
    models: tuple[str, ...] = ()
    retrain_window: str = "90d"
    retrain_mode: str = "full"
    retrain_tolerance: float = 0.0
    canary_percent: int | None = None
    drift_window: str = "1d"
    poll_seconds: float = 15.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> SchedulerSettings:
        e = _env(env)
        return cls(
            retrain_schedule=_schedule(e, "CHIMERA_RETRAIN_SCHEDULE", cls.retrain_schedule or ""),
            drift_schedule=_schedule(e, "CHIMERA_DRIFT_SCHEDULE", cls.drift_schedule or ""),
            models=tuple(m.strip() for m in e.get("CHIMERA_SCHEDULER_MODELS", "").split(",") if m.strip()),
            retrain_window=e.get("CHIMERA_RETRAIN_WINDOW", "").strip() or cls.retrain_window,
            retrain_mode=e.get("CHIMERA_RETRAIN_MODE", "").strip() or cls.retrain_mode,
            retrain_tolerance=_parsed(e, "CHIMERA_RETRAIN_TOLERANCE", float, cls.retrain_tolerance,
                                      "a number"),
            canary_percent=_parsed(e, "CHIMERA_RETRAIN_CANARY_PERCENT", int, None, "a whole percent"),
            drift_window=e.get("CHIMERA_DRIFT_WINDOW", "").strip() or cls.drift_window,
            poll_seconds=_parsed(e, "CHIMERA_SCHEDULER_POLL_SECONDS", float, cls.poll_seconds, "a number"),
        )


# ------------------------------------------------------------------------------------ all of it
@dataclass(frozen=True)
class Settings:
    """Every section, read at once. The flat read-only properties (registry_url, admin_token, ...) are
    the names the code used before the sections existed; new code reads the sections."""

    registry: RegistrySettings = field(default_factory=RegistrySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    client_tls: ClientTlsSettings = field(default_factory=ClientTlsSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    @classmethod
    def from_env(cls, env: Env | None = None) -> Settings:
        e = _env(env)
        return cls(
            registry=RegistrySettings.from_env(e),
            auth=AuthSettings.from_env(e),
            ray=RaySettings.from_env(e),
            tls=TlsSettings.from_env(e),
            client_tls=ClientTlsSettings.from_env(e),
            tracing=TracingSettings.from_env(e),
            gateway=GatewaySettings.from_env(e),
            rollout=RolloutSettings.from_env(e),
            retrain=RetrainSettings.from_env(e),
            scheduler=SchedulerSettings.from_env(e),
        )

    # The names from before the sections (tests, replicas.deployment and deploy checks use them).
    @property
    def registry_url(self) -> str:
        return self.registry.url

    @property
    def admin_token(self) -> str | None:
        return self.auth.admin_token

    @property
    def predict_token(self) -> str | None:
        return self.auth.predict_token

    @property
    def ray_address(self) -> str | None:
        return self.ray.address

    @property
    def ray_num_cpus(self) -> int:
        return self.ray.num_cpus

    @property
    def replica_num_cpus(self) -> float:
        return self.ray.replica_num_cpus

    @property
    def tls_cert(self) -> Path | None:
        return self.tls.cert

    @property
    def tls_key(self) -> Path | None:
        return self.tls.key

    @property
    def tls_client_ca(self) -> Path | None:
        return self.tls.client_ca

    @property
    def traces_exporter(self) -> str:
        return self.tracing.exporter

    @property
    def promotion_loadtest_max_age_s(self) -> float:
        return self.rollout.promotion_loadtest_max_age_s

    @property
    def log_features_sample(self) -> float:
        return self.gateway.log_features_sample


def registry_url_from_env() -> str | None:
    """CHIMERA_REGISTRY_URL as given (a relative SQLite path pinned), or None when it is unset. For
    processes where falling back to a local SQLite file would be wrong, such as Ray pods."""
    return RegistrySettings.from_env().configured_url


def _number(value: str | float) -> float | None:
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
