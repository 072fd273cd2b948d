"""Running a test module on both store backends: import `both_backends` into it.

    from tests.backends import both_backends  # noqa: F401  (runs the module on both)

It overrides conftest's `store_backend` for that module, so its `home`, `seeded` and
`shared_home` fixtures are made on SQLite and then on a fresh PostgreSQL database of the
session's server (conftest.pg_server).
"""

from __future__ import annotations

import pytest

from tests.conftest import BACKENDS


@pytest.fixture(scope="module", params=BACKENDS, name="store_backend")
def both_backends(request: pytest.FixtureRequest) -> str:
    return str(request.param)
