"""The ASGI middleware's own Prometheus metrics (docs/metrics.md, "The ASGI middleware").

The middleware runs in the protected service's process (the hub's uvicorn), which has no
policyd metrics folder: policyd counts the decisions, the middleware counts what only it
sees, the calls that failed and the answers it gave itself. The families are registered in
prometheus_client's default registry, or one the caller passes, when a middleware asks for
them: importing the middleware never imports prometheus_client.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

# A failed Check that raised no gRPC status (a bug, a bad channel): the `kind` label.
CLIENT_ERROR = "client_error"


class MiddlewareMetrics:
    """The middleware's metric families in one registry (shared by every middleware that
    counts into it: a family can be registered only once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.checks: Counter = Counter(
            "policyd_middleware_checks",
            "Check calls the ASGI middleware made to policyd (answered or not).",
            registry=registry,
        )
        self.errors: Counter = Counter(
            "policyd_middleware_policyd_errors",
            "Check calls that got no answer from policyd, by gRPC status"
            " (unavailable: not reachable; deadline_exceeded: too late) or client_error.",
            ["kind"],
            registry=registry,
        )
        self.responses: Counter = Counter(
            "policyd_middleware_responses",
            "Answers the middleware gave itself instead of the app, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self._errors: dict[str, Counter] = {}
        self._responses: dict[int, Counter] = {}

    def failed(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors.setdefault(kind, self.errors.labels(kind))
        child.inc()

    def answered(self, status: int) -> None:
        child = self._responses.get(status)
        if child is None:
            child = self._responses.setdefault(status, self.responses.labels(str(status)))
        child.inc()


_made: dict[int, tuple[CollectorRegistry, MiddlewareMetrics]] = {}
_lock = threading.Lock()


def metrics_in(registry: CollectorRegistry | None = None) -> MiddlewareMetrics:
    """The middleware's families in `registry` (default: prometheus_client's REGISTRY),
    registered on first use."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    with _lock:
        found = _made.get(id(registry))
        if found is None or found[0] is not registry:
            found = (registry, MiddlewareMetrics(registry))
            _made[id(registry)] = found
        return found[1]
