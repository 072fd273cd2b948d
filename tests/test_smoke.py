from __future__ import annotations

from typing import Any

from policyd.gen.v1 import decision_pb2
from tests.helpers import Home, check_request


def test_granted_data_source_is_allowed_and_other_is_not_granted(
    shared_home: Home, stub: Any
) -> None:
    token = shared_home.token()
    allowed = stub.Check(check_request(token, path="/api/data/tags/ds-a"), timeout=5)
    assert allowed.allowed
    assert allowed.reason == decision_pb2.ALLOWED
    assert list(allowed.data_sources) == ["ds-a"]
    denied = stub.Check(check_request(token, path="/api/data/tags/ds-c"), timeout=5)
    assert not denied.allowed
    assert denied.reason == decision_pb2.DATA_SOURCE_NOT_GRANTED
