"""The HTTP door on a Unix socket (`envoy.http_address = "unix:/PATH"`), for an Envoy on the
same host: the socket file's life cycle, the config checks, and a real Envoy through it."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from adapters.envoy import config as envoy_config
from policyd.config import load_config
from policyd.core.errors import ConfigError
from policyd.decision.decider import Decider
from policyd.decision.wiring import build_decider
from policyd.doors import envoy_http as http_door
from tests.helpers import Home, free_port, run_server
from tests.test_envoy import INSUFFICIENT, _stop, start_envoy, start_hub


@pytest.fixture
def deciders() -> Iterator[list[Decider]]:
    """The deciders the test made, their audit logs closed at the end."""
    made: list[Decider] = []
    yield made
    for decider in made:
        if decider.audit is not None:
            decider.audit.close()


def _door(home: Home, path: Path, deciders: list[Decider]) -> http_door.HttpDoor:
    decider = build_decider(load_config(home.config_path, env={}))
    deciders.append(decider)
    return http_door.HttpDoor(decider, f"unix:{path}")


def _ask(path: Path, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(raw)
        return sock.recv(65536)


def test_the_door_answers_on_its_socket_and_removes_it_when_stopped(
    seeded: Home, deciders: list[Decider]
) -> None:
    home = seeded
    path = seeded.root / "door.sock"
    door = _door(home, path, deciders)
    door.start()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        answer = _ask(path, b"GET /ext_authz/api/data/tags/ds-a HTTP/1.1\r\nhost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 ")  # no token: a deny, decided and answered
    finally:
        door.stop()
    assert not path.exists()


def test_a_socket_left_by_an_ended_server_is_replaced_and_a_live_one_is_not(
    seeded: Home, deciders: list[Decider]
) -> None:
    home = seeded
    path = seeded.root / "door.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a killed server leaves
    stale.close()
    door = _door(home, path, deciders)
    door.start()
    try:
        with pytest.raises(ConfigError, match="is already in use"):
            _door(home, path, deciders)
        assert path.exists()  # still the live door's
    finally:
        door.stop()
    # A door stopping late leaves a newer server's socket at the same path alone.
    newer = _door(home, path, deciders)
    old_door = _door(home, seeded.root / "other.sock", deciders)
    old_door.unix_path = str(path)  # as if it had made the file that `newer` replaced
    old_door.stop()
    assert path.exists()
    newer.stop()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        _door(home, path, deciders)
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[envoy]\nhttp_address = "unix:door.sock"\n', "unix:/ABSOLUTE/PATH"),
        (f'[envoy]\nhttp_address = "unix:/{"x" * 107}"\n', "at most 107 bytes"),
        (
            '[server]\nworkers = 2\n[envoy]\nhttp_address = "unix:/tmp/door.sock"\n',
            "cannot be shared by server.workers",
        ),
    ],
)
def test_unix_addresses_that_cannot_work_are_config_errors(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):  # Home loads its config
        load_config(Home(tmp_path, extra_config=extra).config_path, env={})


@pytest.fixture(scope="module")
def uds_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Home]]:
    root = tmp_path_factory.mktemp("uds-home")
    path = root / "door.sock"
    home = Home(root, extra_config=f'[envoy]\nhttp_address = "unix:{path}"\n')
    home.seed()
    ports = envoy_config.Ports(
        listen=free_port(), hub=free_port(), policyd=free_port(), admin=free_port()
    )
    url = f"http://127.0.0.1:{ports.listen}"
    config = envoy_config.render(ports, source=envoy_config.HTTP, policyd_unix=str(path))
    with ExitStack() as running:
        running.enter_context(run_server(home))
        running.callback(_stop, start_hub(home.root, ports.hub))
        running.callback(_stop, start_envoy(home.root, config, f"{url}/api/info"))
        yield url, home


@pytest.mark.slow
def test_through_envoy_over_the_unix_socket(uds_envoy: tuple[str, Home]) -> None:
    url, home = uds_envoy
    token = {"Authorization": f"Bearer {home.token()}"}
    allowed = httpx.get(f"{url}/api/data/tags/ds-a", headers=token)
    assert allowed.status_code == 200, allowed.text
    me = httpx.get(f"{url}/api/user/me", headers={**token, "x-policyd-sub": "bob"})
    assert me.status_code == 200 and me.json()["sub"] == "alice"
    denied = httpx.get(f"{url}/api/data/tags/ds-c", headers=token)
    assert denied.status_code == 403
    assert denied.headers["www-authenticate"] == INSUFFICIENT
    assert httpx.get(f"{url}/api/data/tags/ds-a").status_code == 401
