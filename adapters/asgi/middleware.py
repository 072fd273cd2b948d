"""PolicydMiddleware: pure ASGI middleware that asks policyd before the app runs.

For each HTTP request and each websocket handshake it sends policyd one `Check` over a
long-lived grpc.aio channel, with a deadline. On allow the app runs with `scope["auth"]`
set to an `AuthInfo`; on deny the middleware answers itself (401/403 with an RFC 6750
challenge and a JSON body, see denials.py) and the app never runs; when policyd cannot be
asked in time the answer is 503 (fail closed). Lifespan passes through.

What policyd is told: the method, the raw (still percent-encoded) path, the query string, a
few headers (never Authorization or Cookie) and, for POST/PUT/PATCH with a JSON content
type, the body. The body is read fully (at most `max_body_bytes`, else 413 without asking)
and the app then receives exactly those bytes. Headers a client could use to pose as
someone (`x-policyd-*`, `x-auth-*`, `x-forwarded-user`, ...) are removed before the app
sees the request: the app's only source of identity is `scope["auth"]`.

With `metrics`, it also counts its calls to policyd, the calls that failed and the answers
it gave itself (adapters/asgi/metrics.py, docs/metrics.md).

Embedded mode (`embedded=`, an `InProcess` such as adapters.embedded.EmbeddedPolicyd):
the same request is decided in this process instead of over gRPC (docs/asgi.md, "Embedded
mode"); everything else here is the same. This module imports none of it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast
from urllib.parse import quote, quote_from_bytes

import grpc.aio

from adapters.asgi.channel import ChannelSettings, open_channel
from adapters.asgi.metrics import CLIENT_ERROR, MiddlewareMetrics, metrics_in
from policyd.core.ids import new_request_id
from policyd.core.reasons import Reason
from policyd.doors.denials import Denial, ambiguous_authorization, body_too_large, for_reason
from policyd.doors.denials import unavailable as unavailable_denial
from policyd.doors.headers import FORWARD_HEADERS, IDENTITY_PREFIXES, NEVER_FORWARD
from policyd.doors.rfc6750 import AmbiguousAuthorization, bearer_token
from policyd.gen.v1 import decision_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_Check = grpc.aio.UnaryUnaryMultiCallable[decision_pb2.CheckRequest, decision_pb2.CheckResponse]
Metadata = tuple[tuple[str, str], ...]

log = logging.getLogger("adapters.asgi")

CHECK_METHOD = "/policyd.v1.Decision/Check"
DOOR = "asgi"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Headers policyd is told about (lower-case), as at every door (policyd/doors/headers.py).
DEFAULT_FORWARD_HEADERS = FORWARD_HEADERS
# Headers removed before the app sees the request: identity a client could make up.
STRIP_HEADER_PREFIXES = IDENTITY_PREFIXES
STRIP_HEADERS = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-remote-user",
        "remote-user",
        "x-user",
        "x-user-id",
        "x-client-id",
    }
)
# Embedded mode: requests whose reading is kept (_http_here); all dropped at this many.
# Each entry holds the request's header bytes (a token and a few headers: about 1-2 KB)
# and the key of its last body, with that body when small (adapters/embedded: 4 KiB).
ASKED_REQUESTS = 1024
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
# A trace context header gRPC metadata can carry.
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]{1,512}")
# Characters of a decoded path that stay as they are when no raw_path is given.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """Who the allowed request is for, as policyd decided; `scope["auth"]` of the app.

    On a public route (no token needed) sub, client_id and scopes are empty.
    data_sources are those the request touches, or for a listing action those granted.
    """

    sub: str
    client_id: str
    scopes: tuple[str, ...]
    data_sources: tuple[str, ...]
    decision_id: str
    rule_id: str
    action: str

    @classmethod
    def from_response(cls, r: decision_pb2.CheckResponse) -> AuthInfo:
        p = r.principal
        return cls(
            sub=p.sub,
            client_id=p.client_id,
            scopes=tuple(p.scopes),
            data_sources=tuple(r.data_sources),
            decision_id=r.decision_id,
            rule_id=r.rule_id,
            action=r.action,
        )


Answer = tuple[AuthInfo | None, Denial | None]


class InProcess(Protocol):
    """What decides in this process in embedded mode (adapters.embedded.EmbeddedPolicyd):
    started at lifespan startup (or by the first request), stopped at lifespan shutdown."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check_http(
        self,
        token: str,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        request_id: str,
        traceparent: str = "",
        memo: list[Any] | None = None,
        per_iteration: bool = False,
    ) -> Answer: ...


class _Asked(NamedTuple):
    """What a request's bytes make, for policyd (embedded mode keeps it: _http_here)."""

    token: str
    path: str  # as received, still percent-encoded
    query: str
    forwarded: dict[str, str]  # the headers policyd is told about (never changed)
    json_body: bool  # a POST, PUT or PATCH with a JSON body: read, and sent to policyd
    app_headers: list[tuple[bytes, bytes]]  # what the app is given (_app_headers): copied
    memo: list[Any]  # what the embedded policyd keeps of these (its check_http's `memo`)


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class PolicydMiddleware:
    """Ask policyd before every HTTP request and websocket handshake reaches `app`."""

    def __init__(
        self,
        app: ASGIApp,
        target: str = "127.0.0.1:50051",
        *,
        timeout_seconds: float = 0.25,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        server_name: str = "",
        max_body_bytes: int = 1 << 20,
        forward_headers: Iterable[str] = DEFAULT_FORWARD_HEADERS,
        strip_header_prefixes: Iterable[str] = STRIP_HEADER_PREFIXES,
        strip_headers: Iterable[str] = STRIP_HEADERS,
        metrics: bool | CollectorRegistry = False,
        embedded: InProcess | None = None,
        per_iteration: bool = True,
    ) -> None:
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be above 0, not {timeout_seconds}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be at least 0, not {max_body_bytes}")
        self.app = app
        self.channel_settings = ChannelSettings(target, ca_file, cert_file, key_file, server_name)
        self.channel_settings.validate()
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes
        self.forward_headers = frozenset(h.lower() for h in forward_headers) - NEVER_FORWARD
        self.strip_header_prefixes = tuple(p.lower().encode() for p in strip_header_prefixes)
        self.strip_headers = frozenset(h.lower().encode() for h in strip_headers)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check: _Check | None = None
        # Embedded mode: decide in this process (target and the TLS options unused).
        self.embedded = embedded
        # Embedded mode: the server starts each request as a task of its own after reading
        # it (every ASGI server does), so one store check serves a loop iteration's
        # remembered allows (EmbeddedPolicyd.check_http; docs/asgi.md). False: one each.
        self.per_iteration = per_iteration
        # Embedded mode: what a request's bytes made, by those bytes (_http_here).
        self._asked: dict[tuple[Any, ...], _Asked] = {}
        # Its own counters (adapters/asgi/metrics.py): True counts into prometheus_client's
        # default registry, a CollectorRegistry into that one.
        self._metrics: MiddlewareMetrics | None = None
        if metrics is not False:
            self._metrics = metrics_in(None if metrics is True else metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.embedded is not None:  # the same steps, in this process
                await self._http_here(scope, receive, send, scope["headers"])
            else:
                await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Close the channel to policyd, or stop the embedded one (done at lifespan
        shutdown)."""
        channel, self._channel, self._check, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close(None)
        if self.embedded is not None:
            await self.embedded.stop()

    # -- the doors ----------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            token = bearer_token(headers)
        except AmbiguousAuthorization:
            await self._respond(send, ambiguous_authorization())
            return
        method: str = scope["method"]
        body = b""
        app_receive = receive
        if method in BODY_METHODS and _is_json(headers):
            read = await self._body(headers, receive, send)
            if read is None:
                return
            body, app_receive = read
        auth, denial = await self._decide(
            check_request(scope, token, method, body, self.forward_headers),
            trace_context(headers),
        )
        if denial is not None:
            await self._respond(send, denial)
            return
        await self.app(self._app_scope(scope, auth), app_receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            token = bearer_token(headers)
            if self.embedded is not None:
                auth, denial = await self._decide_here(scope, token, "GET", b"")
            else:
                auth, denial = await self._decide(
                    check_request(scope, token, "GET", b"", self.forward_headers),
                    trace_context(headers),
                )
        except AmbiguousAuthorization:
            auth, denial = None, ambiguous_authorization()
        if denial is None:
            await self.app(self._app_scope(scope, auth), receive, send)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        m = self._metrics
        if "websocket.http.response" in (scope.get("extensions") or {}):
            if m is not None:
                m.answered(denial.status)
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": denial.status,
                    "headers": denial.headers(),
                }
            )
            await send({"type": "websocket.http.response.body", "body": denial.body()})
        else:
            # Closing before accepting makes the server refuse the handshake with 403.
            if m is not None:
                m.answered(403)
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.embedded is not None:
                    # Raised into the app's startup: the server reports it and does not
                    # serve (a hub that cannot decide must not start).
                    await self.embedded.start()
                    return message
                try:
                    self._connect()  # start connecting now, not on the first request
                except Exception:
                    log.exception("cannot open the channel to policyd")
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    # -- asking policyd -----------------------------------------------------------------

    def _connect(self) -> _Check:
        """The Check callable on a channel of the running loop (one channel per loop)."""
        loop = asyncio.get_running_loop()
        if self._check is None or self._loop is not loop:
            self._channel = open_channel(self.channel_settings)
            self._channel.get_state(try_to_connect=True)
            self._loop = loop
            self._check = cast(
                _Check,
                self._channel.unary_unary(
                    CHECK_METHOD,
                    request_serializer=decision_pb2.CheckRequest.SerializeToString,
                    response_deserializer=decision_pb2.CheckResponse.FromString,
                ),
            )
        return self._check

    async def _decide(
        self, request: decision_pb2.CheckRequest, metadata: Metadata | None = None
    ) -> tuple[AuthInfo | None, Denial | None]:
        m = self._metrics
        if m is not None:
            m.checks.inc()
        try:
            call = self._connect()
            response = await call(request, timeout=self.timeout_seconds, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            log.warning("policyd Check failed: %s %s", code.name, exc.details() or "")
            if m is not None:
                m.failed(code.name.lower())
            return None, unavailable_denial(code.name.lower())
        except Exception:
            log.exception("policyd Check failed")
            if m is not None:
                m.failed(CLIENT_ERROR)
            return None, unavailable_denial("client error")
        if response.allowed and int(response.reason) == Reason.ALLOWED.value:
            return AuthInfo.from_response(response), None
        return None, for_reason(response.reason, response.message, response.decision_id)

    async def _decide_here(
        self, scope: Scope, token: str, method: str, body: bytes
    ) -> tuple[AuthInfo | None, Denial | None]:
        """Embedded mode: the same request, decided in this process."""
        request_id, forwarded = request_headers(scope, self.forward_headers)
        context = trace_context(scope["headers"])
        return await self._check_here(
            token,
            method,
            _raw_path(scope),
            scope.get("query_string", b"").decode("latin-1"),
            forwarded,
            body,
            request_id or new_request_id(),
            context[0][1] if context else "",
        )

    async def _http_here(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Embedded mode: `_http`, the request decided in this process.

        What a request's bytes make (its token, path, query string, forwarded headers and
        whether its body is read) is kept by those bytes (`_asked`): a keep-alive client
        sends the same request again and again, and a repeat then skips reading its
        headers (a body is read and decided on every time; the embedded policyd keeps the
        request's key with the body it was made for, in `memo`). Only requests with no request
        id and no trace context are kept (each repeat gets a new request id, as without
        the memo): ones that carry them differ every time. A server that gives header
        items as lists (unhashable) or no raw_path is never kept."""
        method: str = scope["method"]
        raw_path = scope.get("raw_path")
        asked_key: tuple[Any, ...] | None = None
        asked: _Asked | None = None
        if raw_path:
            try:
                asked_key = (method, raw_path, scope.get("query_string", b""), tuple(headers))
                asked = self._asked.get(asked_key)
            except TypeError:
                asked_key = None
        if asked is not None:
            request_id, traceparent = new_request_id(), ""
        else:
            try:
                token = bearer_token(headers)
            except AmbiguousAuthorization:
                await self._respond(send, ambiguous_authorization())
                return
            request_id, forwarded = request_headers(scope, self.forward_headers)
            context = trace_context(headers)
            asked = _Asked(
                token,
                _raw_path(scope),
                scope.get("query_string", b"").decode("latin-1"),
                forwarded,
                method in BODY_METHODS and _is_json(headers),
                self._app_headers(headers),
                [],
            )
            if asked_key is not None and not request_id and context is None:
                if len(self._asked) >= ASKED_REQUESTS:
                    self._asked.clear()
                self._asked[asked_key] = asked
            request_id = request_id or new_request_id()
            traceparent = context[0][1] if context else ""
        body = b""
        app_receive = receive
        if asked.json_body:
            read = await self._body(headers, receive, send)
            if read is None:
                return
            body, app_receive = read
        embedded = self.embedded
        assert embedded is not None
        try:
            auth, denial = await embedded.check_http(
                asked.token,
                method,
                asked.path,
                asked.query,
                asked.forwarded,
                body,
                request_id,
                traceparent,
                asked.memo,
                self.per_iteration,
            )
        except Exception:
            auth, denial = None, self._failed_here()
        if denial is not None:
            await self._respond(send, denial)
            return
        app_scope = dict(scope)
        app_scope["headers"] = asked.app_headers.copy()  # the app may change its copy
        app_scope["auth"] = auth
        await self.app(app_scope, app_receive, send)

    async def _check_here(
        self,
        token: str,
        method: str,
        path: str,
        query: str,
        forwarded: dict[str, str],
        body: bytes,
        request_id: str,
        traceparent: str,
    ) -> tuple[AuthInfo | None, Denial | None]:
        assert self.embedded is not None
        try:
            return await self.embedded.check_http(
                token, method, path, query, forwarded, body, request_id, traceparent
            )
        except Exception:
            return None, self._failed_here()

    def _failed_here(self) -> Denial:
        """(In an except block.) Embedded policyd raised: logged, counted, 503."""
        log.exception("embedded policyd failed")
        if self._metrics is not None:
            self._metrics.failed(CLIENT_ERROR)
        return unavailable_denial("embedded policyd failed")

    # -- the request --------------------------------------------------------------------

    async def _body(
        self, headers: list[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> tuple[bytes, Receive] | None:
        """The JSON body, read whole, and a receive that replays it to the app; None when
        the request was answered here (413) or its client went."""
        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLarge:
            await self._respond(send, body_too_large(self.max_body_bytes))
            return None
        except _Disconnected:
            return None
        return body, _Replay(body, receive)

    async def _read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
        """The whole body, refusing more than max_body_bytes (Content-Length first)."""
        limit = self.max_body_bytes
        for name, value in headers:
            if name.lower() == b"content-length":
                try:
                    if int(value) > limit:
                        raise _BodyTooLarge
                except ValueError:
                    pass  # the server has refused a bad Content-Length already
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _app_scope(self, scope: Scope, auth: AuthInfo | None) -> Scope:
        """A copy of scope for the app: identity headers removed, auth set."""
        app_scope = dict(scope)
        app_scope["headers"] = self._app_headers(scope["headers"])
        app_scope["auth"] = auth
        return app_scope

    def _app_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers without the identity headers a client could make up."""
        # Every request passes here: one loop, no call per header (a third less time).
        strip, prefixes = self.strip_headers, self.strip_header_prefixes
        kept = []
        for header in headers:
            name = header[0].lower()
            if not (name in strip or name.startswith(prefixes)):
                kept.append(header)
        return kept

    async def _respond(self, send: Send, denial: Denial) -> None:
        """Answer the request in the app's stead."""
        m = self._metrics
        if m is not None:
            m.answered(denial.status)
        await _respond(send, denial)


def check_request(
    scope: Scope, token: str, method: str, body: bytes, forward_headers: frozenset[str]
) -> decision_pb2.CheckRequest:
    """The Check request describing this HTTP request or websocket handshake."""
    request_id, forwarded = request_headers(scope, forward_headers)
    request = decision_pb2.CheckRequest(
        token=token, request_id=request_id or new_request_id(), door=DOOR
    )
    http = request.http
    http.method = method
    http.path = _raw_path(scope)
    http.query = scope.get("query_string", b"").decode("latin-1")
    http.headers.update(forwarded)
    http.body = body
    return request


def request_headers(scope: Scope, forward_headers: frozenset[str]) -> tuple[str, dict[str, str]]:
    """The request's id (its `x-request-id` when valid, else "") and the headers policyd
    is told about, repeated ones joined with ", " (never those of NEVER_FORWARD)."""
    forwarded: dict[str, str] = {}
    request_id = ""
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        if name == "x-request-id" and not request_id:
            value = raw_value.decode("latin-1")
            request_id = value if _REQUEST_ID.fullmatch(value) else ""
        if name in forward_headers and name not in NEVER_FORWARD:
            value = raw_value.decode("latin-1")
            forwarded[name] = f"{forwarded[name]}, {value}" if name in forwarded else value
    return request_id, forwarded


def trace_context(headers: list[tuple[bytes, bytes]]) -> Metadata | None:
    """The request's W3C trace context (`traceparent`, and `tracestate` with it) as gRPC
    metadata for the Check, so that policyd's decision span (docs/tracing.md) continues the
    caller's trace; None when it came without one. A value gRPC metadata cannot carry
    (not visible ASCII, or over 512 bytes) is left out, never a failed Check."""
    traceparent: bytes | None = None
    tracestate = b""
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"traceparent":
            # Two are none: which trace the request belongs to cannot be told.
            traceparent = value if traceparent is None else b""
        elif len(name) == 10 and name.lower() == b"tracestate":
            tracestate = tracestate + b"," + value if tracestate else value
    if traceparent is None or not _METADATA_VALUE.fullmatch(traceparent):
        return None
    if _METADATA_VALUE.fullmatch(tracestate):
        return (("traceparent", traceparent.decode()), ("tracestate", tracestate.decode()))
    return (("traceparent", traceparent.decode()),)


class _Replay:
    """A receive() that hands the app the buffered body once, then the server's messages."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return False


def _raw_path(scope: Scope) -> str:
    """The path as received, still percent-encoded; policyd decodes it strictly."""
    raw: bytes | None = scope.get("raw_path")
    if raw:
        raw = raw.split(b"?", 1)[0]
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return quote_from_bytes(raw, safe=_PRINTABLE_ASCII)
    # No raw_path (an older server): re-encode the decoded path. An encoded '/' is lost
    # here; servers that matter (uvicorn, hypercorn, daphne) all give raw_path.
    return quote(scope["path"], safe=_PATH_SAFE)


async def _respond(send: Send, denial: Denial) -> None:
    await send(
        {"type": "http.response.start", "status": denial.status, "headers": denial.headers()}
    )
    await send({"type": "http.response.body", "body": denial.body()})
