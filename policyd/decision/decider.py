"""What every door calls: decide, make the decision's audit record durable, then answer.

A decision whose record cannot be made durable is answered as a deny (AUDIT_UNAVAILABLE):
nothing is allowed that the audit log does not show.

Every door answers through `Decider.answer` with a `Door`: how it renders any decision, and
what it keeps of a remembered allow (engine.Remembered) to answer its repeats without
building the request or a Decision (docs/architecture.md, "Remembered decisions"). The
decider owns remembering: it asks the engine for a remembered answer, records it from the
entry's audit line, and hands the door the entry's form, built once; only what is not
remembered is decided in full (`check_keyed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from policyd.audit.journal import AuditLog, LineTemplate
from policyd.audit.records import AuditUnavailable, record_for
from policyd.core import metrics, tracing
from policyd.core.ids import new_id
from policyd.core.model import CheckInput, Decision
from policyd.core.policy import Policy
from policyd.core.reasons import Reason
from policyd.decision.engine import Engine, Remembered

log = logging.getLogger(__name__)

F = TypeVar("F")  # what a door keeps of a remembered allow
R = TypeVar("R")  # a door's answer


class Door(Generic[F, R]):
    """What one door keeps of a remembered allow, and how it answers a repeat of it:
    `form` builds, once per entry, what the door keeps of the allow (its decision_id is "";
    None when it keeps nothing, say because it cannot be encoded: then every repeat is
    rendered in full); `render_form` answers a repeat with this answer's decision id. Any
    other decision the door renders itself (the `render` given to `Decider.answer`)."""

    def form(self, decision: Decision) -> F | None:
        raise NotImplementedError

    def render_form(self, form: F, decision_id: str) -> R:
        raise NotImplementedError

    def remembered(self, entry: Remembered, decision_id: str, render: Callable[[Decision], R]) -> R:
        # One form per entry (_UNFORMED: none to keep), kept in it. One get per answer.
        form = entry.kept.get(self)
        if form is None:
            made = self.form(entry.decision)
            form = entry.kept[self] = _UNFORMED if made is None else made
        if isinstance(form, _Unformed):
            return render(entry.decision._replace(decision_id=decision_id))
        return self.render_form(form, decision_id)


class _Unformed:
    """A door keeps no form of this entry: each repeat is rendered in full."""


_UNFORMED = _Unformed()


class Decider:
    def __init__(self, engine: Engine, audit: AuditLog | None) -> None:
        self.engine = engine
        self.audit = audit

    def answer(
        self,
        door: Door[F, R],
        render: Callable[[Decision], R],
        key: Hashable,
        policy: Policy,
        request_id: str,
        make_input: Callable[[], CheckInput],
        started_ns: int,
        *,
        remembered: bool = True,
        label: str = "grpc",
        traceparent: str = "",
    ) -> R:
        """Decide (or recall), record, and answer: a remembered allow through `door`'s
        form, any other decision by `render`. `key` is the request's key under `policy`
        (the engine's policy, read once by the door: model.small_key); `make_input()` builds
        the request when it must be decided. `remembered=False`: this request's answer
        depends on more than its key (say, headers the key leaves out), so every decision is
        rendered in full. `label` names the door in the metrics (core/metrics.DOORS);
        `traceparent` is the W3C trace context the door received, when tracing is on."""
        answer = self.recalled(
            door,
            render,
            key,
            policy,
            request_id,
            started_ns,
            remembered=remembered,
            label=label,
            traceparent=traceparent,
        )
        if answer is not None:
            return answer
        decision, entry = self._check(key, policy, request_id, make_input, started_ns)
        if entry is None or not remembered:
            return self._answered(render, decision, label, traceparent, started_ns)
        answer = door.remembered(entry, decision.decision_id, render)
        if metrics.current is not None or tracing.current is not None:
            self._observe(decision, decision.decision_id, label, traceparent, started_ns, False)
        return answer

    def recalled(
        self,
        door: Door[F, R],
        render: Callable[[Decision], R],
        key: Hashable,
        policy: Policy,
        request_id: str,
        started_ns: int,
        *,
        remembered: bool = True,
        label: str = "grpc",
        traceparent: str = "",
        confirm: bool = False,
        batch: object = None,
    ) -> R | None:
        """`answer`'s fast path alone: the answer to a remembered allow (recorded), or None
        when there is none, and nothing else is done. It reads no store row (but, with
        `confirm`, the generation after a commit: Facts.recall) and writes one journal
        line, so a host's event loop may call it inline and send only the rest to a
        thread (policyd/serve/embedded.py). A door's answers are never None."""
        entry = self.engine.recall(key, policy, confirm, batch)
        if entry is None:
            return None
        audit = self.audit
        # Each remembered allow's audit line (LineTemplate), made from its first record.
        line = entry.kept.get(self) if audit is not None else None
        # An entry this decider has no line for (remembered by one without an audit
        # log) is decided, and recorded, in full by `answer`.
        if audit is not None and line is None:
            return None
        decision_id = new_id()
        if audit is not None and line is not None:
            latency_us = (time.perf_counter_ns() - started_ns) // 1000
            try:
                audit.append(line.line(decision_id, time.time(), request_id, latency_us))
            except AuditUnavailable as exc:
                # With `audit.sync = "full"` the line may be in the journal already:
                # the deny keeps its id (never a second record for one answer).
                denied = entry.decision._replace(decision_id=decision_id)
                return self._answered(
                    render, _unrecorded(denied, exc), label, traceparent, started_ns, True
                )
        if remembered:
            answer = door.remembered(entry, decision_id, render)
        else:
            answer = render(entry.decision._replace(decision_id=decision_id))
        if metrics.current is not None or tracing.current is not None:
            self._observe(entry.decision, decision_id, label, traceparent, started_ns, True)
        return answer

    def _answered(
        self,
        render: Callable[[Decision], R],
        decision: Decision,
        label: str,
        traceparent: str,
        started_ns: int,
        hit: bool = False,
    ) -> R:
        answer = render(decision)
        if metrics.current is not None or tracing.current is not None:
            self._observe(decision, decision.decision_id, label, traceparent, started_ns, hit)
        return answer

    @staticmethod
    def _observe(
        decision: Decision,
        decision_id: str,
        label: str,
        traceparent: str,
        started_ns: int,
        hit: bool,
    ) -> None:
        """Count an answered decision (metrics) and trace it (tracing), whichever is on."""
        m = metrics.current
        reason = decision.reason.name
        if m is not None:
            seconds = (time.perf_counter_ns() - started_ns) / 1e9
            m.decided(label, decision.allowed, reason, decision.rule_id, seconds, hit)
        t = tracing.current
        if t is not None:
            try:
                t.decided(
                    traceparent,
                    label,
                    started_ns,
                    decision_id,
                    decision.allowed,
                    reason,
                    decision.rule_id,
                )
            except Exception as exc:  # the answer stands: a span is not worth a failed call
                _untraced_log.error(
                    "decision %s not traced: %s", decision_id, exc, decision_id=decision_id
                )

    def answer_input(
        self,
        door: Door[F, R],
        render: Callable[[Decision], R],
        check: CheckInput,
        started_ns: int,
        *,
        remembered: bool = True,
        label: str = "grpc",
        traceparent: str = "",
    ) -> R:
        """`answer` for a door that has built the CheckInput (keyed by its memo_key)."""
        policy = self.engine.policy
        return self.answer(
            door,
            render,
            check.memo_key(policy.reads_headers),
            policy,
            check.request_id,
            lambda: check,
            started_ns,
            remembered=remembered,
            label=label,
            traceparent=traceparent,
        )

    def check(self, request: CheckInput, started_ns: int | None = None) -> Decision:
        """Decide and record (no remembered form: the CLI, tests)."""
        start = time.perf_counter_ns() if started_ns is None else started_ns
        policy = self.engine.policy
        decision, _ = self._check(
            request.memo_key(policy.reads_headers),
            policy,
            request.request_id,
            lambda: request,
            start,
        )
        return decision

    def check_keyed(
        self,
        key: Hashable,
        policy: Policy,
        request_id: str,
        make_input: Callable[[], CheckInput],
        started_ns: int | None = None,
    ) -> tuple[Decision, Remembered | None]:
        """As check(), for a request that `key` stands for under `policy`
        (Engine.decide_keyed): a repeat of a remembered allow is answered and recorded
        without rebuilding the request. Returns the entry of a remembered allow."""
        start = time.perf_counter_ns() if started_ns is None else started_ns
        return self._check(key, policy, request_id, make_input, start)

    def _check(
        self,
        key: Hashable,
        policy: Policy,
        request_id: str,
        make_input: Callable[[], CheckInput],
        started_ns: int,
    ) -> tuple[Decision, Remembered | None]:
        built: list[CheckInput] = []

        def request() -> CheckInput:
            if not built:
                built.append(make_input())
            return built[0]

        decision, entry = self.engine.decide_keyed(key, policy, request)
        if self.audit is None:
            return decision, entry
        latency_us = (time.perf_counter_ns() - started_ns) // 1000
        try:
            template = entry.kept.get(self) if entry is not None else None
            if template is not None:
                self.audit.append(
                    template.line(decision.decision_id, time.time(), request_id, latency_us)
                )
            else:
                record = record_for(request(), decision, latency_us)
                self.audit.record(record)
                if entry is not None:
                    entry.kept[self] = LineTemplate.of(record)
        except AuditUnavailable as exc:
            return _unrecorded(decision, exc), None
        return decision, entry


class _Throttled:
    """At most one log line per `every` seconds; the lines left out are counted into the
    next one. While the audit log refuses records every decision is denied, and a line for
    each (thousands per second under load) would flood the log and cost the door more than
    the decisions do."""

    def __init__(
        self,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        more: str = "denied so",
    ) -> None:
        self.every = every
        self.more = more
        self.clock = clock
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def error(self, message: str, *args: object, decision_id: str = "") -> None:
        now = self.clock()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return
            self._next = now + self.every
            skipped, self._skipped = self._skipped, 0
        if skipped:
            message += f" (and %d more {self.more} since the last such line)"
            args = (*args, skipped)
        log.error(message, *args, extra={"decision_id": decision_id})


_unrecorded_log = _Throttled()
_untraced_log = _Throttled(every=60.0, more="not traced")


def _unrecorded(decision: Decision, exc: AuditUnavailable) -> Decision:
    m = metrics.current
    if m is not None:
        m.audit_refused()
    _unrecorded_log.error(
        "decision %s denied: %s", decision.decision_id, exc, decision_id=decision.decision_id
    )
    return decision._replace(
        allowed=False,
        reason=Reason.AUDIT_UNAVAILABLE,
        message="the audit log is unavailable",
        data_sources=(),
    )
