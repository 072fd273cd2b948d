"""log.format: plain lines by default, one JSON object per line on request (core/logs.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import pytest

from policyd.core import logs
from policyd.core.model import CheckInput, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.wiring import build_decider
from tests.helpers import Home, check_request, decision_stub, run_server


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The test changes the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_a_json_line_has_time_level_logger_message_and_the_decision_id(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("json")
    log = logging.getLogger("policyd.test")
    log.warning("plain %s", "words")
    log.error("decision %s: %s", "d-1", "store gone\nsecond line", extra={"decision_id": "d-1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # a newline in a message stays inside its JSON string
    first, second, third = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == (
        "WARNING",
        "policyd.test",
        "plain words",
    )
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["decision_id"] == "d-1" and second["message"].endswith("second line")
    assert third["message"] == "failed" and "ValueError: boom" in third["exception"]


def test_a_denial_for_a_refusing_audit_log_names_its_decision_in_json(
    root_logging: None, seeded: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    decider = build_decider(seeded.config, seeded.store)
    assert decider.audit is not None
    decider.audit.close()  # every record is refused from now on: AUDIT_UNAVAILABLE
    logs.configure("json")
    decision = decider.check(
        CheckInput(seeded.token(), HttpTarget("GET", "/api/data/tags/ds-a"), "r1")
    )
    assert decision.reason is Reason.AUDIT_UNAVAILABLE
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    ours = [e for e in entries if e.get("decision_id") == decision.decision_id]
    assert ours and ours[0]["logger"] == "policyd.decision.decider", entries
    assert ours[0]["level"] == "ERROR"


def test_a_server_with_log_format_json_writes_only_json_lines(home: Home) -> None:
    home.write_config('[log]\nformat = "json"\n')
    home.seed()
    token = home.token()
    with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
        reply = decision_stub(channel).Check(check_request(token, path="/api/user/me"))
        assert reply.allowed
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    messages = [e["message"] for e in entries]
    assert any(m.startswith("serving policyd.v1.Decision on") for m in messages), messages
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert token not in server.log()


def test_the_default_log_is_plain_lines(home: Home) -> None:
    home.seed()
    with run_server(home) as server:
        pass
    first = server.log().splitlines()[0]
    assert " INFO policyd.server: serving policyd.v1.Decision on " in first
