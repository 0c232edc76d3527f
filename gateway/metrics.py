"""Prometheus metrics. Names start with chimera_, latency in seconds with buckets fine below 10 ms,
labels bounded: model names come from the registry (unknown names collapse to "_unknown")."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rollout.lookprocess import LookProcess
from rollout.loop import ControllerLoop
from rollout.shadow_gate import SHADOW_ACTIONS

LATENCY_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                   0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Bounded label values: the canary's actions (rollout.decision.Action) and the shadow stage's verdicts.
ROLLOUT_ACTIONS = ("rollback", "step_up", "promote", "hold", *SHADOW_ACTIONS)


class Metrics:
    """One instance per gateway; its own CollectorRegistry so tests can run several gateways."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "chimera_request_latency_seconds", "gRPC request latency at the gateway",
            ["model", "version", "method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("chimera_requests", "gRPC requests handled",
                                ["model", "version", "method", "code"], registry=r)
        self.rows = Counter("chimera_rows_scored", "rows scored", ["model", "version"], registry=r)
        self.inflight = Gauge("chimera_inflight_requests", "requests being handled", ["method"], registry=r)
        self.batch_size = Histogram("chimera_batch_size_rows", "rows per Ray Serve call",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("chimera_batch_queue_wait_seconds",
                                    "time the oldest row waited in the batcher",
                                    ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.ray_call = Histogram("chimera_ray_call_latency_seconds",
                                  "scoring call latency per batch (Ray Serve or a replica's local channel)",
                                  ["model", "version", "ok"], buckets=LATENCY_BUCKETS, registry=r)
        self.replica_calls = Counter(
            "chimera_replica_calls", "scoring calls by how they reached the replicas: local (a replica's "
            "local channel on this node), serve (a Ray Serve call), local_broken (the local channel broke "
            "and the call went through Serve)", ["model", "version", "path"], registry=r)
        self.split_weight = Gauge("chimera_split_weight_percent", "traffic split weight per version",
                                  ["model", "version"], registry=r)
        self.split_revision = Gauge("chimera_split_revision", "current split revision", ["model"], registry=r)
        self.log_queue_depth = Gauge("chimera_prediction_log_queue_depth", "rows waiting for insert",
                                     registry=r)
        self.log_inserted = Gauge("chimera_prediction_log_inserted_rows", "rows inserted since start",
                                  registry=r)
        self.log_spilled = Gauge("chimera_prediction_log_spilled_rows",
                                 "rows written to the spill file since start (queue full or database down)",
                                 registry=r)
        self.log_backpressure = Gauge(
            "chimera_prediction_log_backpressure_rows",
            "rows diverted to the spill file because the log queue was over its bound (inserts slower "
            "than traffic) since start", registry=r)
        self.log_replayed = Gauge("chimera_prediction_log_replayed_rows", "spilled rows replayed since start",
                                  registry=r)
        self.outcomes_spilled = Gauge(
            "chimera_outcomes_spilled_rows",
            "outcomes accepted into the local spill file (database down, or their prediction still "
            "spilled) since start", registry=r)
        self.outcomes_replayed = Gauge("chimera_outcomes_replayed_rows",
                                       "spilled outcomes stored in the database since start", registry=r)
        self.outcomes_dead_letter = Gauge(
            "chimera_outcomes_dead_letter_rows",
            "spilled outcomes moved to the dead-letter file since start, by reason "
            "(unknown_request_id, conflict, invalid)", ["reason"], registry=r)
        # Replica faults: rows a version failed to score (whether or not another version then scored
        # them), and rows retried on another version (the failed one's label).
        self.version_failures = Counter(
            "chimera_version_failures", "rows a version failed to score (replica down, timed out or "
            "erroring), including rows then retried on another version", ["model", "version"], registry=r)
        self.failovers = Counter("chimera_failovers", "rows retried on another version because theirs "
                                 "could not score them", ["model", "from_version"], registry=r)
        # Shadow (mirror) versions: rows mirrored, by what became of them (gateway.serving.shadow.RESULTS).
        self.shadow_rows = Counter("chimera_shadow_rows", "rows mirrored to a shadow version by result "
                                   "(scored, dropped, failed, skipped, unwritten)",
                                   ["model", "version", "result"], registry=r)
        # Rollout controller: the always-valid p-value of the latest look at each canary, and its verdicts.
        self.canary_p_value = Gauge("chimera_canary_p_value",
                                    "p-value of the latest rollout decision for a canary version",
                                    ["model", "version"], registry=r)
        # 1 while the latest look at a canary found a sample-ratio (or outcome-coverage) mismatch: the
        # controller holds and never promotes it until the assignment is trusted again.
        self.canary_srm = Gauge("chimera_canary_srm",
                                "1 when the latest rollout look found a sample-ratio or outcome-coverage "
                                "mismatch (the controller holds)", ["model", "version"], registry=r)
        self.rollout_decisions = Counter("chimera_rollout_decisions",
                                         "rollout controller decisions by action",
                                         ["model", "action"], registry=r)
        # Replicas per version: Ray Serve's RUNNING count (shared by every gateway on the cluster, so
        # each exports the same value: aggregate with max), read by the replica pool's scaling watch.
        self.replicas = Gauge("chimera_replicas", "running Ray Serve replicas per version (Serve's status, "
                              "polled every few seconds)", ["model", "version"], registry=r)
        self.replicas_bound = Gauge("chimera_replicas_bound", "replicas a version may run per its rollout "
                                    "policy (bound: min or max)", ["model", "version", "bound"], registry=r)
        self._replica_labels: set[tuple[str, str]] = set()

    def observe_replicas(self, counts: Mapping[tuple[str, int], int],
                         bounds: Mapping[tuple[str, int], tuple[int, int]] | None = None) -> None:
        """The replica pool's latest reading (version -> RUNNING replicas, and its (min, max) bounds);
        versions no longer deployed lose their series, so a removed canary does not stay at its last
        count."""
        seen = {(m, str(v)) for m, v in counts}
        for labels in self._replica_labels - seen:
            for child, extra in ((self.replicas, ()), (self.replicas_bound, ("min",)),
                                 (self.replicas_bound, ("max",))):
                try:
                    child.remove(*labels, *extra)
                except KeyError:
                    pass
        self._replica_labels = seen
        for (model, version), n in counts.items():
            self.replicas.labels(model, str(version)).set(n)
            low_high = (bounds or {}).get((model, version))
            if low_high is not None:
                self.replicas_bound.labels(model, str(version), "min").set(low_high[0])
                self.replicas_bound.labels(model, str(version), "max").set(low_high[1])

    def watch_records(self, predictions: Any, outcomes: Any) -> None:
        """Durability metrics of the records (gateway.records: a PredictionLog and an OutcomeLog, duck-typed
        because metrics sit below records), read at scrape time so the writer pays nothing:
        chimera_prediction_log_dead_letter_rows{reason} (invalid, duplicate, torn),
        chimera_prediction_log_torn_lines, chimera_spill_bytes{log}, chimera_spill_files{log},
        chimera_spill_rotations{log}, chimera_spill_write_failures{log,reason} (full, limit, io),
        chimera_prediction_log_held_rows, chimera_prediction_log_refused_rows,
        chimera_prediction_log_dropped_rows, chimera_prediction_log_stop_spilled_rows,
        chimera_prediction_log_partition_failures, chimera_outcomes_spill_torn_lines."""
        r = self.registry
        store, stats, files = predictions.store, predictions.stats, predictions.files
        dead = Gauge("chimera_prediction_log_dead_letter_rows", "prediction rows moved to the dead-letter "
                     "file since start, by reason (invalid: refused by the database for their content; "
                     "duplicate: a second prediction under a taken request id; torn: unreadable spill "
                     "lines)", ["reason"], registry=r)
        for reason in store.dead_letter:
            dead.labels(reason).set_function(lambda reason=reason: store.dead_letter.get(reason, 0))
        Gauge("chimera_prediction_log_torn_lines", "unreadable (torn) prediction spill lines skipped since "
              "start", registry=r).set_function(lambda: store.torn_lines)
        Gauge("chimera_outcomes_spill_torn_lines", "unreadable (torn) outcome spill lines skipped since "
              "start", registry=r).set_function(lambda: outcomes.stats.torn_lines)
        size = Gauge("chimera_spill_bytes", "bytes in the local spill files now", ["log"], registry=r)
        count = Gauge("chimera_spill_files", "local spill files now (segments)", ["log"], registry=r)
        rotations = Gauge("chimera_spill_rotations", "spill segments sealed since start", ["log"], registry=r)
        size.labels("predictions").set_function(lambda: files.bytes)
        count.labels("predictions").set_function(lambda: files.files)
        rotations.labels("predictions").set_function(lambda: files.rotations)
        path = outcomes.spill_path
        size.labels("outcomes").set_function(lambda: path.stat().st_size if path.exists() else 0)
        failures = Gauge("chimera_spill_write_failures", "spill writes refused since start, by reason (full: "
                         "disk full; limit: the spill size bound; io: other disk errors)", ["log", "reason"],
                         registry=r)
        for log_name, st in (("predictions", stats), ("outcomes", outcomes.stats)):
            for reason in ("full", "limit", "io"):
                failures.labels(log_name, reason).set_function(
                    lambda st=st, reason=reason: st.spill_failures.get(reason, 0))
        for name, doc, attr in (
                ("held", "rows held in memory now because neither the database nor the disk takes them",
                 "held"),
                ("refused", "predictions refused (RESOURCE_EXHAUSTED) since start because rows were held",
                 "refused"),
                ("dropped", "rows lost since start (stop() could not spill them: the disk failed too)",
                 "dropped"),
                ("stop_spilled", "queued rows spilled by stop() because the database hung or was down",
                 "stop_spilled")):
            Gauge(f"chimera_prediction_log_{name}_rows", doc, registry=r).set_function(
                lambda attr=attr: getattr(stats, attr))
        Gauge("chimera_prediction_log_partition_failures", "attempts since start to make the next days' "
              "partitions of the prediction log that failed (PostgreSQL; each logged with its reason)",
              registry=r).set_function(lambda: stats.partition_failures)

    def watch_controller(self, loop: ControllerLoop, looks: LookProcess | None = None) -> None:
        """The rollout controller's pace, read at scrape time: how long its last round of looks took and
        how long it waits before the next (longer than its interval while looks are slow: rollout.loop);
        and its look process (rollout.lookprocess): memory and starts (0 while looks run in a thread)."""
        Gauge("chimera_rollout_round_seconds", "how long the rollout controller's last round of looks took",
              registry=self.registry).set_function(lambda: loop.last_round_s)
        Gauge("chimera_rollout_wait_seconds", "the rollout controller's wait before its next round of looks "
              "(its interval; after a round over 1 s, long enough that looking is at most 10 % of the time)",
              registry=self.registry).set_function(lambda: loop.wait_s)
        Gauge("chimera_rollout_look_process_resident_bytes", "resident memory of the process the rollout "
              "controller's looks run in (0: none, looks in a thread)",
              registry=self.registry).set_function(lambda: looks.resident_bytes() if looks else 0)
        Gauge("chimera_rollout_look_process_starts", "look processes started so far (more than 1: one hung "
              "or died and was replaced)",
              registry=self.registry).set_function(lambda: looks.started if looks else 0)

    def observe_decision(self, model: str, version: int, action: str, p_value: float | None,
                         srm: bool = False) -> None:
        """One rollout decision about canary `version` of `model` (action: rollback | step_up | promote |
        hold; anything else is counted as "other", so a metrics hook never breaks the controller and
        labels stay bounded). Exposed as chimera_rollout_decisions_total{model,action} and
        chimera_canary_p_value{model,version}; `srm` as chimera_canary_srm{model,version}."""
        if action not in ROLLOUT_ACTIONS:
            action = "other"
        for a in ROLLOUT_ACTIONS:  # every action's series exists (at 0) once a model has a decision
            self.rollout_decisions.labels(model, a)
        self.rollout_decisions.labels(model, action).inc()
        if p_value is not None:
            self.canary_p_value.labels(model, str(version)).set(p_value)
        self.canary_srm.labels(model, str(version)).set(1 if srm else 0)

    def observer(self, model: str, version: int) -> _BatchMetrics:
        return _BatchMetrics(self, model, str(version))


class RequestMetrics:
    """chimera_request_latency_seconds and chimera_requests_total for each call. Label children are
    looked up once per (model, version, method, code) and cached, so the hot path pays one histogram
    observe and one counter increment. Only models `known` accepts become labels; other names collapse
    to "_unknown" and are not cached (a caller sending random model names cannot grow the cache)."""

    def __init__(self, metrics: Metrics, known: Callable[[str], bool]) -> None:
        self.metrics = metrics
        self.known = known
        self._children: dict[tuple[str, int | str, str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, model: str, version: int | str, code: str, t0: float) -> None:
        """One call of `method` answered with status `code` (a grpc.StatusCode name), begun at `t0`
        (time.perf_counter)."""
        key = (model, version, method, code)
        children = self._children.get(key)
        if children is None:
            label = model if self.known(model) else "_unknown"
            labels = (label, str(version or ""), method, code)
            children = (self.metrics.request_latency.labels(*labels), self.metrics.requests.labels(*labels))
            if label != "_unknown" or model == "_unknown":
                self._children[key] = children
        children[0].observe(time.perf_counter() - t0)
        children[1].inc()


class _BatchMetrics:
    """A gateway.serving.batcher.BatchObserver (duck-typed: metrics sit below serving)."""

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self.size = m.batch_size.labels(model, version)
        self.wait = m.queue_wait.labels(model, version)
        self.ok = m.ray_call.labels(model, version, "true")
        self.failed = m.ray_call.labels(model, version, "false")
        self.rows = m.rows.labels(model, version)
        self.paths = {p: m.replica_calls.labels(model, version, p)
                      for p in ("local", "serve", "local_broken")}

    def on_call_path(self, path: str) -> None:
        self.paths[path].inc()

    def on_batch(self, size: int, queue_wait_s: float, call_s: float, ok: bool) -> None:
        self.size.observe(size)
        self.wait.observe(queue_wait_s)
        (self.ok if ok else self.failed).observe(call_s)
        if ok:
            self.rows.inc(size)
