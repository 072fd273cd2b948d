"""Envoy's ext_authz over HTTP (`http_service`): a small HTTP/1.1 keep-alive door.

The gRPC door (envoy_servicer.py) costs more CPU in grpcio's HTTP/2 stack, and in Envoy's gRPC
client, than the decision itself (docs/benchmarks.md). In `http_service` mode Envoy sends
the check as a plain HTTP/1.1 request instead: the original method, `path_prefix` + the
original path (with its query), the headers of `allowed_headers` (`authorization`,
`x-request-id`, and every `x-policyd-*` / `x-auth-*` header, so they can be removed), and
the buffered body when the route sets `with_request_body`. This door answers:

* allow: 200 with the identity headers of servicer.allow (`x-policyd-*`; Envoy copies them
  upstream, overwriting, via `allowed_upstream_headers`) and
  `x-envoy-auth-headers-to-remove` naming every other `x-policyd-*` / `x-auth-*` header the
  client sent (and `authorization` with `envoy.remove_authorization`);
* deny: the status, headers and JSON body of policyd/doors/denials.py (Envoy passes them to the
  client via `allowed_client_headers`).

It is only ever called by Envoy, and fails closed on anything else: HTTP/1.1 only,
Content-Length bodies only (any Transfer-Encoding, a repeated header, a bad Content-Length,
an oversized head or a target outside PATH_PREFIX is 400 and the connection is closed).
Requests arriving back to back on one connection are answered in order.

It is an asyncio Protocol on its own event loop and thread (`HttpDoor.start`); the
decision (~100 us of synchronous work) runs in the loop. Nothing here decides: it is a pure
translator around `Decider.check`, like the gRPC door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import uvloop

from policyd.core import net, tracing
from policyd.core.errors import ConfigError
from policyd.core.model import CheckInput, Decision, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.decider import Decider, Door
from policyd.doors.denials import Denial, body_too_large, for_reason
from policyd.doors.envoy_servicer import bearer_token, identity_headers
from policyd.doors.headers import IDENTITY_PREFIXES, selected

log = logging.getLogger(__name__)

# envoy-http.yaml's `http_service.path_prefix`: the door accepts only targets under it.
PATH_PREFIX = "/ext_authz"
MAX_HEAD_BYTES = 64 * 1024  # Envoy's own default limit for request headers is 60 KiB
MAX_BODY_BYTES = 1 << 20  # envoy-http.yaml's `max_request_bytes`
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Where a remembered allow's answer is split for its decision id (_Remembered).
_ID_MARK = "decision-id-goes-here"

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE_OK = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET_OK = re.compile(rb"/[\x21-\x7e]*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BadRequest(Exception):
    """The check request cannot be read unambiguously: 400, then close."""


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed check request."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    close: bool


def parse_head(head: bytes) -> tuple[str, str, dict[str, str], int, bool]:
    """Method, target, headers (lower-case names), Content-Length, close; or BadRequest."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        raise BadRequest("request line is not METHOD TARGET HTTP/1.1")
    method, target = parts[0], parts[1]
    if not _TOKEN.fullmatch(method) or method == b"CONNECT":
        raise BadRequest("bad method")
    if not _TARGET_OK.fullmatch(target):
        raise BadRequest("bad request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also obs-fold, spaces before ':'
            raise BadRequest("bad header line")
        value = value.strip(b" \t")
        if not _VALUE_OK.fullmatch(value):  # bare CR or LF, NUL, controls
            raise BadRequest("bad header value")
        key = name.decode("ascii").lower()
        if key in headers:
            raise BadRequest(f"repeated header {key}")
        headers[key] = value.decode("latin-1")
    if "transfer-encoding" in headers:
        raise BadRequest("transfer-encoding is not accepted")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 12:
        raise BadRequest("bad content-length")
    close = headers.get("connection", "").lower() == "close"
    return method.decode("ascii"), target.decode("ascii"), headers, int(length_text), close


def to_input(request: Request) -> CheckInput:
    """The check: path and query from the target under PATH_PREFIX, token, request id."""
    full = request.target[len(PATH_PREFIX) :]
    path, _, query = full.partition("?")
    headers = request.headers
    return CheckInput(
        bearer_token(headers),
        HttpTarget(request.method, path, query, selected(headers), request.body),
        headers.get("x-request-id", ""),
        "envoy",
    )


def _head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def allow(decision: Decision, sent: Iterable[str], remove_authorization: bool) -> bytes:
    """200 with the identity headers, and the client's other identity headers to remove."""
    values = identity_headers(decision)
    for _, value in values:
        if not _VALUE_OK.fullmatch(value.encode("utf-8")):
            # A value that cannot be a header (CR, LF, controls): refuse, never split it.
            raise ValueError("an identity value is not a valid header value")
    ours = {key for key, _ in values}
    remove = [n for n in sent if n.startswith(IDENTITY_PREFIXES) and n not in ours]
    if remove_authorization:
        remove.append("authorization")
    values.append(("content-length", "0"))
    if remove:
        values.append((REMOVE_HEADER, ", ".join(remove)))
    return _head(200, values)


def deny(denial: Denial, method: str) -> bytes:
    """The deny answer: status, content-type, challenge, Retry-After and the JSON body."""
    headers = [(k.decode(), v.decode()) for k, v in denial.headers()]
    head = _head(denial.status, headers)
    return head if method == "HEAD" else head + denial.body()


def bad_request(detail: str) -> bytes:
    denial = Denial(400, "invalid_request", Reason.REQUEST_INVALID.name, detail)
    return _head(400, [(k.decode(), v.decode()) for k, v in denial.headers()]) + denial.body()


class DoorProtocol(asyncio.Protocol):
    """One connection from Envoy: read a request, decide, answer; keep the connection."""

    def __init__(self, door: HttpDoor) -> None:
        self.door = door
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # The request whose body is still arriving: (method, target, headers, length, close).
        self.pending: tuple[str, str, dict[str, str], int, bool] | None = None
        self.body_at = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, but has its
        # methods: write, close, is_closing).
        self.transport = cast(asyncio.Transport, transport)
        self.door.connections.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.door.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        transport = self.transport
        while transport is not None and not transport.is_closing():
            if self.pending is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        self._fail("request head too large")
                    return
                if end > MAX_HEAD_BYTES:
                    self._fail("request head too large")
                    return
                try:
                    self.pending = parse_head(bytes(self.buffer[:end]))
                except BadRequest as exc:
                    self._fail(str(exc))
                    return
                self.body_at = end + 4
                length = self.pending[3]
                if length > self.door.max_body_bytes:
                    transport.write(deny(body_too_large(self.door.max_body_bytes), "POST"))
                    transport.close()
                    return
            method, target, headers, length, close = self.pending
            if len(self.buffer) < self.body_at + length:
                return
            body = bytes(self.buffer[self.body_at : self.body_at + length])
            del self.buffer[: self.body_at + length]
            self.pending = None
            if not target.startswith(PATH_PREFIX + "/"):
                self._fail(f"target outside {PATH_PREFIX}")
                return
            transport.write(self.door.answer(Request(method, target, headers, body, close)))
            if close:
                transport.close()

    def _fail(self, detail: str) -> None:
        log.warning("envoy http door: 400 and close: %s", detail)
        if self.transport is not None:
            self.transport.write(bad_request(detail))
            self.transport.close()


KEY = "envoy.http_address"


def _bind(address: str, reuse_port: bool) -> socket.socket:
    if address.startswith(net.UNIX_PREFIX):
        return _bind_unix(address[len(net.UNIX_PREFIX) :], address)
    sock = net.listen(KEY, address, backlog=512, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _bind_unix(path: str, address: str) -> socket.socket:
    """A Unix socket at `path` (mode 0660: Envoy's user needs its group). A socket file
    left by a server that is gone is replaced; one a live server listens on is not."""
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{KEY}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)  # a live server whose backlog is full: in use, not stale
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nothing listens: left by a server that ended
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except TimeoutError:
            raise net.AddressInUse(KEY, address) from None
        except OSError as exc:  # e.g. not ours to use: leave it alone
            raise ConfigError(f"{KEY}: cannot use {address}: {exc.strerror or exc}") from None
        else:
            raise net.AddressInUse(KEY, address)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{KEY}: cannot listen on {address}: {exc.strerror}") from None
    return sock


class _Remembered(Door[tuple[bytes, bytes], bytes]):
    """A remembered allow's answer, made once and split where its decision id goes."""

    def __init__(self, remove_authorization: bool) -> None:
        super().__init__()
        self.remove_authorization = remove_authorization

    def form(self, decision: Decision) -> tuple[bytes, bytes] | None:
        marked = decision._replace(decision_id=_ID_MARK)
        try:
            head, tail = allow(marked, (), self.remove_authorization).split(_ID_MARK.encode())
        except ValueError:
            return None  # each repeat rendered in full: a 500 (HttpDoor.answer)
        return head, tail

    def render_form(self, form: tuple[bytes, bytes], decision_id: str) -> bytes:
        return form[0] + decision_id.encode() + form[1]


class HttpDoor:
    """The door's socket (bound at construction), event loop and thread."""

    def __init__(
        self,
        decider: Decider,
        address: str,
        *,
        remove_authorization: bool = False,
        max_body_bytes: int = MAX_BODY_BYTES,
        reuse_port: bool = False,
    ) -> None:
        self.decider = decider
        self.address = address
        self.remove_authorization = remove_authorization
        self._door = _Remembered(remove_authorization)
        self.max_body_bytes = max_body_bytes
        self.sock = _bind(address, reuse_port)
        # The TCP port (0 for a Unix socket: `unix_path` instead).
        self.unix_path = (
            address[len(net.UNIX_PREFIX) :] if address.startswith(net.UNIX_PREFIX) else ""
        )
        # The socket file this door made (device, inode): stop() removes only that one, not
        # one a newer server has put at the same path meanwhile.
        self._unix_file = _file_id(self.unix_path) if self.unix_path else None
        self.port: int = 0 if self.unix_path else self.sock.getsockname()[1]
        self.connections: set[asyncio.Transport] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="envoy-http-door", daemon=True)

    def answer(self, request: Request) -> bytes:
        started = time.perf_counter_ns()
        check = to_input(request)
        sent = request.headers
        method = request.method
        remove_authorization = self.remove_authorization

        def render(decision: Decision) -> bytes:
            if not decision.allowed:
                denial = for_reason(decision.reason, decision.message, decision.decision_id)
                return deny(denial, method)
            try:
                return allow(decision, sent, remove_authorization)
            except ValueError as exc:
                log.error(
                    "decision %s answered 500: %s",
                    decision.decision_id,
                    exc,
                    extra={"decision_id": decision.decision_id},
                )
                denial = Denial(
                    500, "server_error", Reason.INTERNAL_ERROR.name, str(exc), decision.decision_id
                )
                return deny(denial, method)

        # A client that sent identity headers of its own gets an answer naming them for
        # removal: not the remembered one.
        return self.decider.answer_input(
            self._door,
            render,
            check,
            started,
            remembered=not any(name.startswith(IDENTITY_PREFIXES) for name in sent),
            label="envoy_http",
            traceparent=sent.get("traceparent", "") if tracing.current is not None else "",
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = uvloop.new_event_loop()  # libuv: about a third less CPU per request here
        self.loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_server(lambda: DoorProtocol(self), sock=self.sock)
            )
            self._ready.set()
            loop.run_forever()
        finally:
            self._ready.set()
            loop.close()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self.connections):
            transport.close()
        assert self.loop is not None
        self.loop.call_soon(self.loop.stop)

    def stop(self) -> None:
        """Stop accepting, close the connections (no request is ever half-answered: each
        is answered within one loop step), stop the loop."""
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(timeout=5)
        else:
            self.sock.close()
        if self.unix_path and _file_id(self.unix_path) == self._unix_file:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
