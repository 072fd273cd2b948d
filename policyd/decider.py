"""What every door calls: decide, make the decision's audit record durable, then answer.

A decision whose record cannot be made durable is answered as a deny (AUDIT_UNAVAILABLE):
nothing is allowed that the audit log does not show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

from policyd.audit import AuditUnavailable, record_for
from policyd.engine import Engine, Remembered
from policyd.ids import new_id
from policyd.journal import AuditLog, LineTemplate
from policyd.model import CheckInput, Decision
from policyd.policy import Policy
from policyd.reasons import Reason

log = logging.getLogger(__name__)

_AUDIT = "audit"  # Remembered.extras key of the decision's audit line template


class Decider:
    def __init__(self, engine: Engine, audit: AuditLog | None) -> None:
        self.engine = engine
        self.audit = audit

    def check(self, request: CheckInput, started_ns: int | None = None) -> Decision:
        """Decide and record. `started_ns` (perf_counter_ns) is when the door got the call."""
        decision, _ = self.check_keyed(
            lambda policy: request.memo_key(policy.reads_headers),
            request.request_id,
            lambda: request,
            started_ns,
        )
        return decision

    def check_keyed(
        self,
        make_key: Callable[[Policy], Hashable],
        request_id: str,
        make_input: Callable[[], CheckInput],
        started_ns: int | None = None,
    ) -> tuple[Decision, Remembered | None]:
        """As check(), for a request that `make_key(policy)` stands for (Engine.decide_keyed):
        a repeat of a remembered allow is answered, and recorded, without rebuilding the
        request. `request_id` is the caller's id for this call (not part of the key)."""
        start = time.perf_counter_ns() if started_ns is None else started_ns
        built: list[CheckInput] = []

        def request() -> CheckInput:
            if not built:
                built.append(make_input())
            return built[0]

        decision, entry = self.engine.decide_keyed(make_key, request)
        if self.audit is None:
            return decision, entry
        latency_us = (time.perf_counter_ns() - start) // 1000
        try:
            template: LineTemplate | None = entry.extras.get(_AUDIT) if entry else None
            if template is not None:
                self.audit.append(
                    template.line(decision.decision_id, time.time(), request_id, latency_us)
                )
            else:
                record = record_for(request(), decision, latency_us)
                self.audit.record(record)
                if entry is not None:
                    entry.extras[_AUDIT] = LineTemplate.of(record)
        except AuditUnavailable as exc:
            return _unrecorded(decision, exc), None
        return decision, entry

    def recall(
        self, key: Hashable, policy: Policy, request_id: str, started_ns: int
    ) -> tuple[str, Remembered] | Decision | None:
        """A repeat of a remembered allow (Engine.recall), recorded like any answer: its new
        decision id and the entry, whose decision (with decision_id "") it repeats. The fast
        path of check_keyed: no request and no Decision is built. None when there is nothing
        to recall: the door then calls check_keyed. A Decision when the record cannot be
        written: the same deny (AUDIT_UNAVAILABLE) check_keyed gives, with this answer's
        id (a record that may have reached the journal before the failure, with `audit.sync =
        "full"`, has that id too: never a second record for one answer)."""
        entry = self.engine.recall(key, policy)
        if entry is None:
            return None
        decision_id = new_id()
        audit = self.audit
        if audit is not None:
            template: LineTemplate | None = entry.extras.get(_AUDIT)
            if template is None:  # remembered by a decider without an audit log
                return None
            latency_us = (time.perf_counter_ns() - started_ns) // 1000
            try:
                audit.append(template.line(decision_id, time.time(), request_id, latency_us))
            except AuditUnavailable as exc:
                return _unrecorded(entry.decision._replace(decision_id=decision_id), exc)
        return decision_id, entry


class _Throttled:
    """At most one log line per `every` seconds; the lines left out are counted into the
    next one. While the audit log refuses records every decision is denied, and a line for
    each (thousands per second under load) would flood the log and cost the door more than
    the decisions do."""

    def __init__(self, every: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def error(self, message: str, *args: object) -> None:
        now = self.clock()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return
            self._next = now + self.every
            skipped, self._skipped = self._skipped, 0
        if skipped:
            message += " (and %d more denied so since the last such line)"
            args = (*args, skipped)
        log.error(message, *args)


_unrecorded_log = _Throttled()


def _unrecorded(decision: Decision, exc: AuditUnavailable) -> Decision:
    _unrecorded_log.error("decision %s denied: %s", decision.decision_id, exc)
    return decision._replace(
        allowed=False,
        reason=Reason.AUDIT_UNAVAILABLE,
        message="the audit log is unavailable",
        data_sources=(),
    )
