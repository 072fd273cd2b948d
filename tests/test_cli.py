"""The `policyd` command: every subcommand, --json listings, exit codes and one-line errors.

Most tests call `policyd.cli.main(argv)` in this process (it returns the exit code, output is
captured with capsys); a few run the real command in a subprocess (`Home.cli`), and one asks
a real server.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from policyd.cli import main
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings
from policyd.store.base import hash_secret
from policyd.store.facts import Facts
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import Home, dump_store, free_port, run_server

ME = "/api/user/me"
TAGS_A = "/api/data/tags/ds-a"
TAGS_C = "/api/data/tags/ds-c"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json_lines(self) -> list[dict[str, object]]:
        rows = [json.loads(line) for line in self.lines]
        assert all(isinstance(row, dict) for row in rows)
        return rows


class Policyd:
    """Runs `policyd --config <home> ARGS...` in this process and captures what it prints."""

    def __init__(
        self, home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.home = home
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, *args: str, stdin: str | None = None, config: bool = True) -> Result:
        self.capsys.readouterr()
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        argv = ["--config", str(self.home.config_path), *args] if config else list(args)
        code = main(argv)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def ok(self, *args: str, stdin: str | None = None) -> Result:
        """Run and require success with nothing on stderr."""
        result = self(*args, stdin=stdin)
        assert (result.code, result.err) == (0, ""), result
        return result


def _policyd(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Policyd:
    for name in list(os.environ):
        if name.startswith("POLICYD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(home.root)
    return Policyd(home, capsys, monkeypatch)


@pytest.fixture
def policyd(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Policyd:
    """The command on an empty home."""
    return _policyd(home, capsys, monkeypatch)


@pytest.fixture
def on_seeded(
    seeded: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Policyd:
    """The command on a home with the standard test data (Home.seed)."""
    return _policyd(seeded, capsys, monkeypatch)


@pytest.fixture
def ready(policyd: Policyd) -> Policyd:
    """A fresh home set up only through the CLI: app1 (confidential), alice with her own
    write access to ds-a and read access to ds-c, consent UserInfo+DataRead, ds-a granted."""
    scopes = ["--scope", "UserInfo", "--scope", "DataRead", "--scope", "DataWrite"]
    uri = ["--redirect-uri", "https://app1.test/cb"]
    policyd.ok("apps", "add", "app1", "--name", "App One", *scopes, *uri)
    policyd.ok("users", "add", "alice", "--name", "Alice")
    policyd.ok("datasources", "add", "ds-a", "--description", "first", "--label", "site=north")
    policyd.ok("datasources", "add", "ds-c")
    policyd.ok("datasources", "give-access", "alice", "ds-a", "--role", "write")
    policyd.ok("datasources", "give-access", "alice", "ds-c")
    policyd.ok("consents", "add", "alice", "app1", "--scope", "UserInfo", "--scope", "DataRead")
    policyd.ok("grants", "add", "alice", "app1", "ds-a")
    policyd.ok("keys", "rotate")
    return policyd


def _token(policyd: Policyd, *scopes: str) -> str:
    scope_args = [a for s in scopes or ("UserInfo", "DataRead") for a in ("--scope", s)]
    token = policyd.ok("tokens", "issue", "--user", "alice", "--app", "app1", *scope_args).out
    assert token.count("\n") == 1 and token.count(".") == 2
    return token.strip()


def _check(policyd: Policyd, token: str, path: str, *extra: str) -> Result:
    return policyd("check", "--local", "--token", token, "--path", path, *extra)


def _assert_one_line_error(result: Result, code: int) -> None:
    assert result.code == code, result
    assert result.err.endswith("\n") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert "internal error" not in result.err


# -- apps ----------------------------------------------------------------------------------


def test_apps_add_prints_a_confidential_apps_secret_once_and_stores_only_its_hash(
    policyd: Policyd, home: Home
) -> None:
    result = policyd.ok("apps", "add", "app1", "--name", "App One", "--scope", "DataRead")
    assert result.lines[0] == "registered app app1"
    prefix = "client secret (shown once, store it now): "
    assert result.lines[1].startswith(prefix)
    secret = result.lines[1][len(prefix) :]
    assert len(secret) >= 32
    assert home.store.verify_client_secret("app1", secret)
    stored = dump_store(home.store).encode()  # every row, on either backend
    home.store.close()
    stored += b"".join(p.read_bytes() for p in home.root.glob("policyd.db*"))  # SQLite's
    assert secret.encode() not in stored
    assert hash_secret(secret).encode() in stored
    shown = policyd.ok("apps", "show", "app1", "--json").out + policyd.ok("apps", "list").out
    assert secret not in shown


def test_apps_add_public_app_prints_no_secret(policyd: Policyd) -> None:
    result = policyd.ok("apps", "add", "spa", "--name", "SPA", "--scope", "UserInfo", "--public")
    assert result.lines == ["registered app spa"]
    assert policyd.ok("apps", "show", "spa", "--json").json_lines()[0]["confidential"] is False


def test_apps_list_prints_an_aligned_table(ready: Policyd) -> None:
    ready.ok("apps", "add", "b-app", "--name", "B", "--scope", "UserInfo", "--public")
    lines = ready.ok("apps", "list").lines
    assert lines[0].split() == ["CLIENT_ID", "NAME", "CONFIDENTIAL", "ENABLED", "ALLOWED_SCOPES"]
    assert lines[1].split() == ["app1", "App", "One", "yes", "yes", "UserInfo,DataRead,DataWrite"]
    assert lines[2].split() == ["b-app", "B", "no", "yes", "UserInfo"]
    assert lines[0].index("NAME") == lines[1].index("App One") == lines[2].index("B ")


def test_apps_show_prints_every_field(ready: Policyd) -> None:
    lines = ready.ok("apps", "show", "app1").lines
    fields = dict(line.split(":", 1) for line in lines)
    assert fields["client_id"].strip() == "app1"
    assert fields["redirect_uris"].strip() == "https://app1.test/cb"
    assert fields["allowed_scopes"].strip() == "UserInfo,DataRead,DataWrite"
    assert fields["created_at"].strip().endswith("Z")


def test_apps_disable_denies_the_next_request_and_enable_allows_it(ready: Policyd) -> None:
    token = _token(ready)
    assert ready.ok("apps", "disable", "app1").out == "disabled app app1\n"
    denied = _check(ready, token, ME)
    assert (denied.code, denied.lines[0]) == (3, "deny APP_DISABLED: app 'app1' is disabled")
    assert ready.ok("apps", "show", "app1", "--json").json_lines()[0]["enabled"] is False
    assert ready.ok("apps", "enable", "app1").out == "enabled app app1\n"
    assert _check(ready, token, ME).code == 0


def test_apps_rotate_secret_replaces_the_secret(ready: Policyd, home: Home) -> None:
    result = ready.ok("apps", "rotate-secret", "app1")
    prefix = "new client secret (shown once, store it now): "
    assert result.out.startswith(prefix)
    secret = result.out[len(prefix) :].strip()
    assert home.store.verify_client_secret("app1", secret)
    again = ready.ok("apps", "rotate-secret", "app1").out[len(prefix) :].strip()
    assert not home.store.verify_client_secret("app1", secret)
    assert home.store.verify_client_secret("app1", again)


# -- users and data sources ----------------------------------------------------------------


def test_users_add_and_list(policyd: Policyd) -> None:
    assert policyd.ok("users", "add", "alice", "--name", "Alice A").out == "added user alice\n"
    policyd.ok("users", "add", "bob")
    assert policyd.ok("users", "list").lines == [
        "USER_ID  NAME",
        "alice    Alice A",
        "bob      bob",
    ]


def test_datasources_add_and_list_with_labels(policyd: Policyd) -> None:
    out = policyd.ok(
        "datasources",
        "add",
        "ds-a",
        "--description",
        "Historian",
        "--label",
        "site=north",
        "--label",
        "tier=1",
    ).out
    assert out == "added data source ds-a\n"
    rows = policyd.ok("datasources", "list", "--json").json_lines()
    assert rows == [
        {
            "name": "ds-a",
            "description": "Historian",
            "labels": {"site": "north", "tier": "1"},
            "connector": None,
        }
    ]
    assert policyd.ok("datasources", "list").lines[1].split() == [
        "ds-a",
        "Historian",
        "site=north,tier=1",
        "-",
    ]


def test_datasources_give_access_lists_and_remove_access_denies(ready: Policyd) -> None:
    assert ready.ok("datasources", "access", "--user", "alice", "--json").json_lines() == [
        {"user_id": "alice", "data_source": "ds-a", "role": "write"},
        {"user_id": "alice", "data_source": "ds-c", "role": "read"},
    ]
    token = _token(ready)
    assert _check(ready, token, TAGS_A).code == 0
    out = ready.ok("datasources", "remove-access", "alice", "ds-a").out
    assert out == "removed access of alice to ds-a\n"
    denied = _check(ready, token, TAGS_A)
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny USER_ACCESS_MISSING")
    assert ready.ok("datasources", "access", "--json").json_lines() == [
        {"user_id": "alice", "data_source": "ds-c", "role": "read"}
    ]


def test_datasources_give_access_replaces_the_role(ready: Policyd) -> None:
    out = ready.ok("datasources", "give-access", "alice", "ds-a", "--role", "read").out
    assert out == "user alice has read access to ds-a\n"
    rows = ready.ok("datasources", "access", "--json").json_lines()
    assert {"user_id": "alice", "data_source": "ds-a", "role": "read"} in rows


# -- consents and grants -------------------------------------------------------------------


def test_consents_add_and_list(ready: Policyd) -> None:
    out = ready.ok("consents", "add", "alice", "app1", "--scope", "UserInfo").out
    assert out == "user alice consented to app1: UserInfo\n"
    rows = ready.ok("consents", "list", "--user", "alice", "--app", "app1", "--json").json_lines()
    assert len(rows) == 1
    assert (rows[0]["user_id"], rows[0]["client_id"], rows[0]["scopes"]) == (
        "alice",
        "app1",
        ["UserInfo"],
    )


def test_consents_revoke_revokes_the_grants_and_denies_the_next_request(ready: Policyd) -> None:
    token = _token(ready)
    assert _check(ready, token, TAGS_A).code == 0
    out = ready.ok("consents", "revoke", "alice", "app1").out
    assert out == ("revoked consent of alice for app1, 1 grant(s) and 0 refresh-token families\n")
    denied = _check(ready, token, TAGS_A)
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny CONSENT_MISSING")
    assert ready.ok("consents", "list", "--json").out == ""
    assert ready.ok("grants", "list", "--json").out == ""


def test_grants_add_list_and_revoke(ready: Policyd) -> None:
    token = _token(ready)
    assert _check(ready, token, TAGS_C).code == 3
    out = ready.ok("grants", "add", "alice", "app1", "ds-c", "--access", "read").out
    assert out == "granted ds-c (read) to app1 for alice\n"
    assert _check(ready, token, TAGS_C).code == 0
    rows = ready.ok("grants", "list", "--data-source", "ds-c", "--json").json_lines()
    assert [(r["data_source"], r["access"], r["revoked_at"]) for r in rows] == [
        ("ds-c", "read", None)
    ]
    out = ready.ok("grants", "revoke", "alice", "app1", "ds-c").out
    assert out == "revoked ds-c from app1 for alice\n"
    denied = _check(ready, token, TAGS_C)
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny DATA_SOURCE_NOT_GRANTED")
    assert ready.ok("grants", "list", "--data-source", "ds-c", "--json").out == ""
    revoked = ready.ok("grants", "list", "--all", "--data-source", "ds-c", "--json").json_lines()
    assert len(revoked) == 1 and isinstance(revoked[0]["revoked_at"], float)


def test_grants_list_table_shows_times_as_utc(ready: Policyd) -> None:
    lines = ready.ok("grants", "list").lines
    assert lines[0].split() == [
        "USER_ID",
        "CLIENT_ID",
        "DATA_SOURCE",
        "ACCESS",
        "GRANTED_AT",
        "REVOKED_AT",
    ]
    cells = lines[1].split()
    assert cells[:4] == ["alice", "app1", "ds-a", "read"]
    assert cells[4].endswith("Z") and cells[5] == "-"


# -- keys and tokens -----------------------------------------------------------------------


def test_keys_rotate_list_jwks_and_retire(ready: Policyd) -> None:
    token = _token(ready)
    first = ready.ok("keys", "list", "--json").json_lines()
    assert [(k["alg"], k["state"]) for k in first] == [("ES256", "active")]
    out = ready.ok("keys", "rotate", "--alg", "EdDSA").out
    assert out.startswith("new active key ")
    new_kid = out.split()[-1]
    states = {k["kid"]: k["state"] for k in ready.ok("keys", "list", "--json").json_lines()}
    assert states == {first[0]["kid"]: "retiring", new_kid: "active"}
    jwks = json.loads(ready.ok("keys", "jwks").out)
    assert {k["kid"] for k in jwks["keys"]} == set(states)
    assert _check(ready, token, ME).code == 0  # the retiring key still verifies
    assert (
        ready.ok("keys", "retire", str(first[0]["kid"])).out == f"retired key {first[0]['kid']}\n"
    )
    assert [k["kid"] for k in json.loads(ready.ok("keys", "jwks").out)["keys"]] == [new_kid]
    denied = _check(ready, token, ME)
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny TOKEN_KEY_UNKNOWN")
    assert _check(ready, _token(ready), ME).code == 0  # new tokens use the new key


def test_keys_retire_refuses_the_active_key(ready: Policyd) -> None:
    kid = str(ready.ok("keys", "list", "--json").json_lines()[0]["kid"])
    result = ready("keys", "retire", kid)
    _assert_one_line_error(result, 1)
    assert "active signing key" in result.err


def test_keys_list_table_on_a_fresh_home_has_only_the_header(policyd: Policyd) -> None:
    assert policyd.ok("keys", "list").lines == ["KID  ALG  STATE  CREATED_AT  RETIRED_AT"]
    assert json.loads(policyd.ok("keys", "jwks").out) == {"keys": []}


def test_tokens_issue_prints_only_a_token_for_the_app_and_user(ready: Policyd) -> None:
    token = _token(ready, "UserInfo")
    allowed = ready("check", "--local", "--token", token, "--path", ME, "--json")
    assert allowed.code == 0
    principal = allowed.json_lines()[0]["principal"]
    assert isinstance(principal, dict)
    assert (principal["sub"], principal["client_id"], principal["scopes"]) == (
        "alice",
        "app1",
        ["UserInfo"],
    )


@pytest.mark.parametrize("how", ["argument", "stdin", "file", "jti"])
def test_tokens_revoke_denies_the_token(ready: Policyd, home: Home, how: str) -> None:
    token = _token(ready)
    assert _check(ready, token, ME).code == 0
    if how == "argument":
        result = ready.ok("tokens", "revoke", token)
    elif how == "stdin":
        result = ready.ok("tokens", "revoke", stdin=token + "\n")
    elif how == "file":
        (home.root / "t.token").write_text(token + "\n")
        result = ready.ok("tokens", "revoke", "@t.token")
    else:
        jti = ready.ok("check", "--local", "--token", token, "--path", ME, "--json")
        principal = jti.json_lines()[0]["principal"]
        assert isinstance(principal, dict)
        result = ready.ok("tokens", "revoke", "--jti", str(principal["jti"]))
    assert result.out.startswith("revoked token ")
    denied = _check(ready, token, ME)
    assert (denied.code, denied.lines[0]) == (3, "deny TOKEN_REVOKED: token has been revoked")


def test_revoking_by_jti_outlives_a_token_issued_with_a_long_ttl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cli.tokens_revoke --jti: the revocation lasted the configured ttl (3600 s) only, but
    `tokens issue --ttl` mints tokens of up to a day; the server purges expired revocations,
    so such a token was accepted again while still valid (fail open)."""
    home = Home(tmp_path)
    home.seed()
    monkeypatch.chdir(tmp_path)
    token = home.token(ttl_seconds=86400)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert main(["--config", str(home.config_path), "tokens", "revoke", "--jti", jti]) == 0
    capsys.readouterr()
    # What the server's purge does an hour and a bit later, while the token is still valid.
    home.store.purge_expired_revocations(time.time() + 3700, home.config.tokens.leeway_seconds)
    facts = Facts(home.store)
    assert facts.view().token_revoked(jti)


# -- demo ----------------------------------------------------------------------------------


def test_demo_seed_creates_the_demo_and_a_working_token_and_is_idempotent(
    policyd: Policyd, home: Home
) -> None:
    first = policyd.ok("demo", "seed").lines
    assert "created app demo-app" in first
    assert "created user alice" in first
    assert any(line.startswith("created signing key ") for line in first)
    token_file = home.root / "var" / "demo-alice.token"
    assert first[-1] == "wrote a 1-hour access token for alice (demo-app) to var/demo-alice.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    allowed = policyd(
        "check",
        "--local",
        "--token",
        "@var/demo-alice.token",
        "--path",
        "/api/data/tags/edge-historian",
    )
    assert allowed.code == 0
    denied = policyd(
        "check", "--local", "--token", "@var/demo-alice.token", "--path", "/api/data/tags/plant-mes"
    )
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny DATA_SOURCE_NOT_GRANTED")
    again = policyd.ok("demo", "seed", "--token-file", "other/alice.token").lines
    assert again == [
        # The connector's secret goes beside the token, and that folder had none yet.
        "wrote a new secret for connector plant-connector to other/plant-connector.secret",
        "wrote a 1-hour access token for alice (demo-app) to other/alice.token",
    ]
    assert len(policyd.ok("apps", "list", "--json").lines) == 1


def test_demo_seed_registers_the_plant_connector_and_keeps_its_secret_private(
    policyd: Policyd, home: Home
) -> None:
    # A secret file left from an earlier store is replaced when the connector is new.
    secret_file = home.root / "var" / "plant-connector.secret"
    secret_file.parent.mkdir(exist_ok=True)
    secret_file.write_text("left-from-an-earlier-store\n")
    first = policyd.ok("demo", "seed").lines
    assert "created connector plant-connector serving plant-mes" in first
    assert "wrote a new secret for connector plant-connector to var/plant-connector.secret" in first
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert home.store.verify_connector_secret("plant-connector", secret)
    owned = {d["name"]: d["connector"] for d in home.store.list_data_sources()}
    assert owned == {"edge-historian": None, "plant-mes": "plant-connector", "lab-lims": None}
    # Seeding again keeps the secret; a lost secret file gets a new secret, the old one dies.
    assert not any("connector" in line for line in policyd.ok("demo", "seed").lines)
    assert secret_file.read_text().strip() == secret
    secret_file.unlink()
    policyd.ok("demo", "seed")
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert not home.store.verify_connector_secret("plant-connector", secret)
    assert home.store.verify_connector_secret("plant-connector", secret_file.read_text().strip())
    # An operator's move of plant-mes away from the connector survives the next seed.
    policyd.ok("datasources", "set-connector", "plant-mes", "--none")
    policyd.ok("demo", "seed")
    assert {d["name"]: d["connector"] for d in home.store.list_data_sources()}["plant-mes"] is None


# -- check ---------------------------------------------------------------------------------


def test_check_exits_0_and_prints_the_decision_on_allow(ready: Policyd) -> None:
    result = _check(ready, _token(ready), TAGS_A)
    assert (result.code, result.err) == (0, "")
    assert result.lines[0] == "allow ALLOWED: allowed"
    details = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in result.lines[1:])}
    assert len(details.pop("decision")) == 36  # a UUID
    assert details.pop("policy").startswith("sha256:")
    assert details == {
        "rule": "tags-search",
        "action": "tags.search",
        "data sources": "ds-a",
        "user": "alice",
        "app": "app1",
        "scopes": "UserInfo DataRead",
    }


def test_check_exits_3_and_prints_the_reason_on_deny(ready: Policyd) -> None:
    result = _check(ready, _token(ready), TAGS_C)
    assert (result.code, result.err) == (3, "")
    assert (
        result.lines[0]
        == "deny DATA_SOURCE_NOT_GRANTED: data source 'ds-c' is not granted to this app"
    )


def test_check_without_a_token_is_a_token_missing_deny(ready: Policyd) -> None:
    result = ready("check", "--local", "--path", ME)
    assert (result.code, result.lines[0]) == (3, "deny TOKEN_MISSING: no access token")


def test_check_reads_the_token_from_stdin(ready: Policyd) -> None:
    result = ready("check", "--local", "--token", "-", "--path", ME, stdin=_token(ready) + "\n")
    assert result.code == 0


def test_check_action_with_data_sources(ready: Policyd) -> None:
    token = _token(ready)
    allowed = ready(
        "check", "--local", "--token", token, "--action", "tags.search", "--data-source", "ds-a"
    )
    assert allowed.code == 0
    denied = ready(
        "check",
        "--local",
        "--token",
        token,
        "--action",
        "tags.search",
        "--data-source",
        "ds-a",
        "--data-source",
        "ds-c",
    )
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny DATA_SOURCE_NOT_GRANTED")


def test_check_body_names_the_data_sources(ready: Policyd, home: Home) -> None:
    token = _token(ready)
    body = '{"tags": {"ds-a": ["T1"]}}'
    args = ("--method", "post", "--path", "/api/data/v2/raw")
    assert ready("check", "--local", "--token", token, *args, "--body", body).code == 0
    (home.root / "body.json").write_text('{"tags": {"ds-a": [], "ds-c": []}}')
    denied = ready("check", "--local", "--token", token, *args, "--body", "@body.json")
    assert (denied.code, denied.lines[0].split(":")[0]) == (3, "deny DATA_SOURCE_NOT_GRANTED")


# -- --json listings -----------------------------------------------------------------------

LISTINGS = {
    ("apps", "list"): {
        "client_id",
        "name",
        "redirect_uris",
        "allowed_scopes",
        "confidential",
        "enabled",
        "created_at",
    },
    ("apps", "show", "app1"): {
        "client_id",
        "name",
        "redirect_uris",
        "allowed_scopes",
        "confidential",
        "enabled",
        "created_at",
    },
    ("users", "list"): {"user_id", "name", "created_at"},
    ("datasources", "list"): {"name", "description", "labels", "connector"},
    ("datasources", "access"): {"user_id", "data_source", "role"},
    ("consents", "list"): {"user_id", "client_id", "scopes", "created_at", "updated_at"},
    ("grants", "list"): {
        "id",
        "user_id",
        "client_id",
        "data_source",
        "access",
        "granted_at",
        "revoked_at",
    },
    ("grants", "list", "--all"): {
        "id",
        "user_id",
        "client_id",
        "data_source",
        "access",
        "granted_at",
        "revoked_at",
    },
    ("keys", "list"): {"kid", "alg", "state", "created_at", "retired_at"},
}
SEEDED_COUNTS = {
    ("apps", "list"): 2,
    ("apps", "show", "app1"): 1,
    ("users", "list"): 2,
    ("datasources", "list"): 3,
    ("datasources", "access"): 3,
    ("consents", "list"): 2,
    ("grants", "list"): 2,
    ("grants", "list", "--all"): 2,
    ("keys", "list"): 1,
}


@pytest.mark.parametrize("args", list(LISTINGS), ids=" ".join)
def test_json_listing_prints_one_object_per_line_with_its_fields(
    on_seeded: Policyd, args: tuple[str, ...]
) -> None:
    result = on_seeded.ok(*args, "--json")
    rows = result.json_lines()
    assert len(rows) == SEEDED_COUNTS[args]
    for row in rows:
        assert set(row) == LISTINGS[args]


def test_check_json_prints_one_object_with_the_decision(on_seeded: Policyd, seeded: Home) -> None:
    policyd = on_seeded
    result = policyd("check", "--local", "--json", "--token", seeded.token(), "--path", TAGS_A)
    assert result.code == 0
    (row,) = result.json_lines()
    assert set(row) == {
        "allowed",
        "reason",
        "message",
        "decision_id",
        "rule_id",
        "action",
        "data_sources",
        "policy_version",
        "principal",
    }
    assert (row["allowed"], row["reason"], row["data_sources"]) == (True, "ALLOWED", ["ds-a"])
    denied = policyd("check", "--local", "--json", "--token", seeded.token(), "--path", TAGS_C)
    assert denied.code == 3
    assert denied.json_lines()[0]["reason"] == "DATA_SOURCE_NOT_GRANTED"


# -- connectors ----------------------------------------------------------------------------


def _connector_token(home: Home, connector_id: str) -> str:
    token, _ = issue_token(
        home.keyring,
        token_settings(home.config).for_link(),
        sub=connector_id,
        client_id=connector_id,
        scopes=["connector"],
    )
    return token


def _attach(policyd: Policyd, token: str, *data_sources: str) -> Result:
    sources = [a for d in data_sources for a in ("--data-source", d)]
    return policyd("check", "--local", "--token", token, "--action", "connector.attach", *sources)


def test_connectors_add_prints_the_secret_once_and_stores_only_its_hash(
    on_seeded: Policyd, seeded: Home
) -> None:
    result = on_seeded.ok("connectors", "add", "plant-1", "--name", "Plant One")
    assert result.lines[0] == "registered connector plant-1"
    prefix = "client secret (shown once, store it now): "
    assert result.lines[1].startswith(prefix)
    secret = result.lines[1][len(prefix) :]
    assert len(secret) >= 32 and seeded.store.verify_connector_secret("plant-1", secret)
    assert secret.encode() not in dump_store(seeded.store).encode()
    as_json = on_seeded.ok("connectors", "add", "plant-2", "--json").json_lines()
    assert set(as_json[0]) == {"connector_id", "secret"}
    assert seeded.store.verify_connector_secret("plant-2", str(as_json[0]["secret"]))
    listed = on_seeded.ok("connectors", "list", "--json").json_lines()
    assert [(r["connector_id"], r["name"], r["enabled"]) for r in listed] == [
        ("plant-1", "Plant One", True),
        ("plant-2", "plant-2", True),
    ]
    assert set(listed[0]) == {"connector_id", "name", "enabled", "created_at"}
    table = on_seeded.ok("connectors", "list").lines
    assert table[0].split() == ["CONNECTOR_ID", "NAME", "ENABLED"]
    assert table[1].split() == ["plant-1", "Plant", "One", "yes"]
    shown = (
        on_seeded.ok("connectors", "list").out + on_seeded.ok("connectors", "show", "plant-1").out
    )
    assert secret not in shown
    # One namespace with apps: an app may not take a connector's id.
    taken = on_seeded("apps", "add", "plant-1", "--name", "X", "--scope", "UserInfo")
    _assert_one_line_error(taken, 1)
    assert "'plant-1' is already the id of a connector" in taken.err


def test_connectors_show_lists_the_data_sources_it_serves(on_seeded: Policyd) -> None:
    on_seeded.ok("connectors", "add", "plant-1")
    added = on_seeded.ok("datasources", "add", "hist-1", "--connector", "plant-1").out
    assert added == "added data source hist-1 served by plant-1\n"
    assert on_seeded.ok("datasources", "set-connector", "ds-b", "plant-1").out == (
        "data source ds-b is served by connector plant-1\n"
    )
    (shown,) = on_seeded.ok("connectors", "show", "plant-1", "--json").json_lines()
    assert shown["data_sources"] == ["ds-b", "hist-1"] and shown["enabled"] is True
    fields = dict(
        line.split(":", 1) for line in on_seeded.ok("connectors", "show", "plant-1").lines
    )
    assert fields["data_sources"].strip() == "ds-b,hist-1"
    assert fields["created_at"].strip().endswith("Z")
    rows = {
        r["name"]: r["connector"]
        for r in on_seeded.ok("datasources", "list", "--json").json_lines()
    }
    assert rows == {"ds-a": None, "ds-b": "plant-1", "ds-c": None, "hist-1": "plant-1"}
    assert on_seeded.ok("datasources", "set-connector", "ds-b", "--none").out == (
        "data source ds-b is served by no connector\n"
    )
    (shown,) = on_seeded.ok("connectors", "show", "plant-1", "--json").json_lines()
    assert shown["data_sources"] == ["hist-1"]


def test_connectors_disable_set_connector_and_rotate_secret_decide_the_next_attach(
    on_seeded: Policyd, seeded: Home
) -> None:
    on_seeded.ok("connectors", "add", "plant-1")
    on_seeded.ok("datasources", "add", "hist-1", "--connector", "plant-1")
    token = _connector_token(seeded, "plant-1")
    allowed = _attach(on_seeded, token, "hist-1")
    assert (allowed.code, allowed.lines[0]) == (0, "allow ALLOWED: allowed"), allowed
    assert on_seeded.ok("connectors", "disable", "plant-1").out == "disabled connector plant-1\n"
    denied = _attach(on_seeded, token, "hist-1")
    assert (denied.code, denied.lines[0]) == (
        3,
        "deny CONNECTOR_DISABLED: connector 'plant-1' is disabled",
    )
    assert (
        on_seeded.ok("connectors", "show", "plant-1", "--json").json_lines()[0]["enabled"] is False
    )
    assert on_seeded.ok("connectors", "enable", "plant-1").out == "enabled connector plant-1\n"
    assert _attach(on_seeded, token, "hist-1").code == 0
    # Rotating the secret leaves issued tokens valid (disable stops them).
    (rotated,) = on_seeded.ok("connectors", "rotate-secret", "plant-1", "--json").json_lines()
    assert seeded.store.verify_connector_secret("plant-1", str(rotated["secret"]))
    plain = on_seeded.ok("connectors", "rotate-secret", "plant-1").out
    assert plain.startswith("new client secret (shown once, store it now): ")
    assert not seeded.store.verify_connector_secret("plant-1", str(rotated["secret"]))
    assert _attach(on_seeded, token, "hist-1").code == 0
    on_seeded.ok("datasources", "set-connector", "hist-1", "--none")
    taken = _attach(on_seeded, token, "hist-1")
    assert (taken.code, taken.lines[0].split(":")[0]) == (3, "deny DATA_SOURCE_NOT_OWNED")


# -- errors --------------------------------------------------------------------------------

BAD_INPUT: list[tuple[tuple[str, ...], int, str]] = [
    (("apps", "show", "nope"), 1, "policyd: error: no app 'nope'"),
    (("apps", "enable", "nope"), 1, "no app 'nope'"),
    (("apps", "rotate-secret", "app-off"), 1, "is public: it has no secret"),
    (("apps", "add", "app1", "--name", "Again", "--scope", "UserInfo"), 1, "already exists"),
    (("apps", "add", "x", "--name", "X", "--scope", "Bogus"), 1, "unknown scope(s): Bogus"),
    (
        ("apps", "add", "x", "--name", "X", "--scope", "UserInfo", "--redirect-uri", "ftp://x"),
        1,
        "redirect URI",
    ),
    (("apps", "add"), 2, "Missing argument 'CLIENT_ID'"),
    (("apps", "add", "x", "--scope", "UserInfo"), 2, "Missing option '--name'"),
    (("apps", "list", "--bogus"), 2, "No such option '--bogus'"),
    (("frobnicate",), 2, "No such command 'frobnicate'"),
    (("users", "add", "a b"), 1, "user id must be"),
    (("users", "add", "alice"), 1, "user 'alice' already exists"),
    (("datasources", "add", "x", "--label", "novalue"), 1, "label must be KEY=VALUE"),
    (("datasources", "give-access", "alice", "ds-a", "--role", "owner"), 2, "'--role'"),
    (("datasources", "give-access", "nobody", "ds-a"), 1, "no user 'nobody'"),
    (("datasources", "remove-access", "bob", "ds-a"), 1, "has no access"),
    (("consents", "add", "alice", "nope", "--scope", "UserInfo"), 1, "no app 'nope'"),
    (("consents", "revoke", "bob", "app1"), 1, "no consent"),
    (("grants", "add", "alice", "app1", "ds-c", "--access", "admin"), 2, "'--access'"),
    (("grants", "add", "alice", "app1", "ds-nope"), 1, "no data source 'ds-nope'"),
    (("grants", "revoke", "alice", "app1", "ds-c"), 1, "no live grant"),
    (("keys", "retire", "nope"), 1, "no signing key 'nope'"),
    (("keys", "rotate", "--alg", "HS256"), 2, "'--alg'"),
    (
        ("tokens", "issue", "--user", "alice", "--app", "nope", "--scope", "UserInfo"),
        1,
        "no app 'nope'",
    ),
    (
        ("tokens", "issue", "--user", "alice", "--app", "app1", "--scope", "Bogus"),
        1,
        "not registered for Bogus",
    ),
    (
        (
            "tokens",
            "issue",
            "--user",
            "alice",
            "--app",
            "app1",
            "--scope",
            "UserInfo",
            "--ttl",
            "0",
        ),
        2,
        "'--ttl'",
    ),
    (("tokens", "revoke", "not-a-jwt"), 1, "not a JWT access token"),
    (("tokens", "revoke", "@missing.token"), 1, "No such file or directory: missing.token"),
    (("check", "--token", "@missing.token", "--path", ME), 1, "No such file or directory"),
    (("check", "--local", "--token", "x"), 2, "give exactly one of --path and --action"),
    (("check", "--local", "--path", ME, "--action", "user.profile"), 2, "exactly one"),
    (("check", "--local", "--path", ME, "--data-source", "ds-a"), 2, "--data-source goes"),
    (
        (
            "check",
            "--local",
            "--path",
            "/api/data/v2/raw",
            "--method",
            "POST",
            "--body",
            "@missing.json",
        ),
        1,
        "No such file or directory",
    ),
    (("connectors", "show", "nope"), 1, "policyd: error: no connector 'nope'"),
    (("connectors", "disable", "nope"), 1, "no connector 'nope'"),
    (("connectors", "enable", "nope"), 1, "no connector 'nope'"),
    (("connectors", "rotate-secret", "nope"), 1, "no connector 'nope'"),
    (("connectors", "add", "app1"), 1, "'app1' is already the id of an app"),
    (("connectors", "add", "a/b"), 1, "connector id must be"),
    (("datasources", "add", "ds-x", "--connector", "nope"), 1, "no connector 'nope'"),
    (("datasources", "set-connector", "ds-nope", "--none"), 1, "no data source 'ds-nope'"),
    (("datasources", "set-connector", "ds-a", "nope"), 1, "no connector 'nope'"),
    (("datasources", "set-connector", "ds-a"), 2, "exactly one of CONNECTOR_ID and --none"),
    (("serve", "--address", "nowhere"), 1, "server.address must be HOST:PORT"),
    (("serve", "--workers", "0"), 2, "'--workers'"),
    (("demo", "seed", "--token-file", "."), 2, "'--token-file'"),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), BAD_INPUT, ids=[" ".join(a) for a, _, _ in BAD_INPUT]
)
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(
    on_seeded: Policyd, args: tuple[str, ...], code: int, message: str
) -> None:
    result = on_seeded(*args)
    _assert_one_line_error(result, code)
    assert message in result.err
    assert result.out == ""


def test_usage_error_names_the_command_and_its_help(policyd: Policyd) -> None:
    result = policyd("grants", "add", "alice")
    _assert_one_line_error(result, 2)
    assert result.err == (
        "policyd grants add: error: Missing argument 'CLIENT_ID'."
        " (see 'policyd grants add --help')\n"
    )


def test_check_against_a_server_that_is_not_running_is_one_line_and_exit_1(
    policyd: Policyd,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = policyd("check", "--server", address, "--token", "x", "--path", ME)
    _assert_one_line_error(result, 1)
    assert result.err == f"policyd: error: cannot reach policyd at {address}: UNAVAILABLE\n"


BAD_CONFIGS: list[tuple[str, str]] = [
    ("[server\n", "is not valid TOML"),
    ("[server]\nadress = '127.0.0.1:1'\n", "unknown config key 'server.adress'"),
    ("[server]\nworkers = 'two'\n", "config key 'server.workers' must be int"),
    ("[server]\naddress = 'nowhere'\n", "server.address must be HOST:PORT"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_file_is_one_line_and_exit_1(
    policyd: Policyd, home: Home, text: str, message: str
) -> None:
    bad = home.root / "bad.toml"
    bad.write_text(text)
    result = policyd("--config", str(bad), "apps", "list", config=False)
    _assert_one_line_error(result, 1)
    assert message in result.err


def test_missing_config_file_is_one_line_and_exit_1(policyd: Policyd, home: Home) -> None:
    result = policyd("--config", "missing.toml", "users", "list", config=False)
    _assert_one_line_error(result, 1)
    assert result.err == (
        "policyd: error: cannot read config missing.toml: No such file or directory\n"
    )


def test_bad_env_value_is_one_line_and_exit_1(
    policyd: Policyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICYD_SERVER_WORKERS", "many")
    result = policyd("users", "list")
    _assert_one_line_error(result, 1)
    assert "POLICYD_SERVER_WORKERS must be int" in result.err


def test_policyd_config_env_selects_the_config_file(
    ready: Policyd, monkeypatch: pytest.MonkeyPatch, home: Home
) -> None:
    monkeypatch.setenv("POLICYD_CONFIG", str(home.config_path))
    monkeypatch.chdir("/")
    assert ready("users", "list", "--json", config=False).json_lines()[0]["user_id"] == "alice"


def test_config_file_that_is_not_utf8_is_a_config_error(policyd: Policyd, home: Home) -> None:
    bad = home.root / "binary.toml"
    bad.write_bytes(b"\xff\xfe[server]\n")
    result = policyd("--config", str(bad), "users", "list", config=False)
    _assert_one_line_error(result, 1)


def test_token_file_that_is_not_text_is_an_error(policyd: Policyd, home: Home) -> None:
    (home.root / "binary.token").write_bytes(b"\xff\xfe\x00")
    result = policyd("check", "--local", "--token", "@binary.token", "--path", ME)
    _assert_one_line_error(result, 1)


def test_check_body_that_is_not_utf8_is_a_deny_not_an_internal_error(ready: Policyd) -> None:
    body = b'{"tags": {"\xff": []}}'.decode("utf-8", "surrogateescape")  # as argv decodes it
    result = ready(
        "check",
        "--local",
        "--token",
        _token(ready),
        "--method",
        "POST",
        "--path",
        "/api/data/v2/raw",
        "--body",
        body,
    )
    assert "internal error" not in result.err
    assert result.code == 3


# -- the real command (subprocesses) -------------------------------------------------------


def test_real_command_sets_up_a_fresh_home_and_decides(home: Home) -> None:
    steps: list[tuple[str, ...]] = [
        ("apps", "add", "app1", "--name", "App", "--scope", "UserInfo", "--scope", "DataRead"),
        ("users", "add", "alice"),
        ("datasources", "add", "ds-a"),
        ("datasources", "give-access", "alice", "ds-a"),
        ("consents", "add", "alice", "app1", "--scope", "UserInfo", "--scope", "DataRead"),
        ("grants", "add", "alice", "app1", "ds-a"),
        ("keys", "rotate"),
    ]
    outputs = []
    for args in steps:
        result = home.cli(*args)
        assert (result.returncode, result.stderr) == (0, ""), (args, result.stderr)
        outputs.append(result.stdout)
    secret = outputs[0].splitlines()[1].split(": ")[1]
    home.store.close()
    assert not any(secret.encode() in p.read_bytes() for p in home.root.glob("policyd.db*"))
    issued = home.cli("tokens", "issue", "--user", "alice", "--app", "app1", "--scope", "DataRead")
    assert issued.returncode == 0
    (home.root / "alice.token").write_text(issued.stdout)
    allow = home.cli("check", "--local", "--token", "@alice.token", "--path", TAGS_A)
    assert (allow.returncode, allow.stdout.splitlines()[0]) == (0, "allow ALLOWED: allowed")
    deny = home.cli("check", "--local", "--token", "@alice.token", "--path", ME)
    assert (deny.returncode, deny.stdout.splitlines()[0]) == (
        3,
        "deny SCOPE_MISSING: requires scope UserInfo",
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("apps", "list", "--bogus"), 2),
        (("apps", "show", "nope"), 1),
        (("check", "--local", "--token", "@missing.token", "--path", ME), 1),
    ],
    ids=["unknown option", "unknown app", "missing token file"],
)
def test_real_command_errors_are_one_line_without_traceback(
    home: Home, args: tuple[str, ...], code: int
) -> None:
    result = home.cli(*args)
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert "Traceback" not in result.stderr


def test_real_command_against_a_server_that_is_not_running_is_one_line(home: Home) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = home.cli("check", "--server", address, "--token", "x", "--path", ME)
    assert result.returncode == 1
    assert result.stderr == f"policyd: error: cannot reach policyd at {address}: UNAVAILABLE\n"


def test_real_command_with_a_bad_config_file_is_one_line(home: Home) -> None:
    home.config_path.write_text("[server]\nworkers = 'two'\n")
    result = home.cli("users", "list")
    assert result.returncode == 1
    assert result.stderr == "policyd: error: config key 'server.workers' must be int, not 'two'\n"


def test_check_against_a_running_server_exits_0_on_allow_and_3_on_deny(seeded: Home) -> None:
    (seeded.root / "alice.token").write_text(seeded.token())
    with run_server(seeded) as server:
        base = ("check", "--server", server.address, "--token", "@alice.token")
        allow = seeded.cli(*base, "--path", TAGS_A)
        deny = seeded.cli(*base, "--path", TAGS_C, "--json")
        action = seeded.cli(*base, "--action", "tags.search", "--data-source", "ds-b")
    assert (allow.returncode, allow.stderr) == (0, "")
    assert allow.stdout.splitlines()[0] == "allow ALLOWED: allowed"
    assert (deny.returncode, deny.stderr) == (3, "")
    decision = json.loads(deny.stdout)
    assert (decision["reason"], decision["rule_id"]) == ("DATA_SOURCE_NOT_GRANTED", "tags-search")
    assert decision["principal"]["sub"] == "alice"
    assert (action.returncode, action.stderr) == (0, "")


def test_real_command_help_and_version(home: Home) -> None:
    helped = home.cli("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: policyd")
    version = home.cli("--version")
    assert (version.returncode, version.stdout) == (0, "policyd, version 0.1.0\n")


def test_cluster_status_shows_the_generation_and_no_replica_without_servers(home: Home) -> None:
    result = home.cli("cluster", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["replicas"] == [] and status["generation"] == home.store.generation()
    text = home.cli("cluster", "status").stdout
    expected = "live replica(s)" if home.store_url else "SQLite, one host: no replicas"
    assert expected in text
