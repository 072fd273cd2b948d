"""A real PostgreSQL for the tests: one private server per test session (policyd.pgserver),
and a fresh database per test.

Import the fixtures into a test module (`from tests.pg_support import pg_server, pg_url`).
Without PostgreSQL's initdb the tests that use them are skipped, saying why, except under
CI (the environment variable CI set), where that is a failure: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import pgserver
from tests.helpers import free_port


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer]:
    """One PostgreSQL server for the session (fsync off), stopped and deleted after it."""
    if not pgserver.available():
        reason = "PostgreSQL's initdb/pg_ctl not found (install Debian's postgresql package)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run")
        pytest.skip(reason)
    # Under /tmp, whatever TMPDIR says: the `postgres` user (when we are root) must reach it.
    root = Path(tempfile.mkdtemp(prefix="policyd-pg-", dir="/tmp"))
    try:
        with pgserver.running(root, free_port(), fsync=False) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: pgserver.PgServer) -> Iterator[str]:
    """The URL of a fresh, empty database for one test (dropped after it)."""
    name = "t_" + uuid.uuid4().hex[:16]
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)
