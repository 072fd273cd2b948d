"""The engine's contract as one table: `Engine.decide` over plain data, in this process.

Each row sets up a store, a token and a request, and names the decision it must get: the
reason code (allowed exactly when it is ALLOWED) and, where it matters, the rule. The rows
cover every reason code the engine can give and every edge of the check order at the top of
policyd/decision/engine.py: a request that fails two adjacent checks gets the earlier one's reason.
Each row runs on a freshly seeded home (tests.helpers.Home.seed) with real tokens signed by
its real keys, the repo's default policy (policies/) and an engine from
policyd.decision.wiring.build_engine; nothing is mocked. The meta-tests at the end fail when a
reason or a pair of adjacent checks has no row. The built-in action connector.attach, with
its own order (engine.py), has rows of its own at the end of the table.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwt.api_jws import PyJWS

from policyd.core.model import (
    CONNECTOR_ATTACH,
    CONNECTOR_ATTACH_RULE,
    Access,
    ActionTarget,
    CheckInput,
    HttpTarget,
)
from policyd.core.reasons import Reason
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import build_engine, token_settings
from policyd.store.keys import PrivateKey, generate_private_key
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.helpers import ROOT, Home

Token = Callable[[Home], str]
Change = Callable[[Home], None]

# Reasons that no decision of the engine carries, each with why.
NOT_FROM_THE_ENGINE = {
    # The decider (decider.py) gives it when the audit log cannot take the record of a
    # decision; the engine decides without recording (tests/test_audit.py,
    # tests/test_reasons_over_grpc.py).
    Reason.AUDIT_UNAVAILABLE,
}

# The checks in the order of engine.py's docstring (1-9).
ORDER = (
    "route lookup",  # 1: found first only so that public routes need no token
    "token",  # 2
    "token id",  # 3: not revoked
    "app",  # 4
    "consent",  # 5
    "route rule",  # 6: else NO_ROUTE, or the request's shape problem held back from 1
    "scopes",  # 7
    "data sources",  # 8
    "conditions",  # 9
)
# The parts of a check, in order (docs/reason-codes.md), for rows that set two parts of one
# check against each other; named "check: part".
PARTS = {
    "token": (
        "present",
        "size and shape",
        "alg accepted",
        "kid",
        "alg of the key",
        "signature",
        "payload",
        "typ",
        "claims",
        "iss",
        "aud",
        "exp",
        "nbf",
    ),
    # Both parts of the app check, and of the consent check, cannot fail at once: an app
    # that is not registered has no enabled flag, a missing consent covers nothing.
    "app": ("registered", "enabled"),
    "consent": ("present", "covers the scopes"),
    "data sources": ("names", "granted", "access level", "user access"),
}


# -- requests ------------------------------------------------------------------------------


def get(path: str) -> HttpTarget:
    return HttpTarget("GET", path)


def put(path: str) -> HttpTarget:
    return HttpTarget("PUT", path)


def post(path: str, body: bytes) -> HttpTarget:
    return HttpTarget("POST", path, body=body)


def tags_body(*names: str) -> bytes:
    return json.dumps({"tags": {name: ["T1"] for name in names}}).encode()


ME = get("/api/user/me")
INFO = get("/api/info")
TAGS_A = get("/api/data/tags/ds-a")
TAGS_C = get("/api/data/tags/ds-c")
NOWHERE = get("/api/nothing")
AMBIGUOUS = get("/api/data/tags/ds-c%2F..%2Fds-a")
SNAPSHOT = "/api/data/v2/snapshot"
# One byte over the default engine.max_body_bytes (1 MiB).
TOO_LARGE = b'{"tags": {"ds-a": []}, "pad": "' + b"x" * (1 << 20) + b'"}'

# -- tokens --------------------------------------------------------------------------------


def literal(text: str) -> Token:
    return lambda home: text


def issued(**kw: Any) -> Token:
    """A token from the home's active key (Home.token: alice, app1, UserInfo DataRead)."""
    return lambda home: home.token(**kw)


NO_TOKEN = literal("")
GARBAGE = literal("not-a-jwt")
READ = issued()
USER_INFO_ONLY = issued(scopes=("UserInfo",))
WRITE = issued(scopes=("DataWrite",))
BOB = issued(sub="bob")  # bob consented to no app
GHOST_APP = issued(client_id="ghost-app")
APP_OFF = issued(client_id="app-off", scopes=("UserInfo",))
BOB_APP_OFF = issued(sub="bob", client_id="app-off")
BEYOND_CONSENT = issued(scopes=("UserInfo", "AccountDebit"))  # alice never consented to it


def expired(home: Home) -> str:
    """A token that expired an hour ago (issued now, not at import: rows may run late)."""
    return home.token(now=time.time() - 7200, ttl_seconds=3600)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(
    *,
    signer: str = "home",
    header: dict[str, Any] | None = None,
    payload: bytes | None = None,
    from_now: dict[str, int] | None = None,
    **claims: Any,
) -> Token:
    """A token built field by field: the home's valid claims for alice through app1
    (UserInfo DataRead) with `claims` over them (None removes one) and the times in
    `from_now` (seconds from when the token is made, not from import), under a header
    naming the home's active key (`header` over it, None removes), signed by `signer`:
    "home" (the active key), "another-es256" or "another-rs256" (a key of the same or
    another algorithm that the store does not know), or "nobody" (no signature, as with
    alg none)."""

    def make(home: Home) -> str:
        active = home.keyring.signing_key()
        key: PrivateKey | None
        alg = active.alg
        if signer == "home":
            key = active.private_key
        elif signer == "another-es256":
            key = generate_private_key("ES256")
        elif signer == "another-rs256":
            alg, key = "RS256", generate_private_key("RS256")
        else:
            assert signer == "nobody", signer
            key = None
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": home.config.tokens.issuer,
            "sub": "alice",
            "aud": home.config.tokens.audience,
            "exp": now + 600,
            "iat": now,
            "jti": f"jti-{time.monotonic_ns()}",
            "client_id": "app1",
            "scope": "UserInfo DataRead",
            **claims,
            **{name: now + seconds for name, seconds in (from_now or {}).items()},
        }
        head = {"alg": alg, "typ": "at+jwt", "kid": active.kid, **(header or {})}
        signing_input = (
            b64url(json.dumps({k: v for k, v in head.items() if v is not None}).encode())
            + "."
            + b64url(
                payload
                if payload is not None
                else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
            )
        )
        signature = (
            b""
            if key is None
            else PyJWS().get_algorithm_by_name(alg).sign(signing_input.encode(), key)
        )
        return f"{signing_input}.{b64url(signature)}"

    return make


def revoked(token: Token) -> Token:
    """`token`, with its id revoked in the store."""

    def make(home: Home) -> str:
        made = token(home)
        claims = jwt.decode(made, options={"verify_signature": False})
        home.store.revoke_token(claims["jti"], claims["exp"])
        return made

    return make


def of_a_retired_key(home: Home) -> str:
    """A token signed by the key that was active, now rotated out and retired."""
    made = home.token()
    old = home.keyring.signing_key().kid
    home.keyring.rotate()
    home.keyring.retire(old)
    return made


BROKEN_KID = "broken-key"


def with_a_broken_key_row(home: Home) -> None:
    """A signing key row whose public half is not a key: only an internal fault follows."""
    pem = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    home.store.add_signing_key(BROKEN_KID, "ES256", pem, "retiring")


# -- store changes -------------------------------------------------------------------------


def without_the_generation_table(home: Home) -> None:
    """The store can no longer be read: every decision needs its generation first."""
    home.store.close()
    with contextlib.closing(sqlite3.connect(home.config.store.path)) as db:
        db.execute("DROP TABLE generation")
        db.commit()


def ds_c_granted_but_alice_lost_access(home: Home) -> None:
    home.store.add_grant("alice", "app1", "ds-c", Access.READ)
    home.store.remove_user_access("alice", "ds-c")


def alice_lowered_to_read_on_ds_a(home: Home) -> None:
    home.store.set_user_access("alice", "ds-a", Access.READ)


def alice_may_write_ds_b(home: Home) -> None:
    home.store.set_user_access("alice", "ds-b", Access.WRITE)


def ds_d_neither_granted_nor_accessible(home: Home) -> None:
    home.store.add_data_source("ds-d")


def safety_system(grant: Access | None, own: Access = Access.WRITE) -> Change:
    """ds-safety, labelled class=safety (the default policy's deny condition: no writes),
    which alice has `own` access to and granted to app1 at `grant` (None: not granted)."""

    def change(home: Home) -> None:
        home.store.add_data_source("ds-safety", "interlocks", {"class": "safety"})
        home.store.set_user_access("alice", "ds-safety", own)
        if grant is not None:
            home.store.add_grant("alice", "app1", "ds-safety", grant)

    return change


PUT_SAFETY = put("/api/data/v2/snapshot/ds-safety")

# Written without the `"site" in labels` guard: fails on a data source without the label.
NORTH_SITE_ONLY = """\
  - id: north-site-only
    effect: deny
    routes: [tags-search]
    when: data_source.labels["site"] != "north"
"""

# -- connectors ------------------------------------------------------------------------------

ATTACH = CONNECTOR_ATTACH_RULE


def attach_target(*data_sources: str) -> ActionTarget:
    return ActionTarget(CONNECTOR_ATTACH, data_sources)


ATTACH_HIST = attach_target("hist-1")


def connector_token(connector_id: str, sub: str = "") -> Token:
    """A connector's token as the authorization server's client credentials grant makes it
    (with `sub`, one it never makes: of another subject than the client)."""

    def make(home: Home) -> str:
        token, _ = issue_token(
            home.keyring,
            token_settings(home.config).for_link(),
            sub=sub or connector_id,
            client_id=connector_id,
            scopes=["connector"],
        )
        return token

    return make


PLANT = connector_token("plant-1")


def plants(home: Home) -> None:
    """plant-1 serves hist-1, plant-2 serves hist-2; ds-a, b and c are the hub's."""
    for n in ("1", "2"):
        home.store.add_connector(f"plant-{n}")
        home.store.add_data_source(f"hist-{n}", connector=f"plant-{n}")


def plant_1_disabled(home: Home) -> None:
    home.store.set_connector_enabled("plant-1", False)


PLANTS: tuple[Change, ...] = (plants,)

# -- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    target: HttpTarget | ActionTarget | None
    reason: Reason
    # The rule the decision names ("" for none); None where the row does not pin it.
    rule: str | None = None
    token: Token = READ
    given: tuple[Change, ...] = ()
    # The two checks the request fails (or, for a public route, would fail), earlier first.
    edge: tuple[str, str] | None = None
    # Appended to the default policy's conditions.
    extra_conditions: str = ""

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED


TABLE = [
    # -- allowed ---------------------------------------------------------------------------
    Row("profile", ME, Reason.ALLOWED, "user-profile"),
    Row("granted-data-source-in-the-path", TAGS_A, Reason.ALLOWED, "tags-search"),
    Row(
        "granted-data-sources-in-the-body",
        post(SNAPSHOT, tags_body("ds-a", "ds-b")),
        Reason.ALLOWED,
        "values-snapshot",
    ),
    Row(
        "write-to-a-write-granted-data-source",
        put("/api/data/v2/snapshot/ds-a"),
        Reason.ALLOWED,
        "values-write-snapshot",
        WRITE,
    ),
    Row("listing-the-granted", get("/api/data/datasources"), Reason.ALLOWED, "datasources-list"),
    Row("action", ActionTarget("tags.search", ("ds-a",)), Reason.ALLOWED, "tags-search"),
    Row(
        "read-of-a-safety-system",
        get("/api/data/tags/ds-safety"),
        Reason.ALLOWED,
        "tags-search",
        given=(safety_system(Access.WRITE),),
    ),
    # -- 1. public routes need no token (nor a store) ---------------------------------------
    Row(
        "public-route-without-a-token",
        INFO,
        Reason.ALLOWED,
        "service-info",
        NO_TOKEN,
        edge=("route lookup", "token"),
    ),
    Row(
        "public-route-with-a-garbage-token",
        INFO,
        Reason.ALLOWED,
        "service-info",
        GARBAGE,
        edge=("route lookup", "token"),
    ),
    Row(
        "public-route-with-an-expired-token",
        INFO,
        Reason.ALLOWED,
        "service-info",
        expired,
        edge=("route lookup", "token"),
    ),
    Row(
        "public-route-with-a-revoked-token-of-a-disabled-app",
        INFO,
        Reason.ALLOWED,
        "service-info",
        revoked(APP_OFF),
        edge=("route lookup", "token id"),
    ),
    Row(
        "public-action-without-a-token",
        ActionTarget("service.info"),
        Reason.ALLOWED,
        "service-info",
        NO_TOKEN,
        edge=("route lookup", "token"),
    ),
    Row(
        "public-route-with-the-store-unreadable",
        INFO,
        Reason.ALLOWED,
        "service-info",
        NO_TOKEN,
        given=(without_the_generation_table,),
    ),
    # -- 2. the token ----------------------------------------------------------------------
    Row("no-token", ME, Reason.TOKEN_MISSING, token=NO_TOKEN),
    Row("garbage-token", ME, Reason.TOKEN_MALFORMED, token=GARBAGE),
    Row(
        "validly-signed-token-over-max-token-bytes",
        ME,
        Reason.TOKEN_MALFORMED,
        token=issued(extra_claims={"pad": "x" * 9000}),
    ),
    Row("token-of-a-retired-key", ME, Reason.TOKEN_KEY_UNKNOWN, token=of_a_retired_key),
    Row(
        "alg-none",
        ME,
        Reason.TOKEN_ALGORITHM_INVALID,
        token=hand_signed(signer="nobody", header={"alg": "none"}),
    ),
    Row(
        "signed-by-a-key-the-store-does-not-know",
        ME,
        Reason.TOKEN_SIGNATURE_INVALID,
        token=hand_signed(signer="another-es256"),
    ),
    Row("typ-jwt", ME, Reason.TOKEN_TYPE_INVALID, token=hand_signed(header={"typ": "JWT"})),
    Row("no-jti", ME, Reason.TOKEN_CLAIM_INVALID, token=hand_signed(jti=None)),
    Row(
        "other-issuer",
        ME,
        Reason.TOKEN_ISSUER_MISMATCH,
        token=issued(extra_claims={"iss": "https://evil.test"}),
    ),
    Row(
        "other-audience",
        ME,
        Reason.TOKEN_AUDIENCE_MISMATCH,
        token=issued(extra_claims={"aud": "another-hub"}),
    ),
    Row("expired", ME, Reason.TOKEN_EXPIRED, token=expired),
    Row(
        "nbf-in-the-future",
        ME,
        Reason.TOKEN_NOT_YET_VALID,
        token=hand_signed(from_now={"nbf": 3600}),
    ),
    # The parts of the token check, two at a time.
    Row(
        "alg-none-over-max-token-bytes",
        ME,
        Reason.TOKEN_MALFORMED,
        token=hand_signed(signer="nobody", header={"alg": "none"}, pad="x" * 9000),
        edge=("token: size and shape", "token: alg accepted"),
    ),
    Row(
        "alg-none-and-an-unknown-kid",
        ME,
        Reason.TOKEN_ALGORITHM_INVALID,
        token=hand_signed(signer="nobody", header={"alg": "none", "kid": "no-such-key"}),
        edge=("token: alg accepted", "token: kid"),
    ),
    Row(
        "unknown-kid-and-a-foreign-signature",
        ME,
        Reason.TOKEN_KEY_UNKNOWN,
        token=hand_signed(signer="another-es256", header={"kid": "no-such-key"}),
        edge=("token: kid", "token: signature"),
    ),
    Row(
        "rs256-under-an-es256-key-and-a-foreign-signature",
        ME,
        Reason.TOKEN_ALGORITHM_INVALID,
        token=hand_signed(signer="another-rs256"),
        edge=("token: alg of the key", "token: signature"),
    ),
    Row(
        "foreign-signature-and-payload-not-json",
        ME,
        Reason.TOKEN_SIGNATURE_INVALID,
        token=hand_signed(signer="another-es256", payload=b"not json"),
        edge=("token: signature", "token: payload"),
    ),
    Row(
        "payload-not-json-and-typ-jwt",
        ME,
        Reason.TOKEN_MALFORMED,
        token=hand_signed(payload=b"not json", header={"typ": "JWT"}),
        edge=("token: payload", "token: typ"),
    ),
    Row(
        "typ-jwt-and-no-jti",
        ME,
        Reason.TOKEN_TYPE_INVALID,
        token=hand_signed(header={"typ": "JWT"}, jti=None),
        edge=("token: typ", "token: claims"),
    ),
    Row(
        "no-jti-and-another-issuer",
        ME,
        Reason.TOKEN_CLAIM_INVALID,
        token=hand_signed(jti=None, iss="https://evil.test"),
        edge=("token: claims", "token: iss"),
    ),
    Row(
        "another-issuer-and-another-audience",
        ME,
        Reason.TOKEN_ISSUER_MISMATCH,
        token=hand_signed(iss="https://evil.test", aud="another-hub"),
        edge=("token: iss", "token: aud"),
    ),
    Row(
        "another-audience-and-expired",
        ME,
        Reason.TOKEN_AUDIENCE_MISMATCH,
        token=hand_signed(aud="another-hub", from_now={"exp": -3600}),
        edge=("token: aud", "token: exp"),
    ),
    Row(
        "expired-and-nbf-in-the-future",
        ME,
        Reason.TOKEN_EXPIRED,
        token=hand_signed(from_now={"exp": -3600, "nbf": 3600}),
        edge=("token: exp", "token: nbf"),
    ),
    # -- 3. the token id -------------------------------------------------------------------
    Row("revoked", ME, Reason.TOKEN_REVOKED, token=revoked(READ)),
    Row(
        "expired-and-revoked",
        ME,
        Reason.TOKEN_EXPIRED,
        token=revoked(expired),
        edge=("token", "token id"),
    ),
    # -- 4. the app ------------------------------------------------------------------------
    Row("unregistered-app", ME, Reason.APP_UNKNOWN, token=GHOST_APP),
    Row("disabled-app", ME, Reason.APP_DISABLED, token=APP_OFF),
    Row(
        "revoked-token-of-a-disabled-app",
        ME,
        Reason.TOKEN_REVOKED,
        token=revoked(APP_OFF),
        edge=("token id", "app"),
    ),
    Row(
        "revoked-token-of-an-unregistered-app",
        ME,
        Reason.TOKEN_REVOKED,
        token=revoked(GHOST_APP),
        edge=("token id", "app"),
    ),
    # -- 5. the consent --------------------------------------------------------------------
    Row("no-consent", ME, Reason.CONSENT_MISSING, token=BOB),
    Row("scope-beyond-the-consent", ME, Reason.CONSENT_INSUFFICIENT, token=BEYOND_CONSENT),
    Row(
        "disabled-app-without-consent",
        ME,
        Reason.APP_DISABLED,
        token=BOB_APP_OFF,
        edge=("app", "consent"),
    ),
    # -- 6. the route rule, and the problems held back from step 1 -------------------------
    Row("no-route", NOWHERE, Reason.NO_ROUTE, ""),
    Row("method-without-a-route", put("/api/user/me"), Reason.NO_ROUTE, ""),
    Row("unknown-action", ActionTarget("tags.delete", ("ds-a",)), Reason.NO_ROUTE, ""),
    Row("unknown-method", HttpTarget("FETCH", "/api/user/me"), Reason.REQUEST_INVALID, ""),
    Row("relative-path", get("api/user/me"), Reason.REQUEST_INVALID, ""),
    Row("neither-http-nor-action", None, Reason.REQUEST_INVALID, ""),
    Row("encoded-slash-and-dot-dot", AMBIGUOUS, Reason.PATH_AMBIGUOUS, ""),
    Row("trailing-slash", get("/api/data/tags/ds-a/"), Reason.PATH_AMBIGUOUS, ""),
    Row(
        "no-route-without-a-token",
        NOWHERE,
        Reason.TOKEN_MISSING,
        token=NO_TOKEN,
        edge=("token", "route rule"),
    ),
    Row(
        "ambiguous-path-with-an-expired-token",
        AMBIGUOUS,
        Reason.TOKEN_EXPIRED,
        token=expired,
        edge=("token", "route rule"),
    ),
    Row(
        "unknown-method-with-a-garbage-token",
        HttpTarget("FETCH", "/api/user/me"),
        Reason.TOKEN_MALFORMED,
        token=GARBAGE,
        edge=("token", "route rule"),
    ),
    Row(
        "neither-http-nor-action-without-a-token",
        None,
        Reason.TOKEN_MISSING,
        token=NO_TOKEN,
        edge=("token", "route rule"),
    ),
    Row(
        "no-route-with-a-revoked-token",
        NOWHERE,
        Reason.TOKEN_REVOKED,
        token=revoked(READ),
        edge=("token id", "route rule"),
    ),
    Row(
        "ambiguous-path-of-an-unregistered-app",
        AMBIGUOUS,
        Reason.APP_UNKNOWN,
        token=GHOST_APP,
        edge=("app", "route rule"),
    ),
    Row(
        "unknown-method-of-a-disabled-app",
        HttpTarget("FETCH", "/api/user/me"),
        Reason.APP_DISABLED,
        token=APP_OFF,
        edge=("app", "route rule"),
    ),
    Row(
        "no-route-without-consent",
        NOWHERE,
        Reason.CONSENT_MISSING,
        token=BOB,
        edge=("consent", "route rule"),
    ),
    Row(
        "ambiguous-path-with-a-scope-beyond-the-consent",
        AMBIGUOUS,
        Reason.CONSENT_INSUFFICIENT,
        token=BEYOND_CONSENT,
        edge=("consent", "route rule"),
    ),
    # -- 7. the rule's scopes --------------------------------------------------------------
    Row("no-read-scope", TAGS_A, Reason.SCOPE_MISSING, "tags-search", USER_INFO_ONLY),
    Row(
        "no-write-scope",
        put("/api/data/v2/snapshot/ds-a"),
        Reason.SCOPE_MISSING,
        "values-write-snapshot",
        READ,
    ),
    Row(
        "no-route-for-a-token-without-the-scopes",
        HttpTarget("DELETE", "/api/data/tags/ds-a"),
        Reason.NO_ROUTE,
        "",
        USER_INFO_ONLY,
        edge=("route rule", "scopes"),
    ),
    Row(
        "ambiguous-path-for-a-token-without-the-scopes",
        get("/api/data/tags/ds-a/"),
        Reason.PATH_AMBIGUOUS,
        "",
        USER_INFO_ONLY,
        edge=("route rule", "scopes"),
    ),
    # -- 8. the data sources ---------------------------------------------------------------
    Row("ungranted", TAGS_C, Reason.DATA_SOURCE_NOT_GRANTED, "tags-search"),
    Row(
        "ungranted-in-the-body",
        post(SNAPSHOT, tags_body("ds-a", "ds-c")),
        Reason.DATA_SOURCE_NOT_GRANTED,
        "values-snapshot",
    ),
    Row(
        "ungranted-in-an-action",
        ActionTarget("tags.search", ("ds-a", "ds-c")),
        Reason.DATA_SOURCE_NOT_GRANTED,
        "tags-search",
    ),
    Row(
        "write-to-a-read-grant",
        put("/api/data/v2/snapshot/ds-b"),
        Reason.DATA_SOURCE_ACCESS_INSUFFICIENT,
        "values-write-snapshot",
        WRITE,
        given=(alice_may_write_ds_b,),
    ),
    Row(
        "grant-without-the-users-own-access",
        TAGS_C,
        Reason.USER_ACCESS_MISSING,
        "tags-search",
        given=(ds_c_granted_but_alice_lost_access,),
    ),
    Row(
        "write-grant-of-a-user-lowered-to-read",
        put("/api/data/v2/snapshot/ds-a"),
        Reason.USER_ACCESS_MISSING,
        "values-write-snapshot",
        WRITE,
        given=(alice_lowered_to_read_on_ds_a,),
    ),
    Row(
        "duplicate-key-in-the-body",
        post(SNAPSHOT, b'{"tags": {"ds-a": ["T1"], "ds-a": ["T2"]}}'),
        Reason.BODY_INVALID,
        "values-snapshot",
    ),
    Row("body-not-json", post(SNAPSHOT, b"not json"), Reason.BODY_INVALID, "values-snapshot"),
    Row("body-over-the-limit", post(SNAPSHOT, TOO_LARGE), Reason.BODY_TOO_LARGE, "values-snapshot"),
    Row(
        "body-naming-no-data-source",
        post(SNAPSHOT, b'{"tags": {}}'),
        Reason.REQUEST_INVALID,
        "values-snapshot",
    ),
    Row(
        "action-without-its-data-sources",
        ActionTarget("tags.search"),
        Reason.REQUEST_INVALID,
        "tags-search",
    ),
    Row(
        "no-read-scope-and-an-ungranted-data-source",
        TAGS_C,
        Reason.SCOPE_MISSING,
        "tags-search",
        USER_INFO_ONLY,
        edge=("scopes", "data sources"),
    ),
    Row(
        "no-write-scope-and-a-read-grant",
        put("/api/data/v2/snapshot/ds-b"),
        Reason.SCOPE_MISSING,
        "values-write-snapshot",
        READ,
        edge=("scopes", "data sources"),
    ),
    Row(
        "no-read-scope-and-a-body-not-json",
        post(SNAPSHOT, b"not json"),
        Reason.SCOPE_MISSING,
        "values-snapshot",
        USER_INFO_ONLY,
        edge=("scopes", "data sources"),
    ),
    Row(
        "no-read-scope-and-a-body-over-the-limit",
        post(SNAPSHOT, TOO_LARGE),
        Reason.SCOPE_MISSING,
        "values-snapshot",
        USER_INFO_ONLY,
        edge=("scopes", "data sources"),
    ),
    Row(
        "no-read-scope-and-an-action-without-its-data-sources",
        ActionTarget("tags.search"),
        Reason.SCOPE_MISSING,
        "tags-search",
        USER_INFO_ONLY,
        edge=("scopes", "data sources"),
    ),
    # The parts of the data-source check, two at a time.
    Row(
        "duplicate-key-naming-an-ungranted-data-source",
        post(SNAPSHOT, b'{"tags": {"ds-c": ["T1"], "ds-c": ["T2"]}}'),
        Reason.BODY_INVALID,
        "values-snapshot",
        edge=("data sources: names", "data sources: granted"),
    ),
    Row(
        "action-with-an-empty-name-after-an-ungranted-one",
        ActionTarget("tags.search", ("ds-c", "")),
        Reason.REQUEST_INVALID,
        "tags-search",
        edge=("data sources: names", "data sources: granted"),
    ),
    Row(
        "ungranted-and-not-accessible-to-the-user",
        get("/api/data/tags/ds-d"),
        Reason.DATA_SOURCE_NOT_GRANTED,
        "tags-search",
        given=(ds_d_neither_granted_nor_accessible,),
        edge=("data sources: granted", "data sources: user access"),
    ),
    Row(
        "write-to-a-read-grant-of-a-user-who-may-only-read",
        put("/api/data/v2/snapshot/ds-b"),
        Reason.DATA_SOURCE_ACCESS_INSUFFICIENT,
        "values-write-snapshot",
        WRITE,
        edge=("data sources: access level", "data sources: user access"),
    ),
    # -- 9. the conditions -----------------------------------------------------------------
    Row(
        "write-to-a-safety-system",
        PUT_SAFETY,
        Reason.CONDITION_DENIED,
        "values-write-snapshot",
        WRITE,
        given=(safety_system(Access.WRITE),),
    ),
    Row(
        "condition-that-cannot-be-evaluated",
        TAGS_A,
        Reason.CONDITION_ERROR,
        "tags-search",
        extra_conditions=NORTH_SITE_ONLY,
    ),
    Row(
        "write-to-an-ungranted-safety-system",
        PUT_SAFETY,
        Reason.DATA_SOURCE_NOT_GRANTED,
        "values-write-snapshot",
        WRITE,
        given=(safety_system(None),),
        edge=("data sources", "conditions"),
    ),
    Row(
        "write-to-a-read-granted-safety-system",
        PUT_SAFETY,
        Reason.DATA_SOURCE_ACCESS_INSUFFICIENT,
        "values-write-snapshot",
        WRITE,
        given=(safety_system(Access.READ),),
        edge=("data sources", "conditions"),
    ),
    Row(
        "write-to-a-safety-system-the-user-may-only-read",
        PUT_SAFETY,
        Reason.USER_ACCESS_MISSING,
        "values-write-snapshot",
        WRITE,
        given=(safety_system(Access.WRITE, own=Access.READ),),
        edge=("data sources", "conditions"),
    ),
    Row(
        "ungranted-data-source-and-a-condition-that-cannot-be-evaluated",
        TAGS_C,
        Reason.DATA_SOURCE_NOT_GRANTED,
        "tags-search",
        extra_conditions=NORTH_SITE_ONLY,
        edge=("data sources", "conditions"),
    ),
    # -- any exception is a deny -----------------------------------------------------------
    Row(
        "store-that-cannot-be-read",
        ME,
        Reason.STORE_UNAVAILABLE,
        token=READ,
        given=(without_the_generation_table,),
    ),
    Row(
        "key-row-whose-public-key-does-not-parse",
        ME,
        Reason.INTERNAL_ERROR,
        token=hand_signed(header={"kid": BROKEN_KID}),
        given=(with_a_broken_key_row,),
    ),
    # -- the built-in connector.attach (engine.py's second order; docs/connectors.md) -------
    Row("connector-attaches-what-it-serves", ATTACH_HIST, Reason.ALLOWED, ATTACH, PLANT, PLANTS),
    Row("attach-with-an-apps-token", ATTACH_HIST, Reason.TOKEN_AUDIENCE_MISMATCH, ATTACH, READ),
    Row("a-connectors-token-for-an-app-request", ME, Reason.TOKEN_AUDIENCE_MISMATCH, None, PLANT),
    Row(
        "attach-by-no-connector",
        ATTACH_HIST,
        Reason.CONNECTOR_UNKNOWN,
        ATTACH,
        connector_token("ghost-plant"),
        PLANTS,
    ),
    Row(
        "attach-by-an-apps-id",
        ATTACH_HIST,
        Reason.CONNECTOR_UNKNOWN,
        ATTACH,
        connector_token("app1"),
        PLANTS,
    ),
    Row(
        "attach-by-a-disabled-connector-of-another-data-source",
        attach_target("ds-a"),
        Reason.CONNECTOR_DISABLED,
        ATTACH,
        PLANT,
        (*PLANTS, plant_1_disabled),
    ),
    Row(
        "attach-by-a-revoked-token-of-a-disabled-connector",
        ATTACH_HIST,
        Reason.TOKEN_REVOKED,
        ATTACH,
        revoked(PLANT),
        (*PLANTS, plant_1_disabled),
    ),
    Row(
        "attach-of-the-hubs-data-source",
        attach_target("hist-1", "ds-a"),
        Reason.DATA_SOURCE_NOT_OWNED,
        ATTACH,
        PLANT,
        PLANTS,
    ),
    Row(
        "attach-of-another-connectors-data-source",
        attach_target("hist-2"),
        Reason.DATA_SOURCE_NOT_OWNED,
        ATTACH,
        PLANT,
        PLANTS,
    ),
    Row(
        "attach-of-an-unknown-data-source",
        attach_target("nowhere"),
        Reason.DATA_SOURCE_NOT_OWNED,
        ATTACH,
        PLANT,
        PLANTS,
    ),
    Row("attach-of-nothing", attach_target(), Reason.REQUEST_INVALID, ATTACH, PLANT, PLANTS),
    Row(
        "attach-by-a-link-token-of-another-subject",
        ATTACH_HIST,
        Reason.TOKEN_CLAIM_INVALID,
        ATTACH,
        connector_token("plant-1", sub="alice"),
        PLANTS,
    ),
    Row(
        "attach-of-nothing-by-no-connector",
        attach_target(),
        Reason.CONNECTOR_UNKNOWN,
        ATTACH,
        connector_token("ghost-plant"),
        PLANTS,
    ),
]


def home_for(row: Row, tmp_path: Path) -> Home:
    """A seeded home on the default policy (with the row's extra conditions, if any)."""
    extra_config = ""
    if row.extra_conditions:
        folder = tmp_path / "policies"
        folder.mkdir()
        hub = (ROOT / "policies" / "hub.yaml").read_text()
        (folder / "hub.yaml").write_text(hub + row.extra_conditions)
        extra_config = f'[policy]\ndir = "{folder}"\n'
    home = Home(tmp_path, extra_config=extra_config)
    home.seed()
    return home


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_each_request_gets_the_reason_of_its_first_failing_check(row: Row, tmp_path: Path) -> None:
    home = home_for(row, tmp_path)
    for change in row.given:
        change(home)
    token = row.token(home)
    engine = build_engine(home.config, home.store)
    decision = engine.decide(CheckInput(token, row.target, request_id="contract"))
    assert (decision.reason.name, decision.allowed) == (row.reason.name, row.allowed), (
        decision.message
    )
    if row.rule is not None:
        assert decision.rule_id == row.rule
    assert decision.decision_id
    assert decision.policy_version == engine.policy.version
    if not decision.allowed:
        assert decision.data_sources == ()
    if row.reason.is_token_problem and row.reason is not Reason.TOKEN_REVOKED:
        assert decision.principal is None  # the token did not verify


# -- the meta-tests ------------------------------------------------------------------------


def test_every_reason_the_engine_can_give_has_a_row() -> None:
    names = [row.name for row in TABLE]
    assert len(set(names)) == len(names), "row names must be unique (they are the test ids)"
    in_table = {row.reason for row in TABLE}
    missing = sorted(r.name for r in set(Reason) - NOT_FROM_THE_ENGINE - in_table)
    assert not missing, f"reasons the engine can give without a row: {missing}"
    assert not in_table & NOT_FROM_THE_ENGINE


def _position(check: str) -> tuple[int, int]:
    """Where a check ("scopes") or a part of one ("token: kid") comes in the order."""
    step, _, part = check.partition(": ")
    return ORDER.index(step), PARTS[step].index(part) if part else -1


def test_every_pair_of_adjacent_checks_has_a_row() -> None:
    edges = [row.edge for row in TABLE if row.edge is not None]
    for earlier, later in edges:
        assert _position(earlier) < _position(later), f"{earlier} does not come before {later}"
    pairs = set(itertools.pairwise(ORDER))
    for step, parts in PARTS.items():
        if step not in ("app", "consent"):  # no request fails both parts (see PARTS)
            pairs |= {(f"{step}: {a}", f"{step}: {b}") for a, b in itertools.pairwise(parts)}
    # Parts of one check that cannot both fail: an empty token has no shape; a header that
    # names no known key has no key whose algorithm it could differ from; a data source
    # without a grant has no access level to fall short.
    pairs -= {
        ("token: present", "token: size and shape"),
        ("token: kid", "token: alg of the key"),
        ("data sources: granted", "data sources: access level"),
    }
    missing = sorted(pairs - set(edges))
    assert not missing, f"adjacent checks without a row failing both: {missing}"
