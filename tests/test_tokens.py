"""Access-token verification over a real gRPC socket: each bad token gets its own reason.

Tokens are built by hand (header, payload, signature) so that every field can be wrong in
exactly one way; they are signed with the home's real private keys. Key rotation,
retirement and revocation are written to the store by this (test) process while a
separate `policyd serve` process answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.api_jws import PyJWS

from policyd.core.errors import InvalidInput
from policyd.core.reasons import Reason
from policyd.gen.v1 import decision_pb2
from policyd.store.keys import PrivateKey, SigningKey
from tests.helpers import Home, ServerProcess, check_request, decision_stub, run_server

# -- helpers -------------------------------------------------------------------------------


class Client:
    """A typed Decision client over a real socket."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = decision_stub(channel)

    def check(self, token: str, path: str = "/api/user/me") -> decision_pb2.CheckResponse:
        response: decision_pb2.CheckResponse = self._stub.Check(
            check_request(token, path=path), timeout=10
        )
        return response


@contextmanager
def connect(server: ServerProcess) -> Iterator[Client]:
    with grpc.insecure_channel(server.address) as channel:
        yield Client(channel)


@contextmanager
def serving(home: Home) -> Iterator[Client]:
    """A server process of its own for a test that changes keys or revocations."""
    with run_server(home) as server, connect(server) as client:
        yield client


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def jws(header: dict[str, Any], payload: dict[str, Any] | bytes, key: PrivateKey, alg: str) -> str:
    """A compact JWS signed with `key` under `alg`, whatever the header says."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url_json(header)}.{b64url(body)}"
    signature = PyJWS().get_algorithm_by_name(alg).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url(signature)}"


def claims_for(home: Home, **overrides: Any) -> dict[str, Any]:
    """Valid claims for alice through app1 (UserInfo DataRead), with overrides."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": home.config.tokens.issuer,
        "sub": "alice",
        "aud": home.config.tokens.audience,
        "exp": now + 600,
        "iat": now,
        "jti": secrets.token_urlsafe(12),
        "client_id": "app1",
        "scope": "UserInfo DataRead",
    }
    claims.update(overrides)
    return claims


def header_for(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    header.update(overrides)
    return header


def signed(key: SigningKey, claims: dict[str, Any] | bytes, **header: Any) -> str:
    return jws(header_for(key, **header), claims, key.private_key, key.alg)


def reason_of(response: decision_pb2.CheckResponse) -> Reason:
    return Reason(response.reason)


def assert_token_denied(response: decision_pb2.CheckResponse, reason: Reason) -> None:
    assert reason.is_token_problem
    assert reason_of(response) is reason, response.message
    assert not response.allowed
    # The token never verified, so the response names no principal.
    assert not response.HasField("principal")


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[Client]:
    with connect(shared_server) as c:
        yield c


@pytest.fixture(scope="module")
def key(shared_home: Home) -> SigningKey:
    """The shared home's active ES256 signing key (private half included)."""
    return shared_home.keyring.signing_key()


# -- the baseline --------------------------------------------------------------------------


def test_hand_signed_valid_token_is_allowed(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    claims = claims_for(shared_home)
    response = client.check(signed(key, claims))
    assert response.allowed, response.message
    assert reason_of(response) is Reason.ALLOWED
    assert response.principal.sub == "alice"
    assert response.principal.client_id == "app1"
    assert list(response.principal.scopes) == ["UserInfo", "DataRead"]
    assert response.principal.jti == claims["jti"]


def test_issued_token_is_allowed(shared_home: Home, client: Client) -> None:
    response = client.check(shared_home.token())
    assert reason_of(response) is Reason.ALLOWED


# -- shape ---------------------------------------------------------------------------------


def test_empty_token_is_missing(client: Client) -> None:
    assert_token_denied(client.check(""), Reason.TOKEN_MISSING)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        " ",
        "!!!.@@@.###",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",  # JWE compact form
        "..",
        f"{b64url(b'not json')}.{b64url(b'{}')}.sig",
        f"{b64url_json(['ES256'])}.{b64url(b'{}')}.sig",
    ],
)
def test_token_that_is_not_a_compact_jws_is_malformed(token: str, client: Client) -> None:
    assert_token_denied(client.check(token), Reason.TOKEN_MALFORMED)


def test_token_with_non_ascii_characters_is_malformed_before_any_parsing(
    shared_home: Home, client: Client
) -> None:
    head, body, sig = shared_home.token().split(".")
    response = client.check(f"{head}.{body}é.{sig}")
    assert_token_denied(response, Reason.TOKEN_MALFORMED)
    assert response.message == "token is not ASCII"


def test_token_with_bearer_prefix_is_malformed(shared_home: Home, client: Client) -> None:
    assert_token_denied(client.check("Bearer " + shared_home.token()), Reason.TOKEN_MALFORMED)


def test_100_kb_token_is_malformed_even_when_validly_signed(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, pad="x" * 100_000))
    assert len(token) > 100_000
    assert_token_denied(client.check(token), Reason.TOKEN_MALFORMED)


@pytest.mark.parametrize("payload", [b"not json", b'["a", "list"]', b"", b"null"])
def test_signed_payload_that_is_not_a_json_object_is_malformed(
    payload: bytes, key: SigningKey, client: Client
) -> None:
    assert_token_denied(client.check(signed(key, payload)), Reason.TOKEN_MALFORMED)


def test_non_string_kid_is_malformed(shared_home: Home, key: SigningKey, client: Client) -> None:
    assert_token_denied(
        client.check(signed(key, claims_for(shared_home), kid=123)), Reason.TOKEN_MALFORMED
    )


def test_unsupported_critical_header_is_malformed(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home), crit=["exp"])
    assert_token_denied(client.check(token), Reason.TOKEN_MALFORMED)


# -- algorithm, key and signature ---------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_unsigned_alg_none_token_is_refused(
    alg: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = f"{b64url_json(header_for(key, alg=alg))}.{b64url_json(claims_for(shared_home))}."
    assert_token_denied(client.check(token), Reason.TOKEN_ALGORITHM_INVALID)


def test_token_without_alg_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    header = header_for(key)
    del header["alg"]
    token = jws(header, claims_for(shared_home), key.private_key, key.alg)
    assert_token_denied(client.check(token), Reason.TOKEN_ALGORITHM_INVALID)


def test_hs256_signed_with_the_public_key_pem_is_refused(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    """The classic key-confusion attack: the verifier's public key used as an HMAC secret."""
    (row,) = [k for k in shared_home.store.list_signing_keys() if k.kid == key.kid]
    signing_input = (
        f"{b64url_json(header_for(key, alg='HS256'))}.{b64url_json(claims_for(shared_home))}"
    )
    mac = hmac.new(row.public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    assert_token_denied(client.check(token), Reason.TOKEN_ALGORITHM_INVALID)


@pytest.mark.parametrize("alg", ["ES384", "ES512", "PS256", "RS512", "HS512", "ES256K"])
def test_algorithm_outside_the_allowlist_is_refused(
    alg: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = jws(header_for(key, alg=alg), claims_for(shared_home), key.private_key, key.alg)
    assert_token_denied(client.check(token), Reason.TOKEN_ALGORITHM_INVALID)


def test_allowed_algorithm_other_than_the_keys_own_is_refused(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    """An RS256 token naming the ES256 key: the kid's one algorithm decides, not the header."""
    assert key.alg == "ES256"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jws(header_for(key, alg="RS256"), claims_for(shared_home), rsa_key, "RS256")
    assert_token_denied(client.check(token), Reason.TOKEN_ALGORITHM_INVALID)


@pytest.mark.parametrize("kid", ["no-such-kid", "", "../keys/x"])
def test_unknown_kid_is_refused(
    kid: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home), kid=kid)
    assert_token_denied(client.check(token), Reason.TOKEN_KEY_UNKNOWN)


def test_token_without_kid_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    header = header_for(key)
    del header["kid"]
    token = jws(header, claims_for(shared_home), key.private_key, key.alg)
    assert_token_denied(client.check(token), Reason.TOKEN_KEY_UNKNOWN)


def test_token_signed_by_another_key_of_the_same_algorithm_is_refused(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    token = jws(header_for(key), claims_for(shared_home), forger, "ES256")
    assert_token_denied(client.check(token), Reason.TOKEN_SIGNATURE_INVALID)


def test_tampered_payload_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    token = signed(key, claims_for(shared_home, sub="bob"))
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url_json(claims_for(shared_home))}.{signature}"
    assert_token_denied(client.check(forged), Reason.TOKEN_SIGNATURE_INVALID)


def test_tampered_header_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    token = signed(key, claims_for(shared_home))
    _, payload, signature = token.split(".")
    forged = f"{b64url_json(header_for(key, x5u='https://evil.test/'))}.{payload}.{signature}"
    assert_token_denied(client.check(forged), Reason.TOKEN_SIGNATURE_INVALID)


def test_tampered_signature_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    header, payload, signature = signed(key, claims_for(shared_home)).split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged = f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    assert_token_denied(client.check(forged), Reason.TOKEN_SIGNATURE_INVALID)


def test_stripped_signature_is_refused(shared_home: Home, key: SigningKey, client: Client) -> None:
    header, payload, _ = signed(key, claims_for(shared_home)).split(".")
    assert_token_denied(client.check(f"{header}.{payload}."), Reason.TOKEN_SIGNATURE_INVALID)


# -- typ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["JWT", "jwt", "id_token+jwt", "", None])
def test_token_that_is_not_an_access_token_is_refused(
    typ: str | None, shared_home: Home, key: SigningKey, client: Client
) -> None:
    header = header_for(key, typ=typ)
    if typ is None:
        del header["typ"]
    token = jws(header, claims_for(shared_home), key.private_key, key.alg)
    assert_token_denied(client.check(token), Reason.TOKEN_TYPE_INVALID)


def test_full_media_type_typ_is_accepted(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    response = client.check(signed(key, claims_for(shared_home), typ="application/at+jwt"))
    assert reason_of(response) is Reason.ALLOWED


# -- claims --------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"])
def test_each_missing_required_claim_is_claim_invalid(
    claim: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    claims = claims_for(shared_home)
    del claims[claim]
    assert_token_denied(client.check(signed(key, claims)), Reason.TOKEN_CLAIM_INVALID)


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"])
def test_each_null_required_claim_is_claim_invalid(
    claim: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, **{claim: None}))
    assert_token_denied(client.check(token), Reason.TOKEN_CLAIM_INVALID)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": ""},
        {"client_id": 123},
        {"client_id": ""},
        {"client_id": ["app1"]},
        {"jti": ""},
        {"scope": ["UserInfo", "DataRead"]},
        {"scope": 1},
        {"iat": "yesterday"},
        {"aud": ""},
    ],
    ids=repr,
)
def test_wrong_typed_or_empty_claim_is_claim_invalid(
    overrides: dict[str, Any], shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, **overrides))
    assert_token_denied(client.check(token), Reason.TOKEN_CLAIM_INVALID)


@pytest.mark.parametrize("overrides", [{"sub": 123}, {"jti": 123}, {"sub": ["alice"]}], ids=repr)
def test_non_string_sub_or_jti_is_claim_invalid(
    overrides: dict[str, Any], shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, **overrides))
    assert_token_denied(client.check(token), Reason.TOKEN_CLAIM_INVALID)


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "tomorrow"},
        {"nbf": "today"},
        {"exp": str(int(time.time()) + 600)},
        {"exp": 10**400},
        {"exp": True},
    ],
    ids=["exp-text", "nbf-text", "exp-numeric-string", "exp-huge", "exp-true"],
)
def test_wrong_typed_time_claim_is_claim_invalid(
    overrides: dict[str, Any], shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, **overrides))
    assert_token_denied(client.check(token), Reason.TOKEN_CLAIM_INVALID)


def test_claim_that_is_not_valid_unicode_is_a_deny_response(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    response = client.check(signed(key, claims_for(shared_home, sub="\ud800")))
    assert reason_of(response) is Reason.TOKEN_CLAIM_INVALID


@pytest.mark.parametrize(("claim", "value"), [("iss", 7), ("aud", 7), ("aud", ["hub-test", 7])])
def test_issuer_or_audience_of_the_wrong_type_is_a_claim_error(
    claim: str, value: Any, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, **{claim: value}))
    assert_token_denied(client.check(token), Reason.TOKEN_CLAIM_INVALID)


@pytest.mark.parametrize("iss", ["https://evil.test", "https://auth.test/", "HTTPS://AUTH.TEST"])
def test_wrong_issuer_is_refused(
    iss: str, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, iss=iss))
    assert_token_denied(client.check(token), Reason.TOKEN_ISSUER_MISMATCH)


@pytest.mark.parametrize("aud", ["other-hub", ["other-hub", "x"], "hub-test "], ids=repr)
def test_wrong_audience_is_refused(
    aud: Any, shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, aud=aud))
    assert_token_denied(client.check(token), Reason.TOKEN_AUDIENCE_MISMATCH)


def test_audience_list_naming_this_hub_is_accepted(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, aud=["other-hub", "hub-test"]))
    assert reason_of(client.check(token)) is Reason.ALLOWED


# -- time ----------------------------------------------------------------------------------


def test_token_expired_well_past_the_leeway_is_refused(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    now = int(time.time())
    token = signed(key, claims_for(shared_home, iat=now - 7200, exp=now - 3600))
    assert_token_denied(client.check(token), Reason.TOKEN_EXPIRED)


def test_token_expired_within_the_leeway_is_accepted(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    assert shared_home.config.tokens.leeway_seconds >= 20
    now = int(time.time())
    token = signed(key, claims_for(shared_home, iat=now - 600, exp=now - 5))
    assert reason_of(client.check(token)) is Reason.ALLOWED


def test_token_with_nbf_in_the_future_is_not_yet_valid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, nbf=int(time.time()) + 3600))
    assert_token_denied(client.check(token), Reason.TOKEN_NOT_YET_VALID)


def test_token_with_iat_in_the_future_is_not_yet_valid(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    now = int(time.time())
    token = signed(key, claims_for(shared_home, iat=now + 3600, exp=now + 7200))
    assert_token_denied(client.check(token), Reason.TOKEN_NOT_YET_VALID)


def test_token_with_nbf_within_the_leeway_is_accepted(
    shared_home: Home, key: SigningKey, client: Client
) -> None:
    token = signed(key, claims_for(shared_home, nbf=int(time.time()) + 5))
    assert reason_of(client.check(token)) is Reason.ALLOWED


# -- keys: algorithms, rotation, retirement ------------------------------------------------


def test_rs256_and_eddsa_keys_are_accepted_after_rotation(seeded: Home) -> None:
    with serving(seeded) as client:
        es_token = seeded.token()
        rs_kid = seeded.keyring.rotate("RS256")
        rs_token = seeded.token()
        ed_kid = seeded.keyring.rotate("EdDSA")
        ed_token = seeded.token()
        assert jwt.get_unverified_header(rs_token)["alg"] == "RS256"
        assert jwt.get_unverified_header(rs_token)["kid"] == rs_kid
        assert jwt.get_unverified_header(ed_token)["alg"] == "EdDSA"
        assert jwt.get_unverified_header(ed_token)["kid"] == ed_kid
        for token in (es_token, rs_token, ed_token):
            response = client.check(token)
            assert reason_of(response) is Reason.ALLOWED, response.message


def test_token_whose_header_alg_differs_from_its_keys_alg_is_refused(seeded: Home) -> None:
    with serving(seeded) as client:
        es_kid = seeded.keyring.signing_key().kid
        seeded.keyring.rotate("RS256")
        rs_key = seeded.keyring.signing_key()
        seeded.keyring.rotate("EdDSA")
        ed_key = seeded.keyring.signing_key()
        claims = claims_for(seeded)
        # Signed by the RS256 key, but naming the ES256 key.
        rs_as_es = jws(header_for(rs_key, kid=es_kid), claims, rs_key.private_key, "RS256")
        # Signed by the EdDSA key, but naming the RS256 key.
        ed_as_rs = jws(header_for(ed_key, kid=rs_key.kid), claims, ed_key.private_key, "EdDSA")
        # Naming the EdDSA key with its right alg: accepted (the control).
        ed_ok = jws(header_for(ed_key), claims, ed_key.private_key, "EdDSA")
        assert_token_denied(client.check(rs_as_es), Reason.TOKEN_ALGORITHM_INVALID)
        assert_token_denied(client.check(ed_as_rs), Reason.TOKEN_ALGORITHM_INVALID)
        assert reason_of(client.check(ed_ok)) is Reason.ALLOWED


def test_rotation_signs_with_the_new_key_and_the_old_key_still_verifies(seeded: Home) -> None:
    with serving(seeded) as client:
        old_kid = seeded.keyring.signing_key().kid
        old_token = seeded.token()
        assert reason_of(client.check(old_token)) is Reason.ALLOWED
        new_kid = seeded.keyring.rotate()
        new_token = seeded.token()
        assert new_kid != old_kid
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid
        states = {k.kid: k.state for k in seeded.store.list_signing_keys()}
        assert states == {old_kid: "retiring", new_kid: "active"}
        assert reason_of(client.check(old_token)) is Reason.ALLOWED
        assert reason_of(client.check(new_token)) is Reason.ALLOWED


def test_retired_key_denies_its_cached_tokens_on_the_very_next_check(seeded: Home) -> None:
    with serving(seeded) as client:
        old_kid = seeded.keyring.signing_key().kid
        old_token = seeded.token()
        # Twice: the second answer comes from the server's verified-token cache.
        assert reason_of(client.check(old_token)) is Reason.ALLOWED
        assert reason_of(client.check(old_token)) is Reason.ALLOWED
        seeded.keyring.rotate()
        new_token = seeded.token()
        assert reason_of(client.check(new_token)) is Reason.ALLOWED
        seeded.keyring.retire(old_kid)
        assert_token_denied(client.check(old_token), Reason.TOKEN_KEY_UNKNOWN)
        assert reason_of(client.check(new_token)) is Reason.ALLOWED


def test_active_key_cannot_be_retired(home: Home) -> None:
    kid = home.keyring.rotate()
    with pytest.raises(InvalidInput):
        home.keyring.retire(kid)
    assert [k.state for k in home.store.list_signing_keys()] == ["active"]


# -- revocation ----------------------------------------------------------------------------


def test_revoked_token_is_denied_on_the_next_check_after_a_cached_allow(seeded: Home) -> None:
    with serving(seeded) as client:
        token = seeded.token()
        other = seeded.token()
        assert reason_of(client.check(token)) is Reason.ALLOWED
        assert reason_of(client.check(token)) is Reason.ALLOWED  # now cached
        claims = unverified_claims(token)
        seeded.store.revoke_token(claims["jti"], claims["exp"])
        response = client.check(token)
        assert not response.allowed
        assert reason_of(response) is Reason.TOKEN_REVOKED
        # The token itself verified: the deny names whose token it was.
        assert response.principal.jti == claims["jti"]
        assert response.principal.sub == "alice"
        assert reason_of(client.check(other)) is Reason.ALLOWED


# -- JWKS ----------------------------------------------------------------------------------


def test_jwks_lists_verifying_keys_and_each_jwk_verifies_its_own_tokens(home: Home) -> None:
    settings = home.config.tokens
    tokens: dict[str, str] = {}
    for alg in ("ES256", "RS256", "EdDSA", "ES256"):
        kid = home.keyring.rotate(alg)
        tokens[kid] = home.token()
    first, *rest = tokens
    before = {jwk["kid"] for jwk in home.keyring.jwks()["keys"]}
    assert before == set(tokens)  # the active key and every retiring one

    home.keyring.retire(first)
    jwks = home.keyring.jwks()["keys"]
    assert [jwk["kid"] for jwk in jwks] == rest
    kty = {"ES256": "EC", "RS256": "RSA", "EdDSA": "OKP"}
    for jwk in jwks:
        assert jwk["use"] == "sig"
        assert jwk["kty"] == kty[jwk["alg"]]
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)  # no private parts
        claims = jwt.decode(
            tokens[jwk["kid"]],
            jwt.PyJWK(jwk),
            algorithms=[jwk["alg"]],
            audience=settings.audience,
            issuer=settings.issuer,
        )
        assert claims["sub"] == "alice"
    # The newest ES256 JWK does not verify the retired ES256 key's token.
    newest = jwks[-1]
    assert newest["alg"] == "ES256"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            tokens[first],
            jwt.PyJWK(newest),
            algorithms=["ES256"],
            audience=settings.audience,
            issuer=settings.issuer,
        )
