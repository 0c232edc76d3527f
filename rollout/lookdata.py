"""The one builder that turns logged rows into the data of a rollout look.

The controller (from database rows), ``chimera analyze`` (the same rows again) and ``chimera simulate``
(generated rows) all feed this class, so the statistics that decide a live canary are the statistics
the simulation checks. It keeps incremental sums per split period, per arm and per routing key, so a
look costs O(periods), not O(rows), and the simulator can afford thousands of runs.

Two kinds of input, each a batch of column arrays in the order the rows were logged:

* ``add_requests``: every routed, non-pinned request (served, failed over, or failed entirely), as
  soon as it is logged. Feeds the sample-ratio check (assignment units per arm), the error guardrail
  (a failure counts against the version the request was routed to) and the latency guardrail.
* ``add_outcomes``: predictions whose outcome window has closed (same cutoff for both arms), with the
  outcome value or NaN when none arrived in the window. Feeds the primary metric and outcome coverage.

A period is a split revision: arms are compared only within a period, and the periods are combined by
inverse-variance weights (``LookData.effect``/``variance``), so a base-rate change at a split change
cannot look like an effect. The unit is the routing key (requests without one are their own unit):
variances are cluster-robust over keys, also across periods when a key appears in several.

Over 400 lines because the per-period, per-key running sums, the cells they feed and the look data
read from them are one data structure: split, each part would reach into the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout.stats import outcome_in_domain, per_request_values

BASELINE, CANARY = 0, 1
# Metrics whose per-row values are unbounded: winsorised at limits fixed from the baseline first.
ROBUST_METRICS = frozenset({"mean_outcome", "log_loss"})
# A period enters the combined estimate once both arms have this many outcomes in it: a stratum of
# three rows has a variance estimate too unstable to weight by.
MIN_PERIOD_OUTCOMES = 30
# ... and outcomes from at least this many keys in each arm. The variance is cluster-robust over keys, an
# estimate that needs clusters: a canary whose outcomes come from one or a few clients (sticky routing)
# has no estimate of how much a client's mean varies, and the pooled variance would borrow the
# baseline's, as if the canary's rows were independent. Without keys every request is its own unit, and
# 30 outcomes are 30 keys.
MIN_PERIOD_KEYS = 10


@dataclass
class _OutcomeCell:
    """Per-key sums of one (period, arm): N rows, sum of values, and over keys ΣY², ΣYM, ΣM²."""

    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n: int = 0
    total: float = 0.0
    syy: float = 0.0
    sym: float = 0.0
    smm: float = 0.0
    keys: int = 0
    top: int = 0  # 1 + the largest key code added

    def add(self, codes: np.ndarray, values: np.ndarray, size: int) -> None:
        if self.y.size < size:
            grow = max(size, 2 * self.y.size)
            self.y = np.concatenate([self.y, np.zeros(grow - self.y.size)])
            self.m = np.concatenate([self.m, np.zeros(grow - self.m.size)])
        if codes.size and codes[0] >= self.top and (codes.size == 1 or bool((np.diff(codes) > 0).all())):
            # Fast path (every request its own unit): new, distinct keys, so Y_k = y and M_k = 1.
            self.syy += float(np.dot(values, values))
            self.sym += float(values.sum())
            self.smm += float(codes.size)
            self.keys += int(codes.size)
            self.y[codes], self.m[codes] = values, 1.0
            self.top = int(codes[-1]) + 1
            self.n += int(values.size)
            self.total += float(values.sum())
            return
        uk, inv = np.unique(codes, return_inverse=True)
        dy = np.bincount(inv, weights=values, minlength=uk.size)
        dm = np.bincount(inv, minlength=uk.size).astype(np.float64)
        self.top = max(self.top, int(uk[-1]) + 1)
        oy, om = self.y[uk], self.m[uk]
        ny, nm = oy + dy, om + dm
        self.syy += float(np.dot(ny, ny) - np.dot(oy, oy))
        self.sym += float(np.dot(ny, nm) - np.dot(oy, om))
        self.smm += float(np.dot(nm, nm) - np.dot(om, om))
        self.keys += int(np.count_nonzero(om == 0))
        self.y[uk], self.m[uk] = ny, nm
        self.n += int(values.size)
        self.total += float(values.sum())

    def sum_sq(self, center: float) -> float:
        """Σ_k (Y_k − c M_k)²: the cell's squared residuals over keys around ``center``."""
        return max(self.syy - 2.0 * center * self.sym + center * center * self.smm, 0.0)

    def var_of_mean(self, center: float) -> float:
        """Cluster-robust variance of this cell's mean around ``center`` (the period's pooled mean,
        i.e. the variance under H0): Σ_k (Y_k − c M_k)² / N² · K/(K−1)."""
        if self.keys < 2 or self.n == 0:
            return math.nan
        ss = self.syy - 2.0 * center * self.sym + center * center * self.smm
        return max(ss, 0.0) / (self.n * self.n) * self.keys / (self.keys - 1.0)


@dataclass
class _Period:
    revision: int
    weight: int
    requests: list[int] = field(default_factory=lambda: [0, 0])
    errors: list[int] = field(default_factory=lambda: [0, 0])
    units: list[int] = field(default_factory=lambda: [0, 0])
    matured: list[int] = field(default_factory=lambda: [0, 0])
    outcomes: list[int] = field(default_factory=lambda: [0, 0])
    lat_block: list[np.ndarray] = field(default_factory=list)  # baseline latencies of the current block
    lat_block_n: int = 0
    lat_n: list[int] = field(default_factory=lambda: [0, 0])
    slow: list[int] = field(default_factory=lambda: [0, 0])
    lat_threshold: float = math.nan  # NaN during the period's first (calibration-only) block
    lat_base_seen: int = 0  # baseline latencies of the period so far (the clock that cuts windows)
    # Per time window of ``latency_window`` baseline requests: [n_b, slow_b, n_c, slow_c] (judged rows).
    lat_windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    # The same for errors, every routed request: [n_b, failed_b, n_c, failed_c]; the clock is the
    # period's baseline requests so far (req_base_seen).
    err_windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    req_base_seen: int = 0
    cells: list[_OutcomeCell] = field(default_factory=lambda: [_OutcomeCell(), _OutcomeCell()])
    # Per arm, each matured prediction as 1 (its outcome arrived) or 0, summed per key: the outcome
    # coverage's cluster-robust variance (clients that never report outcomes are keys, not rows).
    coverage: list[_OutcomeCell] = field(default_factory=lambda: [_OutcomeCell(), _OutcomeCell()])


@dataclass(frozen=True)
class PeriodStats:
    """One split period as the look sees it (all JSON-able numbers)."""

    revision: int
    weight: int
    units: tuple[int, int]
    requests: tuple[int, int]
    errors: tuple[int, int]
    latency_n: tuple[int, int]
    slow: tuple[int, int]
    latency_threshold_ms: float
    latency_windows: int
    latency_window_var: float
    error_windows: int
    error_window_var: float
    matured: tuple[int, int]
    outcomes: tuple[int, int]
    mean: tuple[float, float]
    var_of_mean: tuple[float, float]
    # Each arm's coverage (outcomes / matured) variance under equal coverage, pooled over both arms'
    # keys (_pooled_variances; NaN below three keys): what the coverage check weighs the period by.
    coverage_var: tuple[float, float]
    effect: float
    variance: float
    included: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class LookData:
    """Everything a look needs, per period and combined; produced only by ``LookBuilder.data``."""

    metric: str
    current_weight: int
    periods: tuple[PeriodStats, ...]
    n: tuple[int, int]
    mean: tuple[float, float]
    effect: float
    variance: float
    winsor: tuple[float, float] | None
    latency_thresholds: dict[str, float]
    skipped_outcomes: int
    covariate: dict[str, Any] | None = None  # CUPED record (rollout.covariate.AdjustedBuilder)

    def fingerprint(self) -> list[int]:
        """Counts that change when anything a look uses changes (the controller skips a look without)."""
        out: list[int] = []
        for p in self.periods:
            out += [p.revision, *p.requests, *p.errors, *p.matured, *p.outcomes]
        return out


class LookBuilder:
    """Rows in, ``LookData`` out; see the module docstring for the two kinds of rows.

    ``winsor`` holds limits fixed by an earlier look (from the sequential state); the builder fixes
    them itself when missing, deterministically, at the ``winsor_quantile`` / 1 − ``winsor_quantile``
    quantiles of the first ``winsor_calibration`` baseline outcomes.

    The slow counts are also kept per time window of ``latency_window`` baseline requests (log order),
    and ``PeriodStats.latency_window_var`` is the variance of the period's slow-share difference
    (canary − baseline) computed over those windows (cluster-robust, windows as units): slowness comes
    in bursts (a replica's warm-up or stall, a GC pause, a CPU-starved moment on a shared machine), so
    requests close in time are not independent evidence; see ``rollout.decision``.

    Latency thresholds roll, in blocks of ``latency_calibration`` baseline requests per period (in log
    order): the requests of both arms logged while block k+1 fills are compared with the
    ``latency_quantile`` of block k's baseline latencies; the first block of a period only calibrates
    (no request logged during it counts, in either arm). So a threshold never depends on the requests
    it judges (both arms face the same one: valid under A/A whatever the latency does), start-up
    jitter or a load change moves it within one block instead of fixing it for the whole period, and
    each replica's warm-up falls in the uncounted first block. ``latency_thresholds`` (from the state)
    is accepted for old callers and ignored: the thresholds are a function of the rows.
    """

    def __init__(
        self,
        metric: str,
        *,
        winsor_quantile: float | None = 0.01,
        winsor_calibration: int = 1000,
        latency_quantile: float = 0.99,
        latency_calibration: int = 500,
        latency_window: int = 50,
        winsor: tuple[float, float] | None = None,
        latency_thresholds: dict[str, float] | None = None,
        pooled_variance: bool = True,
        canary_floor: bool = False,
    ) -> None:
        self.metric = metric
        self.pooled_variance = pooled_variance
        # The canary's variance of its mean is at least its own (cluster-robust, around the pooled
        # centre), where its values may be spread more widely than the baseline's under "no difference"
        # (rollout.covariate: canary rows without a covariate are left nearly unadjusted).
        self.canary_floor = canary_floor
        self.robust = metric in ROBUST_METRICS and winsor_quantile is not None
        self.winsor_quantile = winsor_quantile
        self.winsor_calibration = winsor_calibration
        self.latency_quantile = latency_quantile
        self.latency_calibration = latency_calibration
        self.latency_window = max(int(latency_window), 1)
        self.winsor = tuple(winsor) if winsor is not None else None
        self.latency_thresholds = dict(latency_thresholds or {})
        self._periods: dict[int, _Period] = {}
        self._codes: dict[Any, int] = {}
        self._first_period = np.full(0, -1, dtype=np.int64)
        self._cells_of_key = np.zeros(0, dtype=np.int64)  # bitmask of (period, arm) cells per key
        self._cell_index: dict[tuple[int, int], int] = {}
        self._shared_keys = False
        self._pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # before winsor limits
        self._calibration: list[np.ndarray] = []
        self._calibration_n = 0
        self.skipped = 0

    # ---------------------------------------------------------------------------------------- input
    def period(self, revision: int, weight: int) -> _Period:
        p = self._periods.get(revision)
        if p is None:
            p = self._periods[revision] = _Period(int(revision), int(weight))
        return p

    def codes(self, units: np.ndarray | list[Any]) -> np.ndarray:
        """Integer codes for routing keys (ints pass through; strings are mapped in first-seen order)."""
        arr = np.asarray(units)
        if arr.dtype.kind in "iu":
            codes = arr.astype(np.int64)
        else:
            get = self._codes.setdefault
            codes = np.fromiter((get(u, len(self._codes)) for u in arr.tolist()), dtype=np.int64,
                                count=arr.size)
        top = int(codes.max()) + 1 if codes.size else 0
        if top > self._first_period.size:
            extra = max(top, 2 * self._first_period.size) - self._first_period.size
            self._first_period = np.concatenate([self._first_period, np.full(extra, -1, dtype=np.int64)])
            self._cells_of_key = np.concatenate([self._cells_of_key, np.zeros(extra, dtype=np.int64)])
        return codes

    def add_requests(self, revision: int, weight: int, arm: np.ndarray, units: np.ndarray,
                     failed: np.ndarray, latency_ms: np.ndarray) -> None:
        """Routed requests of one period: arm 0/1, routing unit, failed (counts against the routed
        version), latency (NaN: unknown, e.g. failed entirely)."""
        p = self.period(revision, weight)
        arm = np.asarray(arm, dtype=np.int64)
        codes = self.codes(units)
        failed = np.asarray(failed, dtype=bool)
        lat = np.asarray(latency_ms, dtype=np.float64)
        # A unit is assigned once per period, when first seen; a key seen in an earlier period is not a
        # fresh draw (rendezvous hashing keeps it where it was), so it is not counted again.
        fresh = self._first_period[codes] < 0
        if fresh.any():
            if codes.size == 1 or bool((np.diff(codes) > 0).all()):
                fc, farm = codes[fresh], arm[fresh]  # distinct already (per-request units)
            else:
                fc, first_idx = np.unique(codes[fresh], return_index=True)
                farm = arm[fresh][first_idx]
            self._first_period[fc] = revision
            p.units[CANARY] += int(farm.sum())
            p.units[BASELINE] += int(farm.size - farm.sum())
        for a in (BASELINE, CANARY):
            sel = arm == a
            p.requests[a] += int(sel.sum())
            p.errors[a] += int((failed & sel).sum())
        self._error_windows(p, arm, failed)
        known = np.isfinite(lat)
        self._latencies(p, arm[known], lat[known])

    def _error_windows(self, p: _Period, arm: np.ndarray, failed: np.ndarray) -> None:
        """Requests and failures per time window (the latency guardrail's windows, every request): a
        replica down for a few seconds fails every request of its arm in a few windows, one shock, not
        that many independent pieces of evidence (``PeriodStats.error_window_var``)."""
        if arm.size == 0:
            return
        p.err_windows = _count_in_windows(p.err_windows, p.req_base_seen, self.latency_window, arm, failed)
        p.req_base_seen += int(np.count_nonzero(arm == BASELINE))

    def _latencies(self, p: _Period, arm: np.ndarray, lat: np.ndarray) -> None:
        """Walk the period's latencies in log order, block by block (see the class docstring); the
        result does not depend on how the rows were split into calls."""
        is_base_all = arm == BASELINE
        cum_all = np.cumsum(is_base_all)  # once per call: per block it made a long call quadratic
        start = 0
        while start < lat.size:
            need = self.latency_calibration - p.lat_block_n  # >= 1: a full block was closed below
            before_start = int(cum_all[start - 1]) if start else 0
            full = int(np.searchsorted(cum_all, before_start + need))  # the row that completes the block
            end = lat.size if full >= lat.size else full + 1
            seg_arm, seg_lat, is_base = arm[start:end], lat[start:end], is_base_all[start:end]
            if not math.isnan(p.lat_threshold):
                is_slow = seg_lat > p.lat_threshold
                for a in (BASELINE, CANARY):
                    sel = seg_arm == a
                    p.lat_n[a] += int(np.count_nonzero(sel))
                    p.slow[a] += int(np.count_nonzero(is_slow[sel]))
                p.lat_windows = _count_in_windows(p.lat_windows, p.lat_base_seen, self.latency_window,
                                                  seg_arm, is_slow)
            p.lat_base_seen += int(np.count_nonzero(is_base))
            base = seg_lat[is_base]
            if base.size:
                p.lat_block.append(base)
                p.lat_block_n += int(base.size)
            if p.lat_block_n >= self.latency_calibration:
                block = np.concatenate(p.lat_block)
                p.lat_threshold = float(np.quantile(block, self.latency_quantile))
                self.latency_thresholds[str(p.revision)] = p.lat_threshold
                p.lat_block, p.lat_block_n = [], 0
            start = end

    def add_outcomes(self, revision: int, weight: int, arm: np.ndarray, units: np.ndarray,
                     values: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Matured, non-failed predictions of one period: the outcome value, NaN when none arrived in
        its window. Values outside the metric's domain are skipped and counted (``skipped_outcomes``)."""
        p = self.period(revision, weight)
        arm = np.asarray(arm, dtype=np.int64)
        codes = self.codes(units)
        y = np.asarray(values, dtype=np.float64)
        have = ~np.isnan(y)
        ok = have & outcome_in_domain(self.metric, y)
        self.skipped += int(np.count_nonzero(have & ~ok))
        arrived = ok.astype(np.float64)
        for a in (BASELINE, CANARY):
            sel = arm == a
            p.matured[a] += int(sel.sum())
            p.outcomes[a] += int((sel & ok).sum())
            if sel.any():
                p.coverage[a].add(codes[sel], arrived[sel], self._first_period.size)
        if not ok.any():
            return
        if self.metric in ("brier", "log_loss"):
            if scores is None:
                raise ValueError(f"metric {self.metric!r} needs the predicted scores")
            v = per_request_values(self.metric, y[ok], np.asarray(scores, dtype=np.float64)[ok])
        else:
            v = y[ok]
        batch = (revision, arm[ok], codes[ok], v)
        if self.robust and self.winsor is None:
            self._pending.append(batch)
            base = v[arm[ok] == BASELINE]
            if base.size:
                self._calibration.append(base)
                self._calibration_n += int(base.size)
            if self._calibration_n >= self.winsor_calibration:
                first = np.concatenate(self._calibration)[: self.winsor_calibration]
                q = float(self.winsor_quantile or 0.0)
                self.winsor = (float(np.quantile(first, q)), float(np.quantile(first, 1.0 - q)))
                pending, self._pending, self._calibration = self._pending, [], []
                for b in pending:
                    self._add_values(*b)
            return
        self._add_values(*batch)

    def _add_values(self, revision: int, arm: np.ndarray, codes: np.ndarray, v: np.ndarray) -> None:
        if self.robust and self.winsor is not None:
            v = np.clip(v, self.winsor[0], self.winsor[1])
        p = self._periods[revision]
        for a in (BASELINE, CANARY):
            sel = arm == a
            if not sel.any():
                continue
            c = codes[sel]
            p.cells[a].add(c, v[sel], self._first_period.size)
            cell = self._cell_index.setdefault((revision, a), len(self._cell_index))
            bit = np.int64(1) << np.int64(cell % 62)
            marks = self._cells_of_key[c]
            if not self._shared_keys and bool(((marks != 0) & ((marks & bit) == 0)).any()):
                self._shared_keys = True  # a key in two cells: the combined variance needs cross terms
            self._cells_of_key[c] = marks | bit

    # --------------------------------------------------------------------------------------- output
    def data(self, current_weight: int) -> LookData:
        """The look's data now; cheap (O(periods), or O(keys) when keys span cells)."""
        stats: list[PeriodStats] = []
        inv_var = 0.0
        weighted = 0.0
        used: list[tuple[_Period, float, float]] = []
        n_b = n_c = 0
        tot_b = tot_c = 0.0
        for rev in sorted(self._periods):
            p = self._periods[rev]
            cb, cc = p.cells
            n_b += cb.n
            n_c += cc.n
            tot_b += cb.total
            tot_c += cc.total
            mb = cb.total / cb.n if cb.n else math.nan
            mc = cc.total / cc.n if cc.n else math.nan
            center = (cb.total + cc.total) / (cb.n + cc.n) if cb.n + cc.n else math.nan
            vb, vc = cb.var_of_mean(center), cc.var_of_mean(center)
            if self.pooled_variance and cb.n and cc.n and cb.keys + cc.keys > 2:
                own = vc
                vb, vc = _pooled_variances(cb, cc)
                if self.canary_floor and math.isfinite(own):
                    vc = max(vc, own)
            eff, var = mc - mb, vb + vc
            lat_k, lat_var = _window_variance(p.lat_windows)
            err_k, err_var = _window_variance(p.err_windows)
            cov_var = _pooled_variances(*p.coverage)
            ok = (cb.n >= MIN_PERIOD_OUTCOMES and cc.n >= MIN_PERIOD_OUTCOMES
                  and cb.keys >= MIN_PERIOD_KEYS and cc.keys >= MIN_PERIOD_KEYS and math.isfinite(var)
                  and var > 0.0)
            if ok:
                inv_var += 1.0 / var
                weighted += eff / var
                used.append((p, center, var))
            stats.append(PeriodStats(
                revision=p.revision, weight=p.weight, units=(p.units[0], p.units[1]),
                requests=(p.requests[0], p.requests[1]), errors=(p.errors[0], p.errors[1]),
                latency_n=(p.lat_n[0], p.lat_n[1]), slow=(p.slow[0], p.slow[1]),
                latency_threshold_ms=p.lat_threshold, latency_windows=lat_k, latency_window_var=lat_var,
                error_windows=err_k, error_window_var=err_var,
                matured=(p.matured[0], p.matured[1]),
                outcomes=(p.outcomes[0], p.outcomes[1]), mean=(mb, mc), var_of_mean=(vb, vc),
                coverage_var=cov_var, effect=eff, variance=var, included=ok))
        if inv_var > 0.0:
            effect = weighted / inv_var
            variance = 1.0 / inv_var
            if self._shared_keys and len(used) > 1:
                variance = self._cross_period_variance(used, inv_var)
        else:
            effect, variance = math.nan, math.nan
        return LookData(
            metric=self.metric, current_weight=int(current_weight), periods=tuple(stats), n=(n_b, n_c),
            mean=(tot_b / n_b if n_b else math.nan, tot_c / n_c if n_c else math.nan),
            effect=effect, variance=variance, winsor=self.winsor,
            latency_thresholds=dict(self.latency_thresholds), skipped_outcomes=self.skipped)

    def _cross_period_variance(self, used: list[tuple[_Period, float, float]], inv_var: float) -> float:
        """Cluster-robust variance of the combined estimate when keys appear in several periods: the
        estimate is Σ_k φ_k over keys, with φ_k the key's weighted influence summed over periods."""
        size = self._first_period.size
        phi = np.zeros(size)
        keys = np.zeros(size, dtype=bool)
        for p, center, var in used:
            w = (1.0 / var) / inv_var
            for a, sign in ((CANARY, 1.0), (BASELINE, -1.0)):
                c = p.cells[a]
                k = c.y.size
                phi[:k] += sign * w * (c.y - center * c.m) / c.n
                keys[:k] |= c.m > 0
        kk = int(keys.sum())
        if kk < 2:
            return math.nan
        return float(np.dot(phi, phi)) * kk / (kk - 1.0)


def _pooled_variances(cb: _OutcomeCell, cc: _OutcomeCell) -> tuple[float, float]:
    """Each arm's variance of its mean under "no difference" (same distribution in both arms): one
    residual variance per unit of outcome from both arms' key sums around their pooled mean, scaled by
    each arm's size; NaN when an arm is empty or there are fewer than three keys in all. The large
    baseline dominates it, so a small canary's mean and its variance estimate are not coupled (with
    skewed outcomes that coupling alone made false alarms). The primary metric's variance and the
    outcome coverage's (each matured prediction 1 or 0) are both this: a per-arm coverage variance
    held A/A canaries with delayed outcomes (4.6 % of 1,000 runs, against 0.1 % binomial), because a
    small canary's own residuals are tiny whenever its few rows all have outcomes."""
    n, kk = cb.n + cc.n, cb.keys + cc.keys
    if not cb.n or not cc.n or kk <= 2:
        return math.nan, math.nan
    center = (cb.total + cc.total) / n
    s2 = (cb.sum_sq(center) + cc.sum_sq(center)) / n * kk / (kk - 1.0)
    return s2 / cb.n, s2 / cc.n


def _count_in_windows(windows: np.ndarray, seen: int, window: int, arm: np.ndarray,
                      flag: np.ndarray) -> np.ndarray:
    """Add rows (log order, at least one) to per-window counts [n_b, x_b, n_c, x_c], x counting `flag`
    (slow, or failed). A row's window is the period's baseline rows before it (`seen` before these)
    // `window`: a clock made of requests, so the controller, `analyze` and `simulate` cut windows alike
    however the rows arrive. Returns the array, grown when the rows reach past its end."""
    is_base = arm == BASELINE
    win = (seen + np.cumsum(is_base) - is_base) // window
    lo, top = int(win[0]), int(win[-1]) + 1
    if top > windows.shape[0]:
        grow = max(top, 2 * windows.shape[0]) - windows.shape[0]
        windows = np.concatenate([windows, np.zeros((grow, 4))])
    for a in (BASELINE, CANARY):
        sel = arm == a
        w = win[sel] - lo
        windows[lo:top, 2 * a] += np.bincount(w, minlength=top - lo)
        windows[lo:top, 2 * a + 1] += np.bincount(w, weights=flag[sel], minlength=top - lo)
    return windows


def _window_variance(w: np.ndarray) -> tuple[int, float]:
    """Cluster-robust variance of a period's difference in a share (slow requests, or failed ones;
    canary − baseline), time windows as the units: Σ_w φ_w² · K/(K−1), φ_w = (x_c,w − r_c n_c,w)/N_c −
    (x_b,w − r_b n_b,w)/N_b, from rows [n_b, x_b, n_c, x_c] per window. A window's shock that hits both
    arms cancels in φ_w; one that hits only the canary's replica counts once, not once per request.
    NaN below two windows with requests, or when an arm has none."""
    if w.shape[0] == 0:
        return 0, math.nan
    w = w[(w[:, 0] + w[:, 2]) > 0]
    k = int(w.shape[0])
    n_b, n_c = float(w[:, 0].sum()), float(w[:, 2].sum())
    if k < 2 or n_b == 0.0 or n_c == 0.0:
        return k, math.nan
    r_b, r_c = float(w[:, 1].sum()) / n_b, float(w[:, 3].sum()) / n_c
    phi = (w[:, 3] - r_c * w[:, 2]) / n_c - (w[:, 1] - r_b * w[:, 0]) / n_b
    return k, float(np.dot(phi, phi)) * k / (k - 1.0)
