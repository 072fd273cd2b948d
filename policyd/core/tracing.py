"""OpenTelemetry traces of decisions (docs/tracing.md): the interface the decision path
calls. Off by default: `current` is None, and a decision then pays one attribute read."""

from __future__ import annotations

from typing import Protocol


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


# This process's tracer; None while tracing is off.
current: DecisionTracer | None = None
