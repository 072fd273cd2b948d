"""A fresh PostgreSQL database per test, on the session's server (conftest.pg_server).

Import the fixture into a test module (`from tests.pg_support import pg_url`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from policyd import pgserver


@pytest.fixture
def pg_url(pg_server: pgserver.PgServer) -> Iterator[str]:
    """The URL of a fresh, empty database for one test (dropped after it)."""
    name = "t_" + uuid.uuid4().hex[:16]
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)
