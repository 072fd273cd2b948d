"""A fresh PostgreSQL database per test, on the session's server (conftest.pg_server).

Import the fixture into a test module (`from tests.pg_support import pg_url`).
"""

from __future__ import annotations

import pytest

from tests.conftest import new_database


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database for one test (dropped after it)."""
    return new_database(request, "postgresql")
