"""docs/reason-codes.md describes every reason code, and the Python and proto enums agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policyd.core.reasons import Reason
from policyd.gen.v1 import decision_pb2

DOC = Path(__file__).resolve().parent.parent / "docs" / "reason-codes.md"
# A table row: | `NAME` | number | meaning | when | HTTP status |
ROW = re.compile(r"^\| `([A-Z_]+)` \| (\d+) \|(.*)\|(.*)\|(.*)\|$")


def _rows() -> dict[str, tuple[int, str]]:
    """Each documented code: its number and the HTTP status cell."""
    rows: dict[str, tuple[int, str]] = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = (int(m.group(2)), m.group(5).strip())
    return rows


def test_python_reason_enum_matches_the_proto_enum() -> None:
    proto = {v.name: v.number for v in decision_pb2.DESCRIPTOR.enum_types_by_name["Reason"].values}
    assert proto.pop("REASON_UNSPECIFIED") == 0
    assert proto == {r.name: r.value for r in Reason}


def test_proto_reason_names_map_to_the_same_python_numbers() -> None:
    for reason in Reason:
        assert decision_pb2.Reason.Value(reason.name) == reason.value
        assert decision_pb2.Reason.Name(reason.value) == reason.name


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
def test_every_reason_is_documented_with_its_number(reason: Reason) -> None:
    rows = _rows()
    assert reason.name in rows, f"docs/reason-codes.md has no row for {reason.name}"
    assert rows[reason.name][0] == reason.value


def test_reason_docs_list_no_code_that_does_not_exist() -> None:
    assert set(_rows()) == {r.name for r in Reason}


def test_reason_docs_give_401_exactly_for_token_problems() -> None:
    rows = _rows()
    for reason in Reason:
        status = rows[reason.name][1]
        assert status.startswith("401") == reason.is_token_problem, reason.name


def test_reason_docs_give_every_deny_an_http_status() -> None:
    rows = _rows()
    for reason in Reason:
        if reason is Reason.ALLOWED:
            continue
        status = rows[reason.name][1]
        assert re.match(r"^[45]\d\d\b", status), f"{reason.name}: {status!r}"


EXPECTED_STATUS = {
    Reason.APP_UNKNOWN: "403",
    Reason.APP_DISABLED: "403",
    Reason.CONSENT_MISSING: "403",
    Reason.CONSENT_INSUFFICIENT: "403",
    Reason.NO_ROUTE: "403",
    Reason.SCOPE_MISSING: "403",
    Reason.DATA_SOURCE_NOT_GRANTED: "403",
    Reason.DATA_SOURCE_ACCESS_INSUFFICIENT: "403",
    Reason.USER_ACCESS_MISSING: "403",
    Reason.REQUEST_INVALID: "400",
    Reason.PATH_AMBIGUOUS: "400",
    Reason.BODY_INVALID: "400",
    Reason.BODY_TOO_LARGE: "413",
    Reason.STORE_UNAVAILABLE: "503",
    Reason.INTERNAL_ERROR: "500",
    Reason.CONDITION_DENIED: "403",
    Reason.CONDITION_ERROR: "500",
}


@pytest.mark.parametrize(
    ("reason", "status"), EXPECTED_STATUS.items(), ids=[r.name for r in EXPECTED_STATUS]
)
def test_reason_docs_map_non_token_denies_to_their_http_status(reason: Reason, status: str) -> None:
    cell = _rows()[reason.name][1]
    assert cell.startswith(status)
    if status == "403":
        assert "insufficient_scope" in cell
