"""Prometheus metrics of every policyd process (docs/metrics.md), prometheus-client's
multiprocess mode.

Off unless `metrics.address` is set. Then the process that serves `/metrics` (a lone
`policyd serve`, or the supervisor of `server.workers > 1`) makes a private folder, names
it in $POLICYD_METRICS_DIR and calls `enable()` before it starts a child: every serving
process and the audit indexer inherits the variable, calls `enable()` too and counts into
files of its own in that folder, and one scrape sums them all (`collect_registry`).

prometheus-client picks its value class (in memory, or the multiprocess files) when it is
first imported, from $PROMETHEUS_MULTIPROC_DIR; so nothing imports it before `enable()`
sets that variable, and code that counts reads `current` (None while metrics are off: the
hot path then pays one attribute read).

Labels are bounded sets: a door, a reason code, a rule id of the policy, a grant type;
never a user, an app, a token or a data source.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

# Where a serving process's children find the folder the metrics are counted in.
DIR_ENV = "POLICYD_METRICS_DIR"
_LIB_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Decision latency buckets, in seconds: 10 µs to 1 s, fine below a millisecond where the
# doors answer (a remembered decision takes tens of µs, a gRPC call a few hundred).
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

# The doors a decision can come through (the `door` label); a Decision API caller names its
# own door in CheckRequest.door, and a name outside this set is counted as "grpc". "link":
# the hub's side of a connector's link, asking connector.attach (docs/connectors.md).
DOORS = frozenset({"grpc", "asgi", "embedded", "envoy", "envoy_http", "cli", "link"})


def door_label(name: str) -> str:
    return name if name in DOORS else "grpc"


class Metrics:
    """Every metric family policyd exposes, made once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # -- decisions (the serving processes)
        self.decisions: Counter = Counter(
            "policyd_decisions",
            "Decisions answered, by door, outcome, reason code and route rule id.",
            ["door", "allowed", "reason", "rule"],
            registry=None,  # collected from the files (collect_registry), not here
        )
        self.decision_seconds: Histogram = Histogram(
            "policyd_decision_duration_seconds",
            "Time from a door receiving a request to its answer being ready, audit included.",
            ["door"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.remembered: Counter = Counter(
            "policyd_remembered_answers",
            "Decisions answered from a remembered allow (hit) or decided in full (miss).",
            ["result"],
            registry=None,
        )
        self.cache_generations: Counter = Counter(
            "policyd_cache_generations",
            "Times the decision caches were dropped for a new store generation.",
            registry=None,
        )
        self.store_reads: Counter = Counter(
            "policyd_store_reads",
            "Reads of the store on the decision path (cache misses), by what was read.",
            ["kind"],
            registry=None,
        )
        # -- the audit log
        self.audit_records: Counter = Counter(
            "policyd_audit_records_written",
            "Audit records made durable in a serving process's journal.",
            registry=None,
        )
        self.audit_bytes: Counter = Counter(
            "policyd_audit_bytes_written",
            "Bytes of audit records written to the journals.",
            registry=None,
        )
        self.audit_refusals: Counter = Counter(
            "policyd_audit_refusals",
            "Decisions denied AUDIT_UNAVAILABLE: their record could not be made durable.",
            registry=None,
        )
        self.audit_indexed: Counter = Counter(
            "policyd_audit_records_indexed",
            "Audit records the indexer moved from the journals into the audit log.",
            registry=None,
        )
        self.audit_backlog_records: Gauge = Gauge(
            "policyd_audit_backlog_records",
            "Audit records in the journals not yet indexed, at the indexer's last pass.",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.audit_lag_seconds: Gauge = Gauge(
            "policyd_audit_lag_seconds",
            "Age of the oldest audit record not yet indexed, at the indexer's last pass.",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.audit_last_pass: Gauge = Gauge(
            "policyd_audit_last_pass_timestamp_seconds",
            "Unix time the indexer last finished a pass (failed or not): a stuck indexer"
            " shows as its age, while its backlog and lag keep their last values.",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.audit_verify_failures: Counter = Counter(
            "policyd_audit_verify_failures",
            "Hash-chain checks of the audit log that found a broken or tampered chain.",
            registry=None,
        )
        # -- the policy
        self.policy_info: Gauge = Gauge(
            "policyd_policy_info",
            "The policy version each serving process decides with (1; 0 once replaced).",
            ["version"],
            multiprocess_mode="livemax",
            registry=None,
        )
        self.policy_reloads: Counter = Counter(
            "policyd_policy_reloads",
            "Policy reloads, by result (success or failure: the old policy stays).",
            ["result"],
            registry=None,
        )
        self.policy_last_load: Gauge = Gauge(
            "policyd_policy_last_load_timestamp_seconds",
            "Unix time of the last good policy load.",
            multiprocess_mode="livemax",
            registry=None,
        )
        # -- the authorization server
        self.tokens_issued: Counter = Counter(
            "policyd_oauth_tokens_issued",
            "Access tokens issued by the authorization server, by grant type.",
            ["grant_type"],
            registry=None,
        )
        self.refresh_reuse: Counter = Counter(
            "policyd_oauth_refresh_token_reuse",
            "Refresh tokens presented again after use (the whole grant is revoked).",
            registry=None,
        )
        self.consents: Counter = Counter(
            "policyd_oauth_consents",
            "Consents given on the consent screen, and revoked (settings page, CLI).",
            ["event"],
            registry=None,
        )
        self.sign_in_failures: Counter = Counter(
            "policyd_oauth_sign_in_failures",
            "Failed sign-ins on the authorization server's pages.",
            registry=None,
        )
        # The counters of every answer are tallied in this process's memory under one lock
        # and added to the shared files every FLUSH_SECONDS (`flush`): a counter written to
        # the files costs about 1 us (a lock, a getpid, a write), and an answer moves five;
        # the tally costs a fifth of that. The latency histogram is observed directly (its
        # buckets can only be added to one observation at a time).
        self._tally_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time, the final one included
        self._answers: dict[tuple[str, bool, str, str], int] = {}
        self._hits = 0
        self._misses = 0
        self._records = 0
        self._bytes = 0
        # Labelled children, made once each, then a dict get.
        self._decision_children: dict[tuple[str, bool, str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._read_children: dict[str, Counter] = {}
        self._hit_child = self.remembered.labels("hit")
        self._miss_child = self.remembered.labels("miss")

    def decided(
        self, door: str, allowed: bool, reason: str, rule: str, seconds: float, hit: bool
    ) -> None:
        """Count one answered decision (`hit`: a remembered allow's repeat) and observe its
        latency: the doors' hot path."""
        key = (door, allowed, reason, rule)
        with self._tally_lock:
            answers = self._answers
            answers[key] = answers.get(key, 0) + 1
            if hit:
                self._hits += 1
            else:
                self._misses += 1
        try:
            latency = self._latency_children.get(door)
            if latency is None:
                latency = self._latency_children.setdefault(
                    door, self.decision_seconds.labels(door)
                )
            latency.observe(seconds)
        except Exception as exc:  # never the answer's problem (say, the folder's disk full)
            _failed(exc)

    def audit_written(self, size: int) -> None:
        """Count one audit record of `size` bytes made durable in a journal."""
        with self._tally_lock:
            self._records += 1
            self._bytes += size

    def flush(self) -> None:
        """Add what was tallied since the last flush to the shared files. One flush at a
        time: a process's last flush returns only once every count it took is written."""
        with self._flush_lock:
            try:
                self._flush()
            except Exception as exc:  # the files cannot be written: said, and counting goes on
                _failed(exc)

    def _flush(self) -> None:
        with self._tally_lock:
            answers, self._answers = self._answers, {}
            hits, misses, records, size = self._hits, self._misses, self._records, self._bytes
            self._hits = self._misses = self._records = self._bytes = 0
        for key, n in answers.items():
            child = self._decision_children.get(key)
            if child is None:
                door, allowed, reason, rule = key
                child = self._decision_children[key] = self.decisions.labels(
                    door, "true" if allowed else "false", reason, rule
                )
            child.inc(n)
        if hits:
            self._hit_child.inc(hits)
        if misses:
            self._miss_child.inc(misses)
        if records:
            self.audit_records.inc(records)
        if size:
            self.audit_bytes.inc(size)

    def store_read(self, kind: str) -> None:
        """Count one read of the store on the decision path (`kind`: what the cache missed)."""
        try:
            child = self._read_children.get(kind)
            if child is None:
                child = self._read_children.setdefault(kind, self.store_reads.labels(kind))
            child.inc()
        except Exception as exc:
            _failed(exc)

    def generation_started(self) -> None:
        """Count the decision caches dropped for a new store generation."""
        try:
            self.cache_generations.inc()
        except Exception as exc:
            _failed(exc)

    def audit_refused(self) -> None:
        """Count a decision denied AUDIT_UNAVAILABLE."""
        try:
            self.audit_refusals.inc()
        except Exception as exc:
            _failed(exc)


def safely(count: Callable[[Metrics], object]) -> None:
    """Call `count(current)` when metrics are on; a count that cannot be written (say, the
    folder's disk is full) is said in the log (at most once a minute), never raised: it is
    never the counted work's problem."""
    m = current
    if m is None:
        return
    try:
        count(m)
    except Exception as exc:
        _failed(exc)


_failures = 0
_failure_said = -math.inf
_failure_lock = threading.Lock()


def _failed(exc: Exception) -> None:
    """A count could not be written: said at most once a minute (with how many since), so
    a full disk under load does not flood the log. The decision is not affected."""
    global _failures, _failure_said
    with _failure_lock:
        _failures += 1
        now = time.monotonic()
        if now - _failure_said < 60:
            return
        _failure_said, count, _failures = now, _failures, 0
    log.error("metrics: %d count(s) not written: %s", count, exc)


# This process's metrics; None while they are off.
current: Metrics | None = None

# How often the tallied counts reach the shared files: a scrape is at most this far behind.
FLUSH_SECONDS = 0.25


def flush() -> None:
    """Add this process's tallied counts to the shared files now (before it exits)."""
    if current is not None:
        current.flush()


_stopped = threading.Event()


def _flushing(m: Metrics, stopped: threading.Event) -> None:
    while not stopped.wait(FLUSH_SECONDS):
        m.flush()


def enable(directory: str | None = None) -> Metrics:
    """Turn metrics on in this process, counting into `directory` (default:
    $POLICYD_METRICS_DIR), which children started afterwards inherit."""
    global current
    if current is not None:
        return current
    directory = directory or os.environ.get(DIR_ENV, "")
    if not directory:
        raise RuntimeError(f"metrics: no folder to count in (${DIR_ENV} is not set)")
    if "prometheus_client" in sys.modules and os.environ.get(_LIB_ENV) != directory:
        # Its value class was chosen already: counts would stay in this process's memory.
        raise RuntimeError("metrics: prometheus_client was imported before metrics.enable()")
    os.environ[DIR_ENV] = directory
    os.environ[_LIB_ENV] = directory
    current = Metrics()
    global _stopped
    _stopped = threading.Event()
    threading.Thread(
        target=_flushing, args=(current, _stopped), name="metrics-flush", daemon=True
    ).start()
    return current


def disable() -> None:
    """Turn metrics off in this process (the top process, once its /metrics is closed):
    the last counts are flushed, and its children's variables cleared."""
    global current
    if current is not None:
        _stopped.set()
        current.flush()
        current = None
    os.environ.pop(DIR_ENV, None)
    os.environ.pop(_LIB_ENV, None)


def enable_inherited() -> Metrics | None:
    """In a child of a serving process: turn metrics on when the parent did."""
    if current is None and os.environ.get(DIR_ENV):
        return enable()
    return current


def collect_registry(directory: str) -> CollectorRegistry:
    """A registry that sums every process's counts in `directory`: what /metrics serves."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def process_exited(pid: int) -> None:
    """A child that counted into the folder exited: drop its `live*` gauges."""
    directory = os.environ.get(DIR_ENV)
    if current is not None and directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
