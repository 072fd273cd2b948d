"""LinkHub: the hub's end of the link, an ASGI app (a Socket.IO server) any hub can mount or
serve on its own listener (listener.py), and `forward()`, which sends one request down the
link of the connector serving its data source.

How a connection lives (docs/link.md has the picture):

1. A connector connects with Socket.IO `auth={"token": <access token>, "data_sources":
   [...]}`. The hub asks policyd `connector.attach` for those data sources (authorize.py):
   denied, the connection is refused with the reason name; allowed, the connection serves
   them, under the token's client_id (the connector id).
   A connector that announced some data sources it does not serve
   (DATA_SOURCE_NOT_OWNED) is asked about each, and serves those it may. Once it serves,
   the hub tells the connector what it serves and what was refused (the `attached` event,
   wire.py), and again whenever policyd takes one of its data sources from it.
2. While it lives, the same question is asked every `recheck_seconds`: a deny closes it
   (a disabled connector's idle link is gone within a second); a data source taken from
   the connector is no longer served by it; the link stays for the others.
3. Before every forwarded request the question is asked for that request's data source
   alone: a deny is answered 503 and closes the link (or, DATA_SOURCE_NOT_OWNED, stops
   serving that data source over it).

When policyd cannot be asked (POLICYD_UNAVAILABLE: a deadline, a transport error), no
request is forwarded, but the link stays: a blip at policyd must not fail the other
requests in flight on it (a write among them would end with its outcome unknown).
4. `forward()` emits `request` to that one connection with an acknowledgement, which
   carries the answer. Pending requests are kept per connection: when it goes, each is
   failed at once (503). No answer within `timeout_seconds` is a 504. Nothing is ever
   sent twice: a request belongs to one connection, and a reconnect is a new connection
   (a write such as PUT .../snapshot must not be repeated).

Outcomes of `forward()`: a LinkResponse (the upstream's answer, whatever its status), or
LinkUnavailable (503: no connector online, link lost, connector refused) or LinkTimeout
(504), each with a JSON body (`LinkError.response()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import socketio

from adapters.link.authorize import UNAVAILABLE, Authorizer, Verdict
from adapters.link.wire import (
    ATTACHED_EVENT,
    NAMESPACE,
    REQUEST_EVENT,
    SOCKETIO_PATH,
    TOKEN_EVENT,
    TRANSPORTS,
    Headers,
    LinkRequest,
    LinkResponse,
)

log = logging.getLogger("adapters.link")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_DATA_SOURCES = 1000
MAX_NAME = 200


class LinkError(Exception):
    """A forwarded request that got no answer from a connector."""

    status = 502
    error = "connector_error"

    def __init__(self, data_source: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.data_source = data_source
        self.message = message
        self.reason = reason

    def response(self) -> LinkResponse:
        doc = {"error": self.error, "message": self.message, "data_source": self.data_source}
        if self.reason:
            doc["reason"] = self.reason
        return LinkResponse(
            self.status, [("content-type", "application/json")], json.dumps(doc).encode()
        )


class LinkUnavailable(LinkError):
    """503: no connector online for the data source, its link went, or policyd refused it."""

    status = 503
    error = "connector_unavailable"


class LinkTimeout(LinkError):
    """504: the connector did not answer in time."""

    status = 504
    error = "connector_timeout"


class LinkBadAnswer(LinkError):
    """502: the connector's answer was not an answer."""


@dataclass(eq=False)
class Connection:
    """One live link: the connector behind it, what it serves, its pending requests."""

    sid: str
    connector_id: str
    token: str = field(repr=False)
    data_sources: tuple[str, ...] = ()
    since: float = 0.0
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    watch: asyncio.Task[None] | None = None
    serving: bool = False
    # Data sources it announced that policyd refused it (name -> reason), told to it.
    refused: dict[str, str] = field(default_factory=dict)


class LinkHub:
    """The hub's link listener (an ASGI app: `await hub(scope, receive, send)`) and
    `forward()`. Owns its authorizer (closed by `close()`)."""

    def __init__(
        self,
        authorizer: Authorizer,
        *,
        timeout_seconds: float = 10.0,
        recheck_seconds: float = 0.5,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        transports: Sequence[str] = TRANSPORTS,
        allow_insecure: bool = False,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        if not timeout_seconds > 0 or not recheck_seconds > 0:
            raise ValueError("timeout_seconds and recheck_seconds must be above 0")
        if not transports or not set(transports) <= set(TRANSPORTS):
            raise ValueError(f"transports must be some of {', '.join(TRANSPORTS)}")
        self.authorizer = authorizer
        self.timeout_seconds = timeout_seconds
        self.recheck_seconds = recheck_seconds
        # Plain HTTP/WS is refused unless this is set (development and tests only).
        self.allow_insecure = allow_insecure
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            transports=list(transports),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_http_buffer_size=max_message_bytes,
            logger=False,
            engineio_logger=False,
        )
        self.sio.on("connect", self._on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self._on_disconnect, namespace=NAMESPACE)
        self.sio.on(TOKEN_EVENT, self._on_token, namespace=NAMESPACE)
        self.app = socketio.ASGIApp(self.sio, socketio_path=SOCKETIO_PATH)
        self.connections: dict[str, Connection] = {}
        self._ids = itertools.count(1)
        # Why policyd refused the last link that served a data source (a reason name), until
        # a link serves it again: the 503 of "no connector online" says so.
        self._refusals: dict[str, str] = {}
        # Tasks closing links, kept until done (the loop keeps only weak references).
        self._closing: set[asyncio.Task[None]] = set()

    # -- the ASGI app -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plaintext = scope.get("scheme") not in ("https", "wss")
        if scope["type"] in ("http", "websocket") and plaintext and not self.allow_insecure:
            await _refuse_plaintext(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # -- what is online -----------------------------------------------------------------

    def serving(self, data_source: str) -> Connection | None:
        """The connection serving `data_source`: the newest, when a connector reconnected
        before its old link was found dead."""
        found = [
            c
            for c in list(self.connections.values())
            if c.serving and data_source in c.data_sources and self._alive(c)
        ]
        return max(found, key=lambda c: c.since) if found else None

    def _alive(self, conn: Connection) -> bool:
        """Whether `conn` is still registered and still a session of the Socket.IO server.
        python-socketio calls no disconnect handler for a session that closed while its
        connect handler ran (a long-polling close while policyd was asked): such a link is
        forgotten here, the first time anyone looks."""
        if self.connections.get(conn.sid) is not conn:
            return False
        if self.sio.get_environ(conn.sid, namespace=NAMESPACE) is None:
            self._forget(conn, "the connector's link was lost")
            return False
        return True

    def online(self) -> list[dict[str, Any]]:
        """The serving links: connector, data sources, transport (polling or websocket)."""
        return [
            {
                "connector_id": c.connector_id,
                "data_sources": list(c.data_sources),
                "transport": self.sio.transport(c.sid, namespace=NAMESPACE),
            }
            for c in list(self.connections.values())
            if c.serving and self._alive(c)
        ]

    # -- forwarding ---------------------------------------------------------------------

    async def forward(
        self,
        data_source: str,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        request_id: str = "",
    ) -> LinkResponse:
        """Send one request to the connector serving `data_source`; its answer, or raise
        LinkUnavailable (503) or LinkTimeout (504). Sent at most once."""
        request_id = request_id or str(uuid.uuid4())
        conn = self.serving(data_source)
        if conn is None:
            refused = self._refusals.get(data_source, "")
            raise LinkUnavailable(
                data_source,
                f"no connector is online for data source {data_source!r}"
                + (f" (policyd refused the last one: {refused})" if refused else ""),
                refused,
            )
        verdict = await self.authorizer.check(conn.token, [data_source], request_id)
        if not verdict.allowed:
            if verdict.reason == UNAVAILABLE:
                raise LinkUnavailable(
                    data_source,
                    "policyd could not be asked whether the connector may serve"
                    f" data source {data_source!r}",
                    verdict.reason,
                )
            await self._refused(conn, (data_source,), verdict)
            raise LinkUnavailable(
                data_source,
                f"the connector for data source {data_source!r} was refused by policyd",
                verdict.reason,
            )
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        key = next(self._ids)
        conn.pending[key] = answer
        try:
            if not self._alive(conn) or data_source not in conn.data_sources:
                # it went, or was refused by a recheck, while policyd was asked
                raise LinkUnavailable(data_source, "the connector's link was lost")

            def acknowledged(*args: Any) -> None:
                if not answer.done():
                    answer.set_result(args[0] if args else None)

            request = LinkRequest(request_id, data_source, method, path, query, headers, body)
            await self.sio.emit(REQUEST_EVENT, request.encode(), to=conn.sid, callback=acknowledged)
            try:
                data = await asyncio.wait_for(answer, self.timeout_seconds)
            except TimeoutError:
                raise LinkTimeout(
                    data_source,
                    f"the connector for data source {data_source!r} did not answer"
                    f" within {self.timeout_seconds:g} s",
                ) from None
        finally:
            conn.pending.pop(key, None)
        try:
            return LinkResponse.decode(data)
        except ValueError as exc:
            raise LinkBadAnswer(data_source, f"the connector's answer was invalid: {exc}") from None

    # -- Socket.IO events ---------------------------------------------------------------

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        # Even a connection that sent no token is put to policyd, so that its refusal
        # (TOKEN_MISSING, REQUEST_INVALID) is an audit record like every other.
        token, data_sources = _announcement(auth)
        verdict, serving = await self._may_serve(token, data_sources, f"link-attach-{sid}")
        if not serving:
            log.info("link: refused a connector for %s: %s", _names(data_sources), verdict.reason)
            raise socketio.exceptions.ConnectionRefusedError(verdict.reason)
        if len(serving) < len(data_sources):
            log.warning(
                "link: connector %s may not serve %s (DATA_SOURCE_NOT_OWNED)",
                verdict.connector_id,
                _names([d for d in data_sources if d not in serving]),
            )
        conn = Connection(sid, verdict.connector_id, token, serving, time.monotonic())
        conn.refused = {d: verdict.reason for d in data_sources if d not in serving}
        self.connections[sid] = conn
        # Served from the next turn of the loop on: after the hub's CONNECT answer is queued,
        # so that no request can overtake it.
        conn.watch = asyncio.get_running_loop().create_task(self._watch(conn))

    async def _may_serve(
        self, token: str, data_sources: tuple[str, ...], request_id: str
    ) -> tuple[Verdict, tuple[str, ...]]:
        """policyd's verdict on all of `data_sources`, and those the connector may serve:
        all, none, or (DATA_SOURCE_NOT_OWNED) those policyd allows one by one."""
        verdict = await self.authorizer.check(token, data_sources, request_id)
        if verdict.allowed:
            return verdict, data_sources
        if verdict.reason != "DATA_SOURCE_NOT_OWNED" or len(data_sources) < 2:
            return verdict, ()
        kept: list[str] = []
        for name in data_sources:
            one = await self.authorizer.check(token, [name], request_id)
            if one.allowed:
                kept.append(name)
            elif one.reason != "DATA_SOURCE_NOT_OWNED":
                return one, ()  # disabled, expired, unavailable: not a matter of this name
        return verdict, tuple(kept)

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self.connections.get(sid)
        if conn is not None:
            self._forget(conn, "the connector's link was lost")
            log.info("link: connector %s disconnected (%s)", conn.connector_id, reason)

    async def _on_token(self, sid: str, data: Any) -> dict[str, Any]:
        """A refreshed access token: kept if policyd allows it for the same connector and
        data sources; otherwise the link is closed (unless policyd could not be asked: the
        old token serves until the connector sends the new one again, or expires)."""
        conn = self.connections.get(sid)
        token = data.get("token") if isinstance(data, dict) else None
        if conn is None or not isinstance(token, str) or not token:
            return {"ok": False, "reason": "REQUEST_INVALID"}
        verdict = await self.authorizer.check(token, conn.data_sources, f"link-token-{sid}")
        if (
            verdict.reason == "DATA_SOURCE_NOT_OWNED"
            and len(conn.data_sources) > 1
            and await self._refused(conn, conn.data_sources, verdict, token)
        ):  # one data source was taken: the new token for those left
            verdict = await self.authorizer.check(token, conn.data_sources, f"link-token-{sid}")
        if verdict.allowed and verdict.connector_id == conn.connector_id:
            conn.token = token
            return {"ok": True, "reason": verdict.reason}
        if verdict.reason != UNAVAILABLE and self._alive(conn):
            task = asyncio.get_running_loop().create_task(
                self._drop(conn, f"its new token was refused: {verdict.reason}")
            )
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return {"ok": False, "reason": verdict.reason}

    async def _watch(self, conn: Connection) -> None:
        """Serve, and re-ask policyd every recheck_seconds while the link lives."""
        if not self._alive(conn):
            return
        conn.serving = True
        for name in conn.data_sources:
            self._refusals.pop(name, None)
        log.info(
            "link: connector %s connected, serving %s",
            conn.connector_id,
            _names(conn.data_sources),
        )
        await self._tell(conn)
        while True:
            await asyncio.sleep(self.recheck_seconds)
            if not self._alive(conn):
                return
            verdict = await self.authorizer.check(
                conn.token, conn.data_sources, f"link-recheck-{conn.sid}"
            )
            refused = not verdict.allowed and verdict.reason != UNAVAILABLE
            if refused and not await self._refused(conn, conn.data_sources, verdict):
                return

    async def _refused(
        self,
        conn: Connection,
        data_sources: tuple[str, ...],
        verdict: Verdict,
        token: str = "",
    ) -> bool:
        """policyd refused `conn` for `data_sources`: stop serving those it no longer owns
        (DATA_SOURCE_NOT_OWNED), else close the link. Whether the link stays. `token`: the
        one policyd refused (a renewed one; default the link's), which is the one asked
        about each data source: the link's may be about to expire, which is why it was
        renewed, and an expired one would close the link."""
        if verdict.reason == "DATA_SOURCE_NOT_OWNED":
            if len(data_sources) > 1:  # which of them? ask one by one
                each, kept = await self._may_serve(
                    token or conn.token, data_sources, f"link-recheck-{conn.sid}"
                )
                if each.reason == UNAVAILABLE:
                    return True  # not known which: nothing is forwarded unchecked; ask again
                if each.reason != "DATA_SOURCE_NOT_OWNED":
                    verdict = each  # disabled, expired...: about the connector, not a name
                    kept = ()
                gone = set(data_sources) - set(kept)
            else:
                gone = set(data_sources)
            left = tuple(d for d in conn.data_sources if d not in gone)
            if left and self._alive(conn):
                log.warning(
                    "link: connector %s no longer serves %s (DATA_SOURCE_NOT_OWNED)",
                    conn.connector_id,
                    _names(sorted(gone)),
                )
                conn.data_sources = left
                for name in gone:
                    self._refusals[name] = verdict.reason
                    conn.refused[name] = verdict.reason
                await self._tell(conn)
                return True
        for name in conn.data_sources:
            if not any(
                other is not conn and name in other.data_sources
                for other in self.connections.values()
            ):  # another link serving it speaks for it now
                self._refusals[name] = verdict.reason
        await self._drop(conn, f"policyd refused it for {_names(data_sources)}: {verdict.reason}")
        return False

    async def _tell(self, conn: Connection) -> None:
        """Tell the connector what it serves and what policyd refused it (its log says)."""
        doc = {"serving": list(conn.data_sources), "refused": dict(conn.refused)}
        with contextlib.suppress(Exception):  # a link going meanwhile: nothing to tell
            await self.sio.emit(ATTACHED_EVENT, doc, to=conn.sid, namespace=NAMESPACE)

    async def _drop(self, conn: Connection, why: str) -> None:
        """Close a link: no new request reaches it, its pending ones fail now."""
        if self.connections.get(conn.sid) is not conn:
            return
        log.warning("link: closing connector %s's link: %s", conn.connector_id, why)
        self._forget(conn, f"the connector's link was closed: {why}")
        await self.sio.disconnect(conn.sid, namespace=NAMESPACE)

    def _forget(self, conn: Connection, why: str) -> None:
        self.connections.pop(conn.sid, None)
        conn.serving = False
        for answer in conn.pending.values():
            if not answer.done():
                answer.set_exception(LinkUnavailable(",".join(conn.data_sources), why))
        conn.pending.clear()
        if conn.watch is not None and conn.watch is not asyncio.current_task():
            conn.watch.cancel()

    async def close(self) -> None:
        """Close every link and the authorizer."""
        watches = [c.watch for c in self.connections.values() if c.watch is not None]
        for conn in list(self.connections.values()):
            self._forget(conn, "the hub is stopping")
            with contextlib.suppress(Exception):  # best effort while stopping
                await self.sio.disconnect(conn.sid, namespace=NAMESPACE)
        # The watches (cancelled by _forget) and any link still closing end first.
        await asyncio.gather(*watches, *self._closing, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.sio.shutdown()  # Engine.IO's service task
        await self.authorizer.close()


def _announcement(auth: Any) -> tuple[str, tuple[str, ...]]:
    """The token and data sources a connector sent when connecting; what is missing or
    malformed is left empty, for policyd to refuse (TOKEN_MISSING, REQUEST_INVALID) and
    audit."""
    if not isinstance(auth, dict):
        return "", ()
    token, names = auth.get("token"), auth.get("data_sources")
    if not isinstance(token, str):
        token = ""
    if (
        not isinstance(names, list)
        or not 0 < len(names) <= MAX_DATA_SOURCES
        or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in names)
    ):
        return token, ()
    return token, tuple(dict.fromkeys(names))


def _names(names: Sequence[str], shown: int = 5) -> str:
    """Data-source names for a log line: a few, quoted (they may come from an
    unauthenticated peer), and how many more."""
    text = ",".join(repr(n[:MAX_NAME]) for n in names[:shown])
    return f"{text} and {len(names) - shown} more" if len(names) > shown else text or "nothing"


async def _refuse_plaintext(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(
        {"error": "tls_required", "message": "the link is served over TLS only"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
