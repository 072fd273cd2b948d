"""Listening addresses: `HOST:PORT` read and bound in one place, for every port policyd opens.

`server.address`, `client.address`, `oauth.address` and `envoy.http_address` are all
`HOST:PORT`: the port is what follows the last colon (0 to 65535, at most five ASCII
digits), and an IPv6 host is written in brackets (`[::1]:50051`, `[::]:50051`), as gRPC
reads it too. A host with a colon outside brackets (`::1:50051`) is refused, not guessed.

Every problem is a one-line ConfigError naming the config key the caller passes in:

    server.address must be HOST:PORT, not 'nonsense'
    server.address: 127.0.0.1:50051 is already in use
    envoy.http_address: cannot listen on 10.9.9.9:50052: Cannot assign requested address

Sockets are bound with SO_REUSEADDR, as every server's listening socket is: connections of
a stopped server still in TIME_WAIT do not hold the port, while a live listener still does.
(`envoy.http_address` may also be `unix:/PATH`; the HTTP door binds that itself.)
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from policyd.core.errors import ConfigError

# `envoy.http_address = "unix:/PATH"`: a Unix socket (policyd/doors/envoy_http.py).
UNIX_PREFIX = "unix:"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed `HOST:PORT`: the host without brackets, the port, the socket family."""

    host: str
    port: int
    family: socket.AddressFamily


class AddressInUse(ConfigError):
    """Another socket (a live listener) holds the address: `KEY: ADDRESS is already in use`."""

    def __init__(self, key: str, address: str) -> None:
        super().__init__(f"{key}: {address} is already in use")


def parse(key: str, address: str) -> HostPort:
    """`HOST:PORT` (an IPv6 host in brackets), or ConfigError naming `key`."""
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (
        not colon
        or not host
        or not (port.isascii() and port.isdigit() and len(port) <= 5)
        or int(port) > 65535
        or bracketed != (":" in host)  # an IPv6 host in brackets, and nothing else in them
        or "[" in host
        or "]" in host
    ):
        raise ConfigError(f"{key} must be HOST:PORT, not {address!r}")
    return HostPort(host, int(port), socket.AF_INET6 if bracketed else socket.AF_INET)


def _bound(key: str, address: str, reuse_port: bool, backlog: int | None) -> socket.socket:
    """A TCP socket bound to `address` (listening when `backlog` is given)."""
    where = parse(key, address)
    try:
        sock = socket.socket(where.family, socket.SOCK_STREAM)
    except OSError as exc:  # e.g. IPv6 switched off on this host
        raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((where.host, where.port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(key, address) from None
        raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror}") from None
    return sock


def listen(key: str, address: str, *, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on `address`; with `reuse_port`, beside others that set it."""
    return _bound(key, address, reuse_port, backlog)


def ensure_free(key: str, address: str) -> None:
    """Fail with one line when `address` cannot be listened on: bind a probe and close it.

    For a listener made by a library that says only 'Failed to bind' (grpc), and that binds
    beside another listener that set SO_REUSEPORT (as a live policyd's gRPC does): the
    probe does not set SO_REUSEPORT, so such a listener is found."""
    _bound(key, address, reuse_port=False, backlog=None).close()
