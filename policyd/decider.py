"""What every door calls: decide, make the decision's audit record durable, then answer.

A decision whose record cannot be committed is answered as a deny (AUDIT_UNAVAILABLE):
nothing is allowed that the audit log does not show.
"""

from __future__ import annotations

import logging
import time

from policyd.audit import AuditLog, AuditUnavailable, record_for
from policyd.engine import Engine
from policyd.model import CheckInput, Decision
from policyd.reasons import Reason

log = logging.getLogger(__name__)


class Decider:
    def __init__(self, engine: Engine, audit: AuditLog | None) -> None:
        self.engine = engine
        self.audit = audit

    def check(self, request: CheckInput, started_ns: int | None = None) -> Decision:
        """Decide and record. `started_ns` (perf_counter_ns) is when the door got the call."""
        start = time.perf_counter_ns() if started_ns is None else started_ns
        decision = self.engine.decide(request)
        if self.audit is None:
            return decision
        latency_us = (time.perf_counter_ns() - start) // 1000
        try:
            self.audit.record(record_for(request, decision, latency_us))
        except AuditUnavailable as exc:
            log.error("decision %s denied: %s", decision.decision_id, exc)
            return Decision(
                False,
                Reason.AUDIT_UNAVAILABLE,
                "the audit log is unavailable",
                decision.decision_id,
                decision.principal,
                decision.rule_id,
                decision.action,
                (),
                decision.policy_version,
            )
        return decision
