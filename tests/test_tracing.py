"""OpenTelemetry traces of decisions (docs/tracing.md), sent over OTLP/HTTP to a collector
in the test process (tests/otlp_collector.py): through a real Envoy (both ext_authz doors),
through the ASGI middleware, and over the Decision API, each asking a real `policyd serve`;
the tracer's span in process; and with tracing off (the default), no span and no
OpenTelemetry imported in the serving process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from adapters.asgi import PolicydMiddleware
from adapters.asgi.middleware import trace_context
from adapters.envoy import config as envoy_config
from policyd.core import tracing
from tests.asgi_server import serve_asgi
from tests.helpers import (
    ROOT,
    Home,
    ServerProcess,
    check_request,
    decision_stub,
    free_port,
    run_server,
)
from tests.otlp_collector import Collector, Exported, collector
from tests.test_asgi import Recorder, echo_app
from tests.test_envoy import _stop, start_envoy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE_ID, parent: str = PARENT_ID, flags: str = "01") -> str:
    return f"00-{trace_id}-{parent}-{flags}"


def _new_trace_id(n: int) -> str:
    return f"{n:032x}"


def _tracing_config(url: str, enabled: bool = True) -> str:
    return f'[tracing]\nenabled = {str(enabled).lower()}\nendpoint = "{url}"\n'


def _assert_no_token(found: Collector, *tokens: str) -> None:
    """Neither the token nor any part of it (its signature) in anything exported."""
    with found.lock:
        bodies = list(found.bodies)
    assert bodies
    for token in tokens:
        for part in (token, token.rsplit(".", 1)[-1]):
            assert all(part.encode() not in body for body in bodies)


# -- the tracer, in process ------------------------------------------------------------------


@pytest.fixture
def tracer() -> Iterator[tuple[tracing.DecisionTracer, Collector]]:
    with collector() as found:
        try:
            yield tracing.enable(found.url, sample_ratio=0.0, instance="node-1"), found
        finally:
            tracing.shutdown()


def test_a_decision_is_a_finished_server_span_in_the_callers_trace(
    tracer: tuple[tracing.DecisionTracer, Collector],
) -> None:
    t, found = tracer
    started = time.perf_counter_ns() - 3_000_000  # the door got the request 3 ms ago
    before = time.time_ns()
    t.decided(traceparent(), "envoy", started, "id-1", False, "DATA_SOURCE_NOT_GRANTED", "r1")
    tracing.shutdown()  # sends what is queued
    assert tracing.current is None
    [span] = found.spans
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert span.span.name == "policyd.decision"
    assert span.span.kind == span.span.SPAN_KIND_SERVER
    assert span.attributes == {
        "policyd.decision_id": "id-1",
        "policyd.allowed": False,
        "policyd.reason": "DATA_SOURCE_NOT_GRANTED",
        "policyd.rule_id": "r1",
        "policyd.door": "envoy",
    }
    assert span.span.status.code == 0  # a deny is an answer, not an error
    assert not span.span.events
    assert span.resource["service.name"] == "policyd"
    assert span.resource["service.instance.id"] == "node-1"
    start, end = span.span.start_time_unix_nano, span.span.end_time_unix_nano
    assert before - 3_500_000 < start < before - 2_500_000  # from when the door got it
    assert end >= start + 3_000_000


def test_sampling_follows_the_caller_and_the_ratio_for_new_traces(
    tracer: tuple[tracing.DecisionTracer, Collector],
) -> None:
    t, found = tracer  # sample_ratio 0: no new trace is traced
    now = time.perf_counter_ns()
    t.decided(traceparent(_new_trace_id(1)), "grpc", now, "sampled", True, "ALLOWED", "r")
    t.decided(traceparent(_new_trace_id(2), flags="00"), "grpc", now, "not", True, "ALLOWED", "r")
    t.decided("", "grpc", now, "new", True, "ALLOWED", "r")
    t.decided("not-a-traceparent", "grpc", now, "bad", True, "ALLOWED", "r")
    zeros = traceparent("0" * 32, flags="00")  # invalid, not unsampled: a new trace, not traced
    t.decided(zeros, "grpc", now, "zeros", True, "ALLOWED", "r")
    t.decided(traceparent(_new_trace_id(3), flags="03"), "grpc", now, "03", True, "ALLOWED", "r")
    tracing.shutdown()
    assert [s.attributes["policyd.decision_id"] for s in found.spans] == ["sampled", "03"]


def test_a_failed_decision_is_an_error_span_and_a_bad_traceparent_a_new_trace(
    tracer: tuple[tracing.DecisionTracer, Collector],
) -> None:
    tracing.shutdown()
    with collector() as found:
        t = tracing.enable(found.url)  # sample_ratio 1
        now = time.perf_counter_ns()
        t.decided("00-zz-yy-01", "grpc", now, "bad", False, "STORE_UNAVAILABLE", "")
        t.decided("", "grpc", now, "none", False, "INTERNAL_ERROR", "")
        tracing.shutdown()
    spans = {s.attributes["policyd.decision_id"]: s for s in found.spans}
    assert set(spans) == {"bad", "none"}
    for span in spans.values():
        assert span.parent_span_id == ""  # a root span of a new trace
        assert span.span.status.code == 2  # ERROR


# -- with tracing off ----------------------------------------------------------------------

_OFF = """
import sys
import grpc
from policyd.config import load_config
from policyd.core import tracing
from policyd.serve.server import Server
from tests.helpers import check_request, decision_stub

config = load_config(sys.argv[1], env={})
config.server.address = sys.argv[2]
server = Server(config)
server.start()
with grpc.insecure_channel(sys.argv[2]) as channel:
    reply = decision_stub(channel).Check(
        check_request(sys.argv[3]), metadata=(("traceparent", sys.argv[4]),), timeout=10
    )
server.stop(0)
tracing.shutdown()
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
print(reply.allowed, tracing.current, loaded)
"""


@pytest.mark.slow
def test_with_tracing_off_nothing_is_sent_and_opentelemetry_is_not_imported(
    tmp_path: Path,
) -> None:
    with collector() as found:
        home = Home(tmp_path, extra_config=_tracing_config(found.url, enabled=False))
        home.seed()
        token = home.token()
        address = f"127.0.0.1:{free_port()}"
        done = subprocess.run(
            [sys.executable, "-c", _OFF, str(home.config_path), address, token, traceparent()],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[0] == "True None []"
        with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
            reply = decision_stub(channel).Check(
                check_request(token), metadata=(("traceparent", traceparent()),), timeout=10
            )
            assert reply.allowed
        assert not found.bodies  # the server has stopped: anything queued would be sent


# -- the Decision API over gRPC --------------------------------------------------------------


@pytest.mark.slow
def test_the_decision_api_continues_the_callers_trace_and_sends_all_at_stop(
    tmp_path: Path,
) -> None:
    """The batch waits ten minutes here: the spans arrive because stopping sends them."""
    with collector() as found, pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
        home = Home(tmp_path, extra_config=_tracing_config(found.url))
        home.seed()
        token = home.token()
        with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
            stub = decision_stub(channel)
            allowed = stub.Check(
                check_request(token), metadata=(("traceparent", traceparent()),), timeout=10
            )
            denied = stub.Check(
                check_request(token, path="/api/data/tags/ds-c"),
                metadata=(("traceparent", traceparent(_new_trace_id(7))),),
                timeout=10,
            )
            unasked = stub.Check(check_request(token, path="/api/user/me"), timeout=10)
            assert allowed.allowed and not denied.allowed and unasked.allowed
            assert not found.spans  # still in the batch
        spans = {s.attributes["policyd.decision_id"]: s for s in found.spans}
    assert set(spans) == {allowed.decision_id, denied.decision_id, unasked.decision_id}
    first = spans[allowed.decision_id]
    assert (first.trace_id, first.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert first.attributes["policyd.reason"] == "ALLOWED"
    assert first.attributes["policyd.rule_id"] == allowed.rule_id
    assert first.attributes["policyd.door"] == "grpc"
    port = server.address.rsplit(":", 1)[1]
    assert first.resource["service.instance.id"] == f"{socket.gethostname()}:{port}"  # node
    second = spans[denied.decision_id]
    assert second.trace_id == _new_trace_id(7)
    assert second.attributes["policyd.reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert spans[unasked.decision_id].parent_span_id == ""  # none sent: a new trace
    _assert_no_token(found, token)


# -- through Envoy and the ASGI middleware, one policyd ----------------------------------------


class _Echo(BaseHTTPRequestHandler):
    """The upstream behind Envoy: answers with the request headers it got, as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Traced:
    found: Collector
    home: Home
    server: ServerProcess
    envoy_grpc: str  # Envoy asking policyd's ext_authz gRPC door
    envoy_http: str  # Envoy asking its HTTP door
    asgi: str  # the echo app behind the ASGI middleware
    echo_port: int  # the upstream behind both Envoys
    door_port: int  # policyd's HTTP door

    def token(self) -> str:
        return self.home.token()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    with ExitStack() as running:
        found = running.enter_context(collector())
        door = free_port()
        home = Home(
            tmp_path_factory.mktemp("traced"),
            extra_config=_tracing_config(found.url)
            + f'[envoy]\nhttp_address = "127.0.0.1:{door}"\n',
        )
        home.seed()
        running.callback(home.store.close)
        # Spans sent within 50 ms, not the SDK's 5 s (OpenTelemetry's own variable).
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
            server = running.enter_context(run_server(home))
        echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        running.callback(echo.server_close)
        running.callback(echo.shutdown)
        grpc_port = int(server.address.rsplit(":", 1)[1])
        urls = []
        for source, policyd in ((envoy_config.PLAIN, grpc_port), (envoy_config.HTTP, door)):
            ports = envoy_config.Ports(
                listen=free_port(), hub=echo.server_address[1], policyd=policyd, admin=free_port()
            )
            url = f"http://127.0.0.1:{ports.listen}"
            config = envoy_config.render(ports, source=source)
            running.callback(_stop, start_envoy(home.root, config, f"{url}/api/info"))
            urls.append(url)
        app = PolicydMiddleware(echo_app(Recorder()), server.address, timeout_seconds=5.0)
        asgi = running.enter_context(serve_asgi(app))
        yield Traced(found, home, server, urls[0], urls[1], asgi, echo.server_address[1], door)


def _one_span(found: Collector, trace_id: str) -> Exported:
    spans = found.wait_for(lambda s: s.trace_id == trace_id)
    assert len(spans) == 1, spans
    return spans[0]


@pytest.mark.slow
@pytest.mark.parametrize("door", ["envoy", "envoy_http"])
def test_envoy_passes_the_clients_traceparent_to_the_decision_span(
    traced: Traced, door: str
) -> None:
    url = traced.envoy_grpc if door == "envoy" else traced.envoy_http
    trace_id = _new_trace_id(100 + len(door))
    token = traced.token()
    r = httpx.get(
        f"{url}/api/data/tags/ds-a",
        headers={"Authorization": f"Bearer {token}", "traceparent": traceparent(trace_id)},
    )
    assert r.status_code == 200, r.text
    upstream = r.json()  # the headers that reached the upstream
    span = _one_span(traced.found, trace_id)
    assert span.parent_span_id == PARENT_ID
    assert span.attributes["policyd.decision_id"] == upstream["x-policyd-decision-id"]
    assert span.attributes["policyd.rule_id"] == upstream["x-policyd-rule-id"]
    assert span.attributes["policyd.reason"] == "ALLOWED"
    assert span.attributes["policyd.allowed"] is True
    assert span.attributes["policyd.door"] == door
    assert not span.span.events
    _assert_no_token(traced.found, token)


def _envoy_tracer(config: dict[str, Any], collector_url: str) -> dict[str, Any]:
    """The rendered sample with Envoy's own OpenTelemetry tracer on (docs/tracing.md)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {
                    "http_uri": {"uri": collector_url, "cluster": "otel", "timeout": "1s"}
                },
                "service_name": "envoy",
            },
        }
    }
    port = int(collector_url.rsplit(":", 1)[1].split("/")[0])
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    config["static_resources"]["clusters"].append(
        {
            "name": "otel",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "otel",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
    )
    return config


@pytest.mark.slow
@pytest.mark.parametrize("door", ["envoy", "envoy_http"])
def test_with_envoys_own_tracer_the_decision_span_is_a_child_of_envoys(
    traced: Traced, door: str
) -> None:
    """Envoy then calls policyd in a span of its own, in the client's trace, and sends that
    span's context (gRPC metadata; the HTTP check request's traceparent header): that one is
    the decision span's parent, not the client's span."""
    grpc_port = int(traced.server.address.rsplit(":", 1)[1])
    ports = envoy_config.Ports(
        listen=free_port(),
        hub=traced.echo_port,
        policyd=grpc_port if door == "envoy" else traced.door_port,
        admin=free_port(),
    )
    source = envoy_config.PLAIN if door == "envoy" else envoy_config.HTTP
    config = _envoy_tracer(envoy_config.render(ports, source=source), traced.found.url)
    url = f"http://127.0.0.1:{ports.listen}"
    envoy = start_envoy(traced.home.root, config, f"{url}/api/info")
    try:
        trace_id = _new_trace_id(400 + len(door))
        r = httpx.get(
            f"{url}/api/data/tags/ds-a",
            headers={
                "Authorization": f"Bearer {traced.token()}",
                "traceparent": traceparent(trace_id),
            },
        )
    finally:
        _stop(envoy)
    assert r.status_code == 200, r.text
    span = _one_span(traced.found, trace_id)
    assert span.attributes["policyd.decision_id"] == r.json()["x-policyd-decision-id"]
    assert span.parent_span_id not in ("", PARENT_ID)  # Envoy's span, in the client's trace
    assert span.attributes["policyd.door"] == door


@pytest.mark.slow
def test_a_deny_through_envoy_is_traced_with_its_reason(traced: Traced) -> None:
    trace_id = _new_trace_id(200)
    token = traced.token()
    r = httpx.get(
        f"{traced.envoy_grpc}/api/data/tags/ds-c",
        headers={"Authorization": f"Bearer {token}", "traceparent": traceparent(trace_id)},
    )
    assert r.status_code == 403, r.text
    span = _one_span(traced.found, trace_id)
    assert span.attributes["policyd.decision_id"] == r.json()["decision_id"]
    assert span.attributes["policyd.reason"] == "DATA_SOURCE_NOT_GRANTED"
    assert span.attributes["policyd.allowed"] is False
    _assert_no_token(traced.found, token)


@pytest.mark.slow
def test_the_asgi_middleware_passes_the_trace_context_to_policyd(traced: Traced) -> None:
    trace_id = _new_trace_id(300)
    token = traced.token()
    r = httpx.get(
        f"{traced.asgi}/api/data/tags/ds-a",
        headers={
            "Authorization": f"Bearer {token}",
            "traceparent": traceparent(trace_id),
            "tracestate": "vendor=1",
        },
    )
    assert r.status_code == 200, r.text
    span = _one_span(traced.found, trace_id)
    assert span.parent_span_id == PARENT_ID
    assert span.attributes["policyd.decision_id"] == r.json()["auth"]["decision_id"]
    assert span.attributes["policyd.door"] == "asgi"
    _assert_no_token(traced.found, token)


def test_the_middleware_sends_a_trace_context_only_when_there_is_one() -> None:
    tp = traceparent().encode()
    assert trace_context([(b"host", b"x")]) is None
    assert trace_context([(b"traceparent", tp)]) == (("traceparent", tp.decode()),)
    assert trace_context(
        [(b"traceparent", tp), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
    ) == (
        ("traceparent", tp.decode()),
        ("tracestate", "a=1,b=2"),
    )
    # What gRPC metadata cannot carry is left out, never a failed Check; two are none.
    assert trace_context([(b"traceparent", b"00-\x01")]) is None
    assert trace_context([(b"traceparent", tp), (b"tracestate", b"\xff")]) == (
        ("traceparent", tp.decode()),
    )
    assert trace_context([(b"traceparent", tp), (b"traceparent", tp)]) is None


def test_the_otlp_protos_are_opentelemetry_protos_own() -> None:
    """xds-protos ships an older copy of opentelemetry's protos in the same folder; installed
    after opentelemetry-proto it overwrites them and the OTLP exporter cannot import
    (`make setup` reinstalls opentelemetry-proto last: see the Makefile)."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope"), common_pb2.__file__
