"""OpenTelemetry traces of decisions (docs/tracing.md).

The decision path calls `current.decided(...)` once per answered decision; `current` is None
while tracing is off (the default), and a decision then pays one attribute read. `enable`
(each serving process, at start, when `tracing.enabled`) makes an OpenTelemetry SDK tracer
exporting over OTLP/HTTP; only then is OpenTelemetry imported. `shutdown` (at stop) sends
what is still queued.

A span is made when the decision has been answered, finished at once: it starts when the door
received the request and is a child of the W3C `traceparent` that came with it (gRPC
metadata, or the request's header as Envoy passed it on). It carries the decision id, the
reason code, the rule and the door; never the token, and no header but the trace context.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import TYPE_CHECKING, Protocol

from policyd.core.reasons import Reason

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind, Status, Tracer

    Extract = Callable[[Mapping[str, str]], Context]

SPAN_NAME = "policyd.decision"
SERVICE_NAME = "policyd"

# Reasons that say policyd failed to decide (HTTP 5xx at the doors): the span's status is
# ERROR. Every other deny is an answer, not an error (OpenTelemetry's rule for SERVER spans).
_FAILED = frozenset(
    r.name
    for r in (
        Reason.STORE_UNAVAILABLE,
        Reason.AUDIT_UNAVAILABLE,
        Reason.INTERNAL_ERROR,
        Reason.CONDITION_ERROR,
    )
)

# A well-formed traceparent (W3C Trace Context, version 00) whose caller did not sample the
# request (the flags' lowest bit is 0): the parent-based sampler would drop the span, and
# this says so in well under a microsecond, not the SDK's ~9.
_UNSAMPLED = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]")


class DecisionTracer(Protocol):
    def decided(
        self,
        traceparent: str,
        door: str,
        started_ns: int,
        decision_id: str,
        allowed: bool,
        reason: str,
        rule: str,
    ) -> None:
        """Record one answered decision as a finished span: a child of `traceparent` (the
        W3C header a door received; "" = none: a new trace), from `started_ns`
        (time.perf_counter_ns() when the door received the request) until now."""


class OtlpTracer:
    """Decisions as spans of an OpenTelemetry SDK tracer (made by `enable`)."""

    def __init__(self, tracer: Tracer, extract: Extract, kind: SpanKind, error: Status) -> None:
        self._tracer = tracer
        self._extract = extract
        self._kind = kind
        self._error = error

    def decided(
        self,
        traceparent: str,
        door: str,
        started_ns: int,
        decision_id: str,
        allowed: bool,
        reason: str,
        rule: str,
    ) -> None:
        if traceparent and _UNSAMPLED.fullmatch(traceparent):
            return
        now = time.time_ns()
        start = now - (time.perf_counter_ns() - started_ns)
        # A malformed traceparent extracts to an empty context: a new trace.
        parent = self._extract({"traceparent": traceparent}) if traceparent else None
        span = self._tracer.start_span(
            SPAN_NAME,
            context=parent,
            kind=self._kind,
            start_time=start,
            attributes={
                "policyd.decision_id": decision_id,
                "policyd.allowed": allowed,
                "policyd.reason": reason,
                "policyd.rule_id": rule,
                "policyd.door": door,
            },
        )
        if reason in _FAILED:
            span.set_status(self._error)
        span.end(end_time=now)


# This process's tracer; None while tracing is off.
current: DecisionTracer | None = None
_provider: TracerProvider | None = None
_shutdown_seconds = 5.0


def enable(
    endpoint: str,
    *,
    sample_ratio: float = 1.0,
    timeout_seconds: float = 5.0,
    instance: str = "",
) -> DecisionTracer:
    """Turn tracing on in this process: spans batched and sent to the OTLP/HTTP traces URL
    `endpoint` (each export given up after `timeout_seconds`). A request that came with a
    trace context is traced when its caller sampled it; one without, with probability
    `sample_ratio`. `instance` is the resource's service.instance.id (the cluster node; the
    workers of one server share it and differ in process.pid)."""
    global current, _provider, _shutdown_seconds
    if current is not None:
        return current
    # Here, not at the top: a process with tracing off never imports OpenTelemetry.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes: dict[str, str | int] = {"service.name": SERVICE_NAME, "process.pid": os.getpid()}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        shutdown_on_exit=False,  # shutdown() below, bounded
    )
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_seconds)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = OtlpTracer(
        provider.get_tracer("policyd"),
        TraceContextTextMapPropagator().extract,
        SpanKind.SERVER,
        Status(StatusCode.ERROR),
    )
    _provider = provider
    _shutdown_seconds = timeout_seconds
    current = tracer
    return current


def shutdown() -> None:
    """Send the spans still queued and stop (at most tracing's timeout: an unreachable
    collector must not hold up a stopping server); tracing is off afterwards."""
    global current, _provider
    provider = _provider
    current = _provider = None
    if provider is None:
        return
    stopping = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    stopping.start()
    stopping.join(_shutdown_seconds)
