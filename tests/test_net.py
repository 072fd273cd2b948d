"""policyd.core.net: the one HOST:PORT parser and binder, and the messages each caller gives.

That a port whose old connections are only in TIME_WAIT is not refused is shown with a real
server: tests/test_server.py, test_serve_starts_again_at_once_on_its_address_after_a_busy_run.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from policyd.core import net
from policyd.core.errors import ConfigError
from policyd.doors import envoy_http as http_door
from policyd.oauth.server import bind as oauth_bind


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")


@pytest.fixture
def taken() -> Iterator[str]:
    """The address of a live listener (no SO_REUSEADDR, no SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    ("address", "host", "port", "family"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051, socket.AF_INET),
        ("0.0.0.0:0", "0.0.0.0", 0, socket.AF_INET),
        ("localhost:65535", "localhost", 65535, socket.AF_INET),
        ("[::1]:50051", "::1", 50051, socket.AF_INET6),
        ("[::]:8080", "::", 8080, socket.AF_INET6),
    ],
)
def test_host_port_is_read_with_an_ipv6_host_in_brackets(
    address: str, host: str, port: int, family: socket.AddressFamily
) -> None:
    assert net.parse("server.address", address) == net.HostPort(host, port, family)


@pytest.mark.parametrize(
    "address",
    [
        "nonsense",  # no port
        "",
        "host:",  # an empty port
        ":50051",  # no host
        "host:http",  # the port is not a number
        "host:-1",
        "host: 80",
        "host:8O",
        "host:\u0665",  # a digit, but not an ASCII one
        "host:65536",  # out of range
        "host:99999",
        "host:" + "9" * 5000,  # too long even to be read as a number
        "::1:50051",  # IPv6 without brackets: which colon starts the port is a guess
        "fe80::1:8080",
        "[::1:50051",  # brackets not closed
        "::1]:50051",
        "[::1]]:50051",
        "[]:50051",
        "[127.0.0.1]:80",  # brackets hold an IPv6 host only
        "[localhost]:80",
        "[::1]",  # IPv6 in brackets, no port
    ],
)
@pytest.mark.parametrize("key", ["server.address", "oauth.address", "envoy.http_address"])
def test_a_bad_address_is_one_line_naming_the_key(key: str, address: str) -> None:
    with pytest.raises(ConfigError) as info:
        net.parse(key, address)
    assert str(info.value) == f"{key} must be HOST:PORT, not {address!r}"


def test_binding_refuses_a_bad_address_before_touching_a_socket() -> None:
    with pytest.raises(ConfigError, match=r"^server\.address must be HOST:PORT, not 'nonsense'$"):
        net.ensure_free("server.address", "nonsense")
    with pytest.raises(ConfigError, match=r"^oauth\.address must be HOST:PORT, not '::1:8080'$"):
        net.listen("oauth.address", "::1:8080", backlog=1)


def test_listen_gives_a_listening_socket_that_sets_so_reuseaddr() -> None:
    with net.listen("oauth.address", "127.0.0.1:0", backlog=8) as sock:
        assert sock.family == socket.AF_INET
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


@ipv6
def test_listen_on_an_ipv6_host_in_brackets() -> None:
    with net.listen("envoy.http_address", "[::1]:0", backlog=8) as sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockname()[0] == "::1"


def test_workers_listen_side_by_side_with_reuse_port() -> None:
    with net.listen("envoy.http_address", "127.0.0.1:0", backlog=8, reuse_port=True) as first:
        address = f"127.0.0.1:{first.getsockname()[1]}"
        with net.listen("envoy.http_address", address, backlog=8, reuse_port=True) as second:
            assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        # ...but a lone server (no SO_REUSEPORT) is refused beside them.
        with pytest.raises(net.AddressInUse):
            net.listen("envoy.http_address", address, backlog=8)


def test_a_port_a_live_listener_holds_is_refused_by_the_probe_and_by_listen(taken: str) -> None:
    with pytest.raises(net.AddressInUse) as info:
        net.ensure_free("server.address", taken)
    assert str(info.value) == f"server.address: {taken} is already in use"
    assert isinstance(info.value, ConfigError)
    with pytest.raises(net.AddressInUse) as info:
        net.listen("envoy.http_address", taken, backlog=8)
    assert str(info.value) == f"envoy.http_address: {taken} is already in use"


def test_the_probe_finds_a_live_listener_that_set_so_reuseport() -> None:
    """As a live policyd's gRPC listener does: grpc itself would bind beside it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as live:
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        live.bind(("127.0.0.1", 0))
        live.listen()
        address = f"127.0.0.1:{live.getsockname()[1]}"
        with pytest.raises(net.AddressInUse, match="is already in use"):
            net.ensure_free("server.address", address)


def test_the_probe_leaves_a_free_port_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    net.ensure_free("server.address", f"127.0.0.1:{port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.bind(("127.0.0.1", port))  # the probe is closed: nothing holds the port


def test_an_address_not_on_this_host_cannot_be_listened_on() -> None:
    address = "192.0.2.1:0"  # TEST-NET-1 (RFC 5737): never a local address
    with pytest.raises(ConfigError) as info:
        net.ensure_free("server.address", address)
    assert str(info.value) == (
        f"server.address: cannot listen on {address}: Cannot assign requested address"
    )
    assert not isinstance(info.value, net.AddressInUse)


def test_each_door_says_a_taken_port_as_it_always_has(taken: str) -> None:
    with pytest.raises(ConfigError) as info:
        http_door._bind(taken, reuse_port=False)
    assert str(info.value) == f"envoy.http_address: {taken} is already in use"
    with pytest.raises(ConfigError) as info:
        oauth_bind(taken)
    assert str(info.value) == f"oauth.address: cannot listen on {taken}: Address already in use"


def test_each_door_gets_a_listening_socket() -> None:
    door = http_door._bind("127.0.0.1:0", reuse_port=False)
    with door:
        assert not door.getblocking()
        assert door.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with oauth_bind("127.0.0.1:0") as oauth:
        assert oauth.get_inheritable()
        assert oauth.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
