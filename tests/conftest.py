from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers import Home, ServerProcess, decision_stub, run_server


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """An empty policyd home (config, store, key folder) in a temp dir."""
    return Home(tmp_path)


@pytest.fixture
def seeded(tmp_path: Path) -> Home:
    """A home with the standard test data (see Home.seed)."""
    h = Home(tmp_path)
    h.seed()
    return h


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """One seeded home per test module, for tests that share a server."""
    h = Home(tmp_path_factory.mktemp("home"))
    h.seed()
    return h


@pytest.fixture(scope="module")
def shared_server(shared_home: Home) -> Iterator[ServerProcess]:
    """A real `policyd serve` process on the module's shared home."""
    with run_server(shared_home) as server:
        yield server


@pytest.fixture(scope="module")
def stub(shared_server: ServerProcess) -> Iterator[object]:
    """A Decision stub over a real socket to the shared server."""
    with grpc.insecure_channel(shared_server.address) as channel:
        yield decision_stub(channel)
