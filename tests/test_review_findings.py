"""Defects found in review, each pinned by a test."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import jwt
import pytest

from policyd.audit import masked_path
from policyd.cli import main
from policyd.facts import Facts
from policyd.model import HttpTarget
from policyd.store import Store
from tests.helpers import Home


def test_caches_see_a_revocation_after_the_shm_file_was_recreated(tmp_path: Path) -> None:
    """facts._CommitWatch: when every connection of the process has closed (per-thread
    connections close when their thread ends), SQLite deletes `<db>-shm`; the next
    connection makes a new one. A map of the old file never changed again, so the caches
    were served after a revocation had committed (fail open)."""
    db = tmp_path / "policyd.db"
    store = Store(db)
    store.close()
    facts = Facts(store)
    seen: list[bool] = []

    def decide() -> None:
        seen.append(facts.view().token_revoked("jti-1"))
        store.close()  # as when a worker thread ends

    for _ in range(2):
        worker = threading.Thread(target=decide)
        worker.start()
        worker.join()
        if not seen[-1]:
            writer = Store(db, migrate=False)
            with writer.write() as conn:
                conn.execute(
                    "INSERT INTO revoked_tokens (jti, expires_at, revoked_at)"
                    " VALUES ('jti-1', 9e9, 0)"
                )
            writer.close()
    assert seen == [False, True]


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


def test_audit_masks_query_values_left_in_the_path() -> None:
    """audit.masked_path: a Decision API caller that leaves the query in `http.path` (the
    engine denies it, PATH_AMBIGUOUS) had its query values, e.g. an access_token, stored
    verbatim in the audit log."""
    target = HttpTarget("GET", "/api/data/tags/x?access_token=SECRET#frag", "a=b", {}, b"")
    method, path = masked_path(target)
    assert "SECRET" not in path and "frag" not in path
    assert (method, path) == ("GET", "/api/data/tags/x?access_token=*&a=*")
