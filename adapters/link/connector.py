"""`policyd-connector --config FILE`: serve a plant's data sources to the hub over the link.

It dials out to the hub's link listener (no inbound port at the plant), proves who it is
with an OAuth client-credentials access token (RFC 6749 §4.4) from policyd's
authorization server, and announces the data sources it serves. For each request the hub
sends down the link, it replays the HTTP request against that data source's local upstream
(`[sources.NAME] url`) and returns the answer. Reconnects by itself with capped
exponential back-off and jitter; refreshes its token before it expires. Logs connected,
disconnected and refused (with the reason), never a token or a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import random
import signal
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import socketio
from yarl import URL

from adapters.link.authorize import UNAVAILABLE
from adapters.link.config import (
    LINK_MESSAGE_BYTES,
    ConfigError,
    ConnectorConfig,
    load,
    ssl_context,
)
from adapters.link.wire import (
    ATTACHED_EVENT,
    NAMESPACE,
    REQUEST_EVENT,
    SOCKETIO_PATH,
    TOKEN_EVENT,
    LinkRequest,
    LinkResponse,
    request_headers,
    response_headers,
)

log = logging.getLogger("policyd.connector")

# Refresh the token when this share of its lifetime has passed.
REFRESH_AT = 0.75
# How soon a renewed token is sent to the hub again when policyd could not be asked.
RETRY_TOKEN_SECONDS = 0.5
CHUNK_BYTES = 64 << 10


class TokenError(Exception):
    pass


def _tls_words(exc: BaseException | str) -> str:
    """What went wrong, in one line; an untrusted certificate said plainly."""
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__ or exc.__context__
        if cause is not None:
            text += f" ({type(cause).__name__}: {cause})"
    else:
        text = exc
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "the server's TLS certificate is not trusted (check ca_file)"
    return text[:300]


class AnswerTooLarge(Exception):
    pass


def backoff(first: float, cap: float, jitter: float) -> Iterator[float]:
    """Delays: doubling from `first`, capped at `cap`, each moved by up to ±jitter seconds
    (as Socket.IO's own reconnection does)."""
    delay = first
    while True:
        yield max(0.0, min(delay, cap) + jitter * (2 * random.random() - 1))
        delay *= 2


class TokenSource:
    """Client-credentials access tokens from policyd's token endpoint (client_secret_basic)."""

    def __init__(self, config: ConnectorConfig, tls: ssl.SSLContext) -> None:
        self.config = config
        self._http = httpx.AsyncClient(verify=tls, timeout=10.0)
        self._token = ""
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def refresh_at(self) -> float:
        return self._refresh_at

    async def current(self) -> str:
        """A token to present: a new one once the current one is due for renewal, or the
        current one while it lives if the token endpoint refuses or cannot be reached (the
        hub asks policyd about it either way, which says why it is refused if it is)."""
        async with self._lock:
            if not self._token or time.monotonic() >= self._refresh_at:
                try:
                    await self._fetch()
                except TokenError as exc:
                    if time.monotonic() >= self._expires_at:
                        raise
                    log.warning("cannot get a new access token (%s); the current one lives", exc)
            return self._token

    async def renew(self) -> str:
        async with self._lock:
            await self._fetch()
            return self._token

    async def _fetch(self) -> None:
        c = self.config
        # RFC 6749 §2.3.1: both parts form-encoded before Basic.
        pair = f"{quote(c.client_id, safe='')}:{quote(c.client_secret, safe='')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
        # The token's lifetime is counted from before it was asked for: it cannot have
        # started earlier, so renewal is never timed late by the round trip.
        asked = time.monotonic()
        try:
            r = await self._http.post(
                c.token_url,
                data={"grant_type": "client_credentials"},
                headers={"Authorization": auth, "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise TokenError(f"cannot reach the token endpoint: {_tls_words(exc)}") from None
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        if r.status_code != 200 or not isinstance(doc, dict):
            error = doc.get("error", "") if isinstance(doc, dict) else ""
            raise TokenError(f"the token endpoint refused: {r.status_code} {error}".rstrip())
        token, expires_in = doc.get("access_token"), doc.get("expires_in", 300)
        if not isinstance(token, str) or not token or not isinstance(expires_in, int | float):
            raise TokenError("the token endpoint's answer has no access_token")
        self._token = token
        self._refresh_at = asked + max(0.5, float(expires_in) * REFRESH_AT)
        self._expires_at = asked + float(expires_in)

    async def close(self) -> None:
        await self._http.aclose()


class Connector:
    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.tls = ssl_context(config)
        self.tokens = TokenSource(config, self.tls)
        # Each data source's upstream URL, without its trailing slash: a request's path
        # (it starts with /) is appended as it came, already percent-encoded.
        self.upstreams = {name: url.rstrip("/") for name, url in config.sources.items()}
        # One client, keep-alive connections, for every upstream request. aiohttp rather
        # than httpx here: its request path costs a fraction of the CPU (docs/link.md,
        # "The connector's CPU"). No cookie jar (a cookie one app's request got must not
        # go along with the next app's), no redirects followed (the app gets the 3xx).
        self._upstream = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.request_timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        r = config.reconnect
        # Made in the running loop (the connector is built there); trusted CA, client cert.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls))
        self.sio = socketio.AsyncClient(
            http_session=self._http,
            reconnection=True,
            reconnection_attempts=0,
            # Ctrl-C and SIGTERM are ours (main): stop cleanly, no handler of its own.
            handle_sigint=False,
            reconnection_delay=r.delay_seconds,
            reconnection_delay_max=r.delay_max_seconds,
            randomization_factor=r.randomization_factor,
            logger=False,
            engineio_logger=False,
            websocket_extra_options={"max_msg_size": LINK_MESSAGE_BYTES},
        )
        self.sio.on("connect", self._on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self._on_disconnect, namespace=NAMESPACE)
        self.sio.on("connect_error", self._on_connect_error, namespace=NAMESPACE)
        self.sio.on(REQUEST_EVENT, self._on_request, namespace=NAMESPACE)
        self.sio.on(ATTACHED_EVENT, self._on_attached, namespace=NAMESPACE)

    # -- the link -----------------------------------------------------------------------

    async def _auth(self) -> dict[str, Any]:
        """Sent on every connect and reconnect: a current token and the data sources."""
        try:
            token = await self.tokens.current()
        except TokenError as exc:
            log.error("cannot get an access token: %s", exc)
            token = ""  # the hub refuses it (TOKEN_MISSING); the back-off goes on
        return {"token": token, "data_sources": list(self.config.sources)}

    async def _on_connect(self) -> None:
        log.info(
            "connected to %s (%s), serving %s",
            self.config.hub_url,
            self.sio.transport(),
            ",".join(self.config.sources),
        )

    async def _on_attached(self, data: Any) -> None:
        """What the hub serves over this link and what policyd refused it (of the data
        sources this connector announced: only its own names are logged)."""
        if not isinstance(data, dict):
            return
        ours = self.config.sources
        serving, refused = data.get("serving"), data.get("refused")
        served = (
            [n for n in serving if isinstance(n, str) and n in ours]
            if isinstance(serving, list)
            else []
        )
        refusals = (
            [f"{n}: {r}" for n, r in refused.items() if n in ours and isinstance(r, str)]
            if isinstance(refused, dict)
            else []
        )
        text = f"the hub serves {','.join(served) or 'nothing'}"
        if refusals:
            log.warning("%s; refused %s", text, ", ".join(r[:200] for r in refusals))
        else:
            log.info("%s", text)

    async def _on_disconnect(self, reason: Any = None) -> None:
        log.warning("disconnected from the hub (%s)", reason or "link lost")

    async def _on_connect_error(self, data: Any) -> None:
        if isinstance(data, dict) and "message" in data:
            log.error("refused by the hub: %s", data["message"])
        else:
            words = _tls_words(data if isinstance(data, BaseException) else str(data))
            log.error("cannot connect to the hub: %s", words)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect (and stay connected, reconnecting) until `stop` is set."""
        refresher = asyncio.get_running_loop().create_task(self._refresh(stop))
        r = self.config.reconnect
        delays = backoff(r.delay_seconds, r.delay_max_seconds, r.randomization_factor)
        try:
            while not stop.is_set():
                try:
                    await self.sio.connect(
                        self.config.hub_url,
                        auth=self._auth,
                        transports=list(self.config.transports),
                        socketio_path=SOCKETIO_PATH,
                        wait_timeout=10,
                    )
                except socketio.exceptions.ConnectionError:
                    pass  # logged by connect_error
                else:
                    delays = backoff(r.delay_seconds, r.delay_max_seconds, r.randomization_factor)
                    # Until stopped, or the link ends for good (the hub closed it: no
                    # automatic reconnection then); Socket.IO reconnects by itself otherwise.
                    # Shielded: cancelling a wait on sio.wait() would cancel Engine.IO's
                    # own read loop, which it awaits.
                    await _first(stop.wait(), asyncio.shield(self.sio.wait()))
                    if stop.is_set():
                        break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next(delays))
        finally:
            refresher.cancel()
            with contextlib.suppress(Exception):
                await self.sio.disconnect()
            await self.close()
            log.info("stopped")

    async def _refresh(self, stop: asyncio.Event) -> None:
        """Renew the token before it expires and hand it to the hub, which re-checks it."""
        while not stop.is_set():
            wait = self.tokens.refresh_at - time.monotonic() if self.tokens.refresh_at else 1.0
            await asyncio.sleep(max(0.5, wait))
            if not self.tokens.refresh_at or time.monotonic() < self.tokens.refresh_at:
                continue
            try:
                token = await self.tokens.renew()
            except TokenError as exc:
                log.error("cannot renew the access token: %s", exc)
                continue
            # Handed to the hub until it decides: while policyd cannot be asked (or the
            # hub does not answer) the old token still serves, so the new one is sent
            # again every few seconds rather than left until the old one expires.
            while self.sio.connected and not stop.is_set():
                if await self._hand_over(token):
                    break
                await asyncio.sleep(RETRY_TOKEN_SECONDS)

    async def _hand_over(self, token: str) -> bool:
        """Send a renewed token to the hub; whether the hub decided (took or refused it)."""
        try:
            answer = await self.sio.call(
                TOKEN_EVENT, {"token": token}, namespace=NAMESPACE, timeout=10
            )
        except Exception as exc:
            log.warning("the hub did not take the renewed token: %s", type(exc).__name__)
            return False
        if isinstance(answer, dict) and answer.get("ok"):
            log.info("access token renewed")
            return True
        reason = answer.get("reason") if isinstance(answer, dict) else answer
        log.error("refused by the hub: %s", reason)
        return reason != UNAVAILABLE

    # -- requests -----------------------------------------------------------------------

    async def _on_request(self, data: Any) -> dict[str, Any]:
        try:
            request = LinkRequest.decode(data)
        except ValueError as exc:
            return _error(400, "invalid_request", str(exc)).encode()
        # The body read was capped by max_answer_bytes, and a large one travels as base64
        # (wire.encode_body): the message stays under the link's limit.
        return (await self.serve(request)).encode()

    def _too_large(self, request: LinkRequest, why: str = "") -> LinkResponse:
        log.warning(
            "upstream of %s answered %s %s with %s: 502",
            request.data_source,
            request.method,
            request.path,
            why or f"more than max_answer_bytes ({self.config.max_answer_bytes})",
        )
        return _error(
            502,
            "answer_too_large",
            f"the data source's answer is larger than the link carries"
            f" ({self.config.max_answer_bytes} bytes)",
        )

    async def serve(self, request: LinkRequest) -> LinkResponse:
        """Replay the request against its data source's upstream."""
        base = self.upstreams.get(request.data_source)
        if base is None:
            return _error(
                404, "not_served", f"this connector does not serve {request.data_source!r}"
            )
        if not request.path.startswith("/"):
            return _error(400, "invalid_request", "the path must start with /")
        target = base + request.path + ("?" + request.query if request.query else "")
        started = time.monotonic()
        try:
            async with self._upstream.request(
                request.method,
                URL(target, encoded=True),
                headers=request_headers(request.headers),
                data=request.body or None,
                allow_redirects=False,
            ) as r:
                body = await _read(r, self.config.max_answer_bytes)
        except AnswerTooLarge:
            return self._too_large(request)
        except TimeoutError:
            return _error(504, "upstream_timeout", "the data source's upstream did not answer")
        except (aiohttp.ClientError, ValueError) as exc:
            log.warning("upstream of %s failed: %s", request.data_source, type(exc).__name__)
            return _error(502, "upstream_unavailable", "the data source's upstream failed")
        if log.isEnabledFor(logging.DEBUG):  # --verbose
            log.debug(
                "%s %s %s -> %d in %.1f ms",
                request.data_source,
                request.method,
                request.path,
                r.status,
                (time.monotonic() - started) * 1000,
            )
        return LinkResponse(r.status, response_headers(list(r.headers.items())), body)

    async def close(self) -> None:
        await self._upstream.close()
        await self.tokens.close()
        await self._http.close()


async def _read(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, read as it streams in; AnswerTooLarge past `limit` bytes (the
    rest is not read: the upstream connection is closed)."""
    if r.content_length is not None and r.content_length > limit:
        raise AnswerTooLarge
    body = bytearray()
    async for chunk in r.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge
    return bytes(body)


def _error(status: int, error: str, message: str) -> LinkResponse:
    body = json.dumps({"error": error, "message": message}).encode()
    return LinkResponse(status, [("content-type", "application/json")], body)


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _main(config: ConnectorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Connector(config).run(stop)
    finally:
        # Stopped: a second signal (Ctrl-C to a process group, then its supervisor's
        # SIGTERM) is ignored. Removing the loop's handlers first unsets its wakeup fd,
        # which asyncio.run closes next: a signal in between would print a traceback.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="policyd-connector",
        description="Serve a plant's data sources to the hub over the link (docs/link.md).",
    )
    parser.add_argument("--config", required=True, help="the connector's TOML file")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"policyd-connector: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s connector %(levelname)s %(message)s",
    )
    for noisy in ("httpx", "httpcore", "aiohttp", "socketio", "engineio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.info(
        "policyd-connector %s for %s, hub %s",
        config.client_id,
        ",".join(config.sources),
        config.hub_url,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before _main took the signals
        asyncio.run(_main(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
