"""Runs the authorization server on uvicorn in a thread of `policyd serve`.

The socket is bound here, before the thread starts, so a taken port is a one-line
ConfigError at start-up. `stop()` asks uvicorn to finish the requests in flight and waits.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

import uvicorn

from policyd.config import Config
from policyd.core import net
from policyd.core.errors import ConfigError

log = logging.getLogger("policyd.oauth")


def bind(address: str) -> socket.socket:
    """The listening socket at `oauth.address`, or a one-line ConfigError."""
    try:
        sock = net.listen("oauth.address", address, backlog=128)
    except net.AddressInUse:  # this door has always said a taken port in the OS's words
        strerror = os.strerror(errno.EADDRINUSE)
        raise ConfigError(f"oauth.address: cannot listen on {address}: {strerror}") from None
    sock.set_inheritable(True)
    return sock


class RunningAuthorizationServer:
    def __init__(self, config: Config) -> None:
        # Imported here: only worker 0 runs the authorization server, and its web stack
        # (authlib, starlette, jinja2) costs every other serving process 0.06 s of CPU at
        # start (measured: importing policyd.serve.server alone 0.37 s, with it 0.43 s).
        from policyd.oauth.app import AuthorizationApp

        self.address = config.oauth.address
        self.socket = bind(self.address)
        try:
            self.app = AuthorizationApp(config)
        except BaseException:
            self.socket.close()
            raise
        o = config.oauth
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app.asgi,
                log_level="warning",
                access_log=False,  # paths and forms stay out of logs
                lifespan="off",
                ssl_certfile=o.cert_file or None,
                ssl_keyfile=o.key_file or None,
                server_header=False,
            )
        )
        self.thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, name="policyd-oauth"
        )
        self.thread.daemon = True

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the authorization server did not start on {self.address}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout)
        self.socket.close()
        if not self.thread.is_alive():  # else requests still run on the store: left open
            self.app.close()


def start_authorization_server(config: Config) -> RunningAuthorizationServer | None:
    """Start the authorization server when `oauth.enabled`; None otherwise."""
    if not config.oauth.enabled:
        return None
    server = RunningAuthorizationServer(config)
    server.start()
    scheme = "https" if config.oauth.cert_file else "http"
    log.info(
        "serving the authorization server on %s://%s (issuer %s)",
        scheme,
        config.oauth.address,
        config.tokens.issuer,
    )
    return server
