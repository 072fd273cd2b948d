"""An OpenTelemetry collector for tests: OTLP/HTTP (protobuf) POST /v1/traces on a free
loopback port, in a thread of the test process, keeping every span it is sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass
class Exported:
    """One span as received, with its resource's attributes."""

    span: Span
    resource: dict[str, Any]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: _value(a.value) for a in self.span.attributes}


@dataclass
class Collector:
    url: str
    bodies: list[bytes] = field(default_factory=list)
    spans: list[Exported] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, match: Callable[[Exported], bool], timeout: float = 10.0) -> list[Exported]:
        """The spans `match` accepts, once there is at least one (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if match(s)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@contextmanager
def collector() -> Iterator[Collector]:
    """A running collector (stopped on exit); `url` is its OTLP/HTTP traces endpoint."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    found = Collector(f"http://127.0.0.1:{server.server_address[1]}/v1/traces")
    server.collector = found  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="otlp-collector", daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def do_POST(self) -> None:
        found: Collector = self.server.collector  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces" or self.headers.get("content-type") != (
            "application/x-protobuf"
        ):
            self._answer(404, b"")
            return
        request = ExportTraceServiceRequest.FromString(body)
        with found.lock:
            found.bodies.append(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.spans.append(Exported(span, resource))
        self._answer(200, ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass
