"""The link's own listener: an ASGI app (LinkHub) served by uvicorn on a second address
inside a process that serves something else already (the hub's data API).

TLS: `certfile` + `keyfile`; with `client_ca_file` as well, mutual TLS (a connector must
present a certificate that chains to it). Signals stay with the process's main server:
this one is started and stopped by its owner (the hub's lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

import uvicorn

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


_SID = re.compile(r"\bsid=[^&\s\"]+")


class _RedactSessionIds(logging.Filter):
    """uvicorn logs a WebSocket's path and query string at INFO, and Engine.IO's `sid`
    there names a live link's session (over long-polling, whoever has it may post into the
    session): kept out of logs, as a token would be."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "sid=" in message:
            record.msg, record.args = _SID.sub("sid=[redacted]", message), None
        return True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the owner stops it


class Listener:
    """`await start()` binds and serves (raises OSError when it cannot); `await stop()`."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        certfile: str = "",
        keyfile: str = "",
        client_ca_file: str = "",
        log_level: str = "warning",
        graceful_seconds: int | None = None,
    ) -> None:
        if bool(certfile) != bool(keyfile):
            raise ValueError("the link listener's TLS needs both a certificate and a key")
        if client_ca_file and not certfile:
            raise ValueError("mutual TLS on the link listener needs its certificate and key")
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=certfile or None,
            ssl_keyfile=keyfile or None,
            ssl_ca_certs=client_ca_file or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca_file else ssl.CERT_NONE,
            lifespan="off",
            ws="wsproto",
            log_level=log_level,
            access_log=False,
            # None: wait for every request in flight when stopping.
            timeout_graceful_shutdown=graceful_seconds,
        )
        self.tls = bool(certfile)
        self.server = _Server(self.config)
        redact = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _RedactSessionIds) for f in redact.filters):
            redact.addFilter(_RedactSessionIds())
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        while not self.server.started:
            if self._task.done():
                raise OSError(f"cannot serve the link on {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.01)

    async def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
            await self.server.serve()

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
        self._task = None
