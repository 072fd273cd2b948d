"""`policyd policy check|test|explain|status`, and `policyd serve` refusing an invalid policy."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from policyd.cli import main
from policyd.core.policy import load_policy
from tests.helpers import ROOT, Home, free_port

POLICIES = ROOT / "policies"


def run(home: Home, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(home.config_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the default policy and its tests."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


# -- check -------------------------------------------------------------------------------


def test_check_reports_a_valid_policy_and_its_version(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(home, capsys, "policy", "check")
    version = load_policy(POLICIES).version
    assert (code, err) == (0, "")
    assert out.startswith(f"policy {POLICIES} is valid: version {version}, 4 scopes, 18 routes")
    code, out, _ = run(home, capsys, "policy", "check", str(POLICIES), "--json")
    summary = json.loads(out)
    assert summary["version"] == version and summary["tests"] >= 36


def test_check_lists_every_problem_with_its_position_and_exits_4(
    home: Home, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = folder / "hub.yaml"
    text = hub.read_text()
    hub.write_text(text.replace("scopes: [DataWrite]", "scopes: [DataWrit]", 1))
    suite = folder / "hub_test.yaml"
    suite.write_text(suite.read_text().replace("reason: SCOPE_MISSING", "reason: SCOPE_MISING", 1))
    code, out, err = run(home, capsys, "policy", "check", str(folder))
    assert (code, out) == (4, "")
    lines = err.splitlines()
    line = text.splitlines().index("    scopes: [DataWrite]") + 1
    assert lines[0] == (
        f"{hub}:{line}:14: route values-write-snapshot: undefined scope 'DataWrit'"
        " (defined: AccountDebit, DataRead, DataWrite, UserInfo)"
    )
    assert lines[1].startswith(f"{suite}:") and "unknown reason code 'SCOPE_MISING'" in lines[1]
    assert lines[-1] == f"policyd: policy {folder} does not validate (2 problems)"


# -- test --------------------------------------------------------------------------------


def test_default_policy_tests_pass_and_cover_every_route_allowed_and_denied(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(home, capsys, "policy", "test", "--json")
    report = json.loads(out)
    assert code == 0, [t for t in report["tests"] if not t["passed"]]
    assert report["failed"] == 0 and report["passed"] == len(report["tests"])
    assert report["uncovered_routes"] == []
    code, out, _ = run(home, capsys, "policy", "test")
    assert code == 0
    assert out.splitlines()[-1].startswith(f"{report['passed']} passed, 0 failed")


def test_failing_tests_exit_5_and_write_junit_and_json(
    home: Home, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = folder / "hub_test.yaml"
    text = suite.read_text().replace(
        "expect: {decision: deny, reason: DATA_SOURCE_NOT_GRANTED, rule: tags-search}",
        "expect: {decision: allow, reason: ALLOWED, rule: tags-search}",
    )
    suite.write_text(text)
    junit = tmp_path / "junit.xml"
    code, out, _ = run(home, capsys, "policy", "test", str(folder), "--junit", str(junit))
    assert code == 5
    assert "FAIL  hub data API: tag search on a data source not granted (" in out
    assert "expected allow ALLOWED, got deny DATA_SOURCE_NOT_GRANTED" in out
    assert ", 1 failed (" in out.splitlines()[-1]
    root = ET.parse(junit).getroot()
    [testsuite] = root.findall("testsuite")
    assert testsuite.get("failures") == "1"
    failed = [c for c in testsuite.findall("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["tag search on a data source not granted"]
    assert failed[0].get("file") == str(suite)
    code, out, _ = run(home, capsys, "policy", "test", str(folder), "--json", "-k", "tag search")
    report = json.loads(out)
    assert code == 5 and (report["passed"], report["failed"]) == (1, 1)


def test_invalid_suite_exits_4_not_5(
    home: Home, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "more_test.yaml").write_text(
        "apiVersion: policyd/v1\ntests:\n  - name: x\n    request: {path: /api/info}\n"
        "    expect: {decision: allow, reason: NO_ROUTE}\n"
    )
    code, _, err = run(home, capsys, "policy", "test", str(folder))
    assert code == 4
    assert f"{folder / 'more_test.yaml'}:5:39: decision allow cannot have reason NO_ROUTE" in err


# -- explain -----------------------------------------------------------------------------


def test_explain_shows_the_rule_the_data_sources_and_every_check(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        home,
        capsys,
        "policy",
        "explain",
        "--method",
        "POST",
        "--path",
        "/api/data/v2/snapshot",
        "--body",
        '{"tags": {"dsnA": ["t1"], "dsnB": ["t2"]}}',
        "--sub",
        "alice",
        "--scope",
        "DataRead",
        "--grant",
        "dsnA=read",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "deny DATA_SOURCE_NOT_GRANTED: data source 'dsnB' is not granted to this app"
    location = load_policy(POLICIES).locations["values-snapshot"]
    assert f"  rule:         values-snapshot ({location})" in lines
    assert "  data source:  dsnA  from body /tags (keys)" in lines
    assert "  data source:  dsnB  from body /tags (keys)" in lines
    assert "    ok    scopes: has DataRead" in lines
    assert "    ok    data source dsnA: granted read, the user has read; needs read" in lines
    assert lines[-1].startswith("    FAIL  data sources: DATA_SOURCE_NOT_GRANTED")


def test_explain_json_lists_the_conditions_evaluated(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        home,
        capsys,
        "policy",
        "explain",
        "--method",
        "PUT",
        "--path",
        "/api/data/v2/history/lims",
        "--sub",
        "alice",
        "--scope",
        "DataWrite",
        "--grant",
        "lims=write",
        "--label",
        "lims:class=safety",
        "--json",
    )
    data = json.loads(out)
    assert code == 0
    assert (data["decision"], data["reason"], data["rule"]) == (
        "deny",
        "CONDITION_DENIED",
        "values-write-history",
    )
    assert data["path_params"] == {"dsn": "lims"}
    assert data["data_sources"] == [{"name": "lims", "from": "path parameter {dsn}"}]
    [step] = data["conditions"]
    assert (step["condition"], step["result"], step["data_source"]) == (
        "no-writes-to-safety-systems",
        "true",
        "lims",
    )


def test_explain_with_a_token_decides_against_the_store(
    seeded: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    token = seeded.token()
    code, out, _ = run(
        seeded, capsys, "policy", "explain", "--path", "/api/data/tags/ds-a", "--token", token
    )
    assert code == 0
    assert out.splitlines()[0] == "allow ALLOWED: allowed"
    assert "  data source:  ds-a  from path parameter {dsn}" in out
    code, _, err = run(seeded, capsys, "policy", "explain", "--token", token)
    assert code == 2 and "give exactly one of --path and --action" in err


# -- status and serve ------------------------------------------------------------------------


def test_status_without_a_running_server_exits_1(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(home, capsys, "policy", "status")
    assert code == 1
    assert out.startswith(f"policy files: {POLICIES} (version {load_policy(POLICIES).version})")
    assert "no running server" in err


def test_serve_refuses_an_invalid_policy_and_says_where(home: Home, folder: Path) -> None:
    hub = folder / "hub.yaml"
    hub.write_text(hub.read_text().replace("path: /api/user/me", "path: /api/user//me"))
    home.write_config(f'[policy]\ndir = "{folder}"\n')
    result = home.cli("serve", "--address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert f"policy {folder} does not validate (1 problem)" in result.stderr
    assert f"{hub}:" in result.stderr and "has an empty segment" in result.stderr


def test_serve_refuses_a_missing_policy_folder(home: Home, tmp_path: Path) -> None:
    home.write_config(f'[policy]\ndir = "{tmp_path / "nowhere"}"\n')
    result = home.cli("serve", "--address", f"127.0.0.1:{free_port()}", "--workers", "2")
    assert result.returncode == 1
    assert "the policy folder does not exist" in result.stderr


def test_apps_add_knows_the_scopes_of_the_policy(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(home, capsys, "apps", "add", "a", "--name", "A", "--scope", "DataRaed")
    assert code == 1
    assert "unknown scope(s): DataRaed (the policy defines UserInfo, DataRead" in err


def test_a_test_the_store_cannot_set_up_fails_alone(
    home: Home, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "odd_test.yaml").write_text(
        "apiVersion: policyd/v1\ntests:\n  - name: odd user\n"
        "    principal: {sub: 'has space', client_id: app, scopes: [UserInfo]}\n"
        "    request: {path: /api/user/me}\n    expect: {decision: allow}\n"
    )
    code, out, _ = run(home, capsys, "policy", "test", str(folder))
    assert code == 5
    assert "FAIL  odd_test: odd user" in out and "cannot set up the test" in out
    assert ", 1 failed (" in out.splitlines()[-1]
