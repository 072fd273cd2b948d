"""Test support for the link: a LinkHub served in a thread (real uvicorn listeners, real
sockets, TLS where asked), upstreams that record what reached them, and `policyd-connector`
as a real process.

`TableAuthorizerForTests` stands in for policyd until policyd knows `connector.attach`
(tests/test_link_e2e.py asks the real one): a table of connectors, their secrets, the data
sources they own and whether they are enabled, and the tokens a small client-credentials
token endpoint (`token_app`) issued. The production authorizer is GrpcAuthorizer.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.link import LinkHub, LinkResponse, Verdict
from adapters.link.listener import Listener
from tests.helpers import ROOT, free_port

T = TypeVar("T")


@dataclass
class ConnectorEntry:
    secret: str
    data_sources: set[str]
    enabled: bool = True


@dataclass
class TableAuthorizerForTests:
    """A stand-in for policyd's `connector.attach` decision, for transport tests only."""

    connectors: dict[str, ConnectorEntry] = field(default_factory=dict)
    # token -> (connector id, expiry on time.time())
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    token_lifetime: float = 300.0
    checks: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, connector_id: str, *data_sources: str, secret: str = "") -> str:
        secret = secret or f"secret-of-{connector_id}"
        self.connectors[connector_id] = ConnectorEntry(secret, set(data_sources))
        return secret

    def issue(self, connector_id: str) -> str:
        token = f"tok-{connector_id}-{next(self._serial)}"
        self.tokens[token] = (connector_id, time.time() + self.token_lifetime)
        return token

    async def check(self, token: str, data_sources: Sequence[str], request_id: str = "") -> Verdict:
        verdict = self._decide(token, data_sources)
        self.checks.append((token, tuple(data_sources), verdict.reason))
        return verdict

    def _decide(self, token: str, data_sources: Sequence[str]) -> Verdict:
        if not token:
            return Verdict(False, "TOKEN_MISSING")
        found = self.tokens.get(token)
        if found is None:
            return Verdict(False, "TOKEN_MALFORMED")
        connector_id, expires = found
        if time.time() >= expires:
            return Verdict(False, "TOKEN_EXPIRED", connector_id)
        entry = self.connectors.get(connector_id)
        if entry is None:
            return Verdict(False, "CONNECTOR_UNKNOWN", connector_id)
        if not entry.enabled:
            return Verdict(False, "CONNECTOR_DISABLED", connector_id)
        if not set(data_sources) <= entry.data_sources:
            return Verdict(False, "DATA_SOURCE_NOT_OWNED", connector_id)
        return Verdict(True, "ALLOWED", connector_id)

    async def close(self) -> None:
        pass

    def token_app(self) -> Starlette:
        """POST /token: client credentials (client_secret_basic), as policyd's will be."""

        async def token(request: Request) -> Response:
            form = await request.form()
            header = request.headers.get("authorization", "")
            try:
                pair = base64.b64decode(header.removeprefix("Basic ")).decode()
                client_id, secret = (unquote(p) for p in pair.split(":", 1))
            except ValueError:
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            entry = self.connectors.get(client_id)
            if form.get("grant_type") != "client_credentials":
                return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
            if entry is None or entry.secret != secret:
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            return JSONResponse(
                {
                    "access_token": self.issue(client_id),
                    "token_type": "Bearer",
                    "expires_in": self.token_lifetime,
                }
            )

        return Starlette(routes=[Route("/token", token, methods=["POST"])])


@dataclass
class Upstream:
    """A data source's local upstream: echoes each request, records the writes it got."""

    name: str
    seen: list[tuple[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def echo(request: Request) -> Response:
            body = await request.body()
            self.seen.append((request.method, request.url.path))
            if request.url.path.startswith("/slow"):
                await asyncio.sleep(float(request.query_params.get("seconds", "5")))
            return JSONResponse(
                {
                    "upstream": self.name,
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "body": body.decode(),
                    "headers": dict(request.headers),
                },
                headers={
                    "x-upstream": self.name,
                    "etag": f'"{self.name}"',
                    "set-cookie": "plant=1",
                },
            )

        return Starlette(
            routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PUT", "DELETE"])]
        )


class HubThread:
    """A LinkHub on its own listener (and a token endpoint, and upstreams) in a thread with
    its own event loop; the test calls into it with `run()`."""

    def __init__(
        self,
        authorizer: TableAuthorizerForTests,
        *,
        tls: tuple[str, str, str] | None = None,  # cert, key, client CA ("" = no mTLS)
        **hub_options: Any,
    ) -> None:
        self.authorizer = authorizer
        self.tls = tls
        self.hub_options = {"allow_insecure": tls is None, **hub_options}
        self.port = free_port()
        self.token_port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.hub: LinkHub | None = None
        self.listener: Listener | None = None
        self.others: list[Listener] = []
        self.run(self._serve_tokens())
        self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.token_port}/token"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve_tokens(self) -> None:
        listener = Listener(self.authorizer.token_app(), "127.0.0.1", self.token_port)
        await listener.start()
        self.others.append(listener)

    def upstream(self, name: str) -> tuple[Upstream, str]:
        up = Upstream(name)
        port = free_port()

        async def serve() -> None:
            listener = Listener(up.app(), "127.0.0.1", port, graceful_seconds=1)
            await listener.start()
            self.others.append(listener)

        self.run(serve())
        return up, f"http://127.0.0.1:{port}"

    def start(self) -> None:
        async def start() -> None:
            self.hub = LinkHub(self.authorizer, **self.hub_options)
            cert, key, client_ca = self.tls or ("", "", "")
            self.listener = Listener(
                self.hub,
                "127.0.0.1",
                self.port,
                certfile=cert,
                keyfile=key,
                client_ca_file=client_ca,
            )
            await self.listener.start()

        self.run(start())

    def stop(self) -> None:
        async def stop() -> None:
            if self.hub is not None:
                await self.hub.close()
            if self.listener is not None:
                await self.listener.stop()
            self.hub = self.listener = None

        self.run(stop())

    def close(self) -> None:
        self.stop()

        async def rest() -> None:
            for listener in self.others:
                await listener.stop()

            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def online(self) -> list[dict[str, Any]]:
        assert self.hub is not None
        hub = self.hub

        async def online() -> list[dict[str, Any]]:
            return hub.online()

        return self.run(online())

    def wait_online(self, connector_id: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.online() if c["connector_id"] == connector_id]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"connector {connector_id} did not come online")
            time.sleep(0.05)

    def forward(
        self,
        data_source: str,
        method: str = "GET",
        path: str = "/echo",
        query: str = "",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        timeout: float = 30,
    ) -> LinkResponse:
        assert self.hub is not None
        return self.run(
            self.hub.forward(data_source, method, path, query, headers or [], body), timeout
        )


@dataclass
class ConnectorProcess:
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {text!r} in the connector's log:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def write_config(
    folder: Path,
    connector_id: str,
    *,
    hub_url: str,
    token_url: str,
    secret: str,
    sources: dict[str, str],
    extra: str = "",
    insecure: bool = True,
) -> Path:
    secret_file = folder / f"{connector_id}.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    lines = [
        f"hub_url = {json.dumps(hub_url)}",
        f"token_url = {json.dumps(token_url)}",
        f"client_id = {json.dumps(connector_id)}",
        f"client_secret_file = {json.dumps(str(secret_file))}",
        f"insecure_dev = {'true' if insecure else 'false'}",
        extra,
        "[reconnect]",
        "delay_seconds = 0.2",
        "delay_max_seconds = 1",
        "randomization_factor = 0.1",
    ]
    for name, url in sources.items():
        lines += [f"[sources.{name}]", f"url = {json.dumps(url)}"]
    path = folder / f"{connector_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_connector(config: Path, *args: str) -> ConnectorProcess:
    log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "adapters.link.connector", "--config", str(config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return ConnectorProcess(process, log_path)


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held (polled every 20 ms); AssertionError at timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started
