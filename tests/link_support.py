"""Test support for the link: a real `policyd serve` (Decision API and its authorization
server's token endpoint) shared by a test module, a LinkHub served in a thread (real
uvicorn listeners, real sockets, TLS where asked) asking it through GrpcAuthorizer,
upstreams that record what reached them, and `policyd-connector` as a real process.
Nothing on the decision path is stood in for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.asgi.channel import ChannelSettings
from adapters.link import Authorizer, GrpcAuthorizer, LinkHub, LinkResponse
from adapters.link.listener import Listener
from policyd.audit.reader import AuditReader, Query
from policyd.audit.records import AuditRecord
from policyd.config import load_config
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings
from tests.helpers import ROOT, Home, ServerProcess, free_port, run_server
from tests.oauth_support import oauth_home

T = TypeVar("T")


@dataclass
class Policyd:
    """A real `policyd serve` with its authorization server: connectors and data sources
    are registered in its store, tokens come from its token endpoint, every
    `connector.attach` is decided and audited by it."""

    home: Home
    server: ServerProcess

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def token_url(self) -> str:
        return f"{self.home.config.tokens.issuer}/token"

    def add(self, connector_id: str, *data_sources: str) -> str:
        """Register a connector serving these (new) data sources; its secret."""
        secret = self.home.store.add_connector(connector_id)
        for name in data_sources:
            self.home.store.add_data_source(name, connector=connector_id)
        return secret

    def authorizer(self) -> GrpcAuthorizer:
        return GrpcAuthorizer(ChannelSettings(self.address), timeout_seconds=5.0)

    def link_token(self, connector_id: str, ttl_seconds: int | None = None) -> str:
        """A connector's token signed by policyd's own key (`ttl_seconds` < 0: expired)."""
        token, _ = issue_token(
            self.home.keyring,
            token_settings(self.home.config).for_link(),
            sub=connector_id,
            client_id=connector_id,
            scopes=("connector",),
            ttl_seconds=ttl_seconds,
        )
        return token

    def records(self, **query: Any) -> list[AuditRecord]:
        """policyd's audit records of the link door matching `query` (audit.reader.Query's
        fields), newest first, as its indexer has them now."""
        reader = AuditReader(self.home.root / "audit.db")
        try:
            return [s.record for s in reader.query(Query(door="link", limit=1000, **query))]
        finally:
            reader.close()

    def audited(self, timeout: float = 10.0, **query: Any) -> AuditRecord:
        """The newest audit record of the link door matching `query`, once policyd's indexer
        has it (within its pass interval)."""
        deadline = time.monotonic() + timeout
        while not (found := self.records(**query)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit record (door link) for {query}")
            time.sleep(0.05)
        return found[0]


@contextmanager
def run_policyd(root: Path, ttl_seconds: int) -> Iterator[Policyd]:
    """policyd serve (Decision API and authorization server) on free ports, tokens living
    `ttl_seconds` with no leeway (an expired token is expired at once); always stopped."""
    home, _ = oauth_home(root)
    text = home.config_path.read_text()
    home.config_path.write_text(
        text.replace("[tokens]\n", f"[tokens]\nttl_seconds = {ttl_seconds}\nleeway_seconds = 0\n")
    )
    home.config = load_config(home.config_path, env={})
    try:
        with run_server(home) as server:
            yield Policyd(home, server)
    finally:
        home.store.close()


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
            if request.url.path.startswith("/big"):
                return Response(b"x" * int(request.query_params["bytes"]), media_type="text/plain")
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
    """A LinkHub on its own listener (and upstreams) in a thread with its own event loop,
    asking `policyd`; the test calls into it with `run()`."""

    def __init__(
        self,
        policyd: Policyd,
        *,
        tls: tuple[str, str, str] | None = None,  # cert, key, client CA ("" = no mTLS)
        authorizer: Callable[[], Authorizer] | None = None,  # default: policyd's
        **hub_options: Any,
    ) -> None:
        self.policyd = policyd
        self.authorizer = authorizer or policyd.authorizer
        self.tls = tls
        self.hub_options = {"allow_insecure": tls is None, **hub_options}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.hub: LinkHub | None = None
        self.listener: Listener | None = None
        self.others: list[Listener | Relay] = []
        self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

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
            # A new authorizer each start: the hub closes its own when it stops.
            self.hub = LinkHub(self.authorizer(), **self.hub_options)
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
        request_id: str = "",
    ) -> LinkResponse:
        assert self.hub is not None
        return self.run(
            self.hub.forward(data_source, method, path, query, headers or [], body, request_id),
            timeout,
        )


class Relay:
    """A TCP relay in front of policyd's Decision API, run in the hub's loop: `hold()` stops
    passing bytes either way (policyd stalls: every call meets its deadline, the hub's
    POLICYD_UNAVAILABLE), `release()` passes them again on the same connections."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.port = free_port()
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self.hub: HubThread | None = None

    def start(self, hub: HubThread) -> None:
        """Listen, in `hub`'s loop (stopped with it)."""
        self.hub = hub

        async def start() -> None:
            self._open = asyncio.Event()
            self._open.set()
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            hub.others.append(self)

        hub.run(start())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        while chunk := await reader.read(65536):
            await self._open.wait()
            writer.write(chunk)
            await writer.drain()
        writer.close()

    def hold(self) -> None:
        assert self.hub is not None
        self.hub.run(_call(self._gate().clear))

    def release(self) -> None:
        assert self.hub is not None
        self.hub.run(_call(self._gate().set))

    def _gate(self) -> asyncio.Event:
        assert self._open is not None
        return self._open


async def _call(function: Callable[[], None]) -> None:
    function()


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
