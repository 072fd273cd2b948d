from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from policyd import pgserver
from policyd.decision.wiring import start_replica
from policyd.pgserver import PgServer
from policyd.store.facts import Facts
from policyd.store.open import facts_for
from policyd.store.pgfacts import PgFacts
from policyd.store.postgres import PostgresStore
from policyd.store.replica import Replica
from tests.helpers import Home, ServerProcess, decision_stub, free_port, run_server


@pytest.fixture
def home(tmp_path: Path, request: pytest.FixtureRequest, store_backend: str) -> Iterator[Home]:
    """An empty policyd home (config, store, key folder) in a temp dir, on the module's
    store backend (SQLite unless the module asks for both)."""
    h = Home(tmp_path, store_url=new_database(request, store_backend))
    yield h
    h.store.close()


@pytest.fixture
def seeded(home: Home) -> Home:
    """A home with the standard test data (see Home.seed)."""
    home.seed()
    return home


@pytest.fixture(scope="module")
def shared_home(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, store_backend: str
) -> Iterator[Home]:
    """One seeded home per test module, for tests that share a server."""
    h = Home(tmp_path_factory.mktemp("home"), store_url=new_database(request, store_backend))
    h.seed()
    yield h
    h.store.close()


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


# -- the store's backends ----------------------------------------------------------------
# Test modules that run on both backends import tests.backends.both_backends, which
# overrides `store_backend`; the rest run on SQLite only.

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL server for the test session (policyd/pgserver.py), in a
    folder under /tmp that its `postgres` user can reach; stopped and removed at the end."""
    if not pgserver.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb/pg_ctl are missing (.ci/run installs postgresql)")
        pytest.skip("PostgreSQL's initdb/pg_ctl are missing: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="policyd-pg-"))
    try:
        with pgserver.running(root, free_port(), fsync=False) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store_backend() -> str:
    return "sqlite"


def new_database(request: pytest.FixtureRequest, backend: str) -> str:
    """ "" for SQLite; for PostgreSQL, the URL of a new empty database on the session's
    server (dropped when the requesting test or module ends)."""
    if backend == "sqlite":
        return ""
    server: PgServer = request.getfixturevalue("pg_server")
    name = f"t{next(_databases)}_{os.getpid()}"
    url = server.create_database(name)

    def drop() -> None:
        # A store still open on it (one a test did not close) is closed first: its pools'
        # threads stop now, not in whatever later test the garbage collector meets them.
        for store in list(PostgresStore.opened):
            if store.url == url:
                store.close()
        server.drop_database(name)

    request.addfinalizer(drop)
    return url


_databases = itertools.count()


@pytest.fixture
def store_url(request: pytest.FixtureRequest, store_backend: str) -> str:
    """For a test that makes its own Home: "" (SQLite) or a new PostgreSQL database's URL."""
    return new_database(request, store_backend)


@pytest.fixture
def sqlite_only(store_backend: str) -> None:
    """For a test of SQLite's own mechanisms (files, data_version, per-row triggers) in a
    module that runs on both backends."""
    if store_backend != "sqlite":
        pytest.skip("a test of the SQLite backend's own mechanism")


@pytest.fixture(autouse=True)
def _stop_replicas() -> Iterator[None]:
    """Every replica a test started in this process (engines built with serving=True on
    PostgreSQL) gives its lease back when the test ends."""
    yield
    for replica in list(Replica.running):
        replica.stop()


@pytest.fixture
def live_facts(home: Home) -> Iterator[Facts]:
    """Decision-time facts as a server holds them: on PostgreSQL, those of a replica with a
    lease and a listening connection (wiring.start_replica), stopped after the test."""
    facts = facts_for(home.store)
    if isinstance(facts, PgFacts):
        replica = start_replica(home.config, facts)
        assert replica.fresh(), replica.problem
        yield facts
        replica.stop()
    else:
        yield facts
    facts.close()
