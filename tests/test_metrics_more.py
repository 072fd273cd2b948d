"""Metrics outside the decision path, counted by real processes and read from a scrape of
`policyd serve`'s /metrics (docs/metrics.md): the policy's reloads, the audit journals and
indexer, the authorization server; and the ASGI middleware's own counters."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from adapters.asgi import PolicydMiddleware
from policyd.audit.journal import AuditLog, Indexer
from policyd.audit.records import load_key
from policyd.core.policy import load_policy
from tests.asgi_server import serve_asgi
from tests.helpers import Home, check_request, decision_stub, free_port, run_server
from tests.metrics_support import parse, scrape, value, wait_scraped, with_metrics
from tests.oauth_support import Browser, Flow, csrf_token, exchange, oauth_home, refresh
from tests.test_asgi import Recorder, bearer, echo_app
from tests.test_audit import _record
from tests.test_policy_reload import broken, make_setup, renamed


def reloads(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], result: str) -> float:
    return value(samples, "policyd_policy_reloads_total", result=result) or 0.0


def test_a_rejected_policy_change_counts_a_failure_and_keeps_the_version(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, watch_seconds=0.1)
    original = setup.hub.read_text()
    first = load_policy(setup.folder).version
    address = with_metrics(setup.home)
    started = time.time()
    with run_server(setup.home):
        samples = scrape(address)
        assert value(samples, "policyd_policy_info", version=first) == 1
        loaded = value(samples, "policyd_policy_last_load_timestamp_seconds")
        assert loaded is not None and started - 1 < loaded <= time.time()
        assert reloads(samples, "success") == reloads(samples, "failure") == 0

        setup.write(broken(original, "bad"))
        samples = wait_scraped(address, lambda s: reloads(s, "failure") >= 1, what="the failure")
        time.sleep(0.5)  # a watcher that rejected a version does not count it again
        samples = scrape(address)
        assert reloads(samples, "failure") == 1
        assert reloads(samples, "success") == 0
        assert value(samples, "policyd_policy_info", version=first) == 1
        assert value(samples, "policyd_policy_last_load_timestamp_seconds") == loaded

        second = setup.write(renamed(original, "b"))
        samples = wait_scraped(address, lambda s: reloads(s, "success") == 1, what="the reload")
        assert value(samples, "policyd_policy_info", version=second) == 1
        assert value(samples, "policyd_policy_info", version=first) == 0
        newer = value(samples, "policyd_policy_last_load_timestamp_seconds")
        assert newer is not None and loaded is not None and newer > loaded
        assert reloads(samples, "failure") == 1


def test_every_answered_decision_is_counted_written_then_indexed(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    address = with_metrics(home)
    token = home.token()
    with run_server(home) as server:
        # The indexer's gauges are there before any traffic (its first pass sets them).
        samples = wait_scraped(
            address,
            lambda s: value(s, "policyd_audit_lag_seconds") is not None,
            what="the indexer's gauges",
        )
        assert value(samples, "policyd_audit_backlog_records") == 0
        with grpc.insecure_channel(server.address) as channel:
            stub = decision_stub(channel)
            for path in ["/api/data/tags/ds-a"] * 5 + ["/api/data/tags/ds-c"] * 3:
                stub.Check(check_request(token, path=path), timeout=10)

        def settled(s: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bool:
            indexed = value(s, "policyd_audit_records_indexed_total")
            # Written: counted by the serving process, in its files at its next flush.
            return indexed == 8 and value(s, "policyd_audit_records_written_total") == 8

        samples = wait_scraped(address, settled, what="8 records indexed")
        assert value(samples, "policyd_audit_records_written_total") == 8
        written = value(samples, "policyd_audit_bytes_written_total")
        journals = Path(home.config.audit.path + ".journal")
        assert written is not None and written > 8 * 100
        # The gauges are of the last pass, which found nothing left.
        samples = wait_scraped(
            address,
            lambda s: value(s, "policyd_audit_backlog_records") == 0,
            what="an empty backlog",
        )
        lag = value(samples, "policyd_audit_lag_seconds")
        assert lag is not None and lag < 1.0
        assert value(samples, "policyd_audit_verify_failures_total") == 0
        assert journals.is_dir()


def test_the_indexer_says_and_counts_when_the_chain_lost_its_newest_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    key = load_key(tmp_path / "audit.key", create=True)
    log = AuditLog(path, key)
    log.start()  # an indexer apart does the indexing, as under a server
    indexer = Indexer(path, key)
    try:
        for _ in range(3):
            log.record(_record())
        assert indexer.run_once() == 3
        log.record(_record())
        assert indexer.run_once() == 1
        assert indexer.chain_breaks == 0
        with sqlite3.connect(path) as conn:  # someone deletes the newest two records
            conn.execute("DELETE FROM audit WHERE seq >= 3")
        conn.close()
        log.record(_record())
        with caplog.at_level(logging.ERROR, logger="policyd.audit.journal"):
            assert indexer.run_once() == 1
        assert indexer.chain_breaks == 1
        assert "ends at record 2, but this indexer left it at record 4" in caplog.text
        log.record(_record())  # said once: the chain goes on from there
        assert indexer.run_once() == 1
        assert indexer.chain_breaks == 1
    finally:
        log.close()
        indexer.close()


def test_the_authorization_server_counts_tokens_reuse_consents_and_failed_sign_ins(
    tmp_path: Path,
) -> None:
    home, secret = oauth_home(tmp_path)
    connector_secret = home.store.add_connector("plant-1")
    address = with_metrics(home)
    base = home.config.tokens.issuer
    with run_server(home):
        browser = Browser(base)
        try:
            assert browser.sign_in(password="wrong").status_code == 401
            assert browser.sign_in().status_code == 303
            flow = Flow()
            code = browser.authorize(flow, data_sources=("ds-a",))["code"]
            first = exchange(base, code, flow, secret=secret)
            assert first.status_code == 200, first.text
            old = first.json()["refresh_token"]
            second = refresh(base, "app1", old, secret)
            assert second.status_code == 200, second.text
            assert refresh(base, "app1", old, secret).status_code == 400  # reused
            page = browser.http.get("/settings")
            reply = browser.http.post(
                "/settings/disconnect",
                data={"client_id": "app1", "csrf_token": csrf_token(page.text)},
            )
            assert reply.status_code == 303
            connector = httpx.post(
                base + "/token",
                data={"grant_type": "client_credentials"},
                auth=("plant-1", connector_secret),
                timeout=10,
            )
            assert connector.status_code == 200, connector.text
        finally:
            browser.close()
        samples = scrape(address)
    assert value(samples, "policyd_oauth_sign_in_failures_total") == 1
    assert value(samples, "policyd_oauth_consents_total", event="given") == 1
    assert value(samples, "policyd_oauth_consents_total", event="revoked") == 1
    issued = "policyd_oauth_tokens_issued_total"
    assert value(samples, issued, grant_type="authorization_code") == 1
    assert value(samples, issued, grant_type="refresh_token") == 1
    assert value(samples, issued, grant_type="client_credentials") == 1
    assert value(samples, "policyd_oauth_refresh_token_reuse_total") == 1


def test_the_middleware_counts_the_answers_it_gives_itself_and_why(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    token = home.token()
    registry = CollectorRegistry()
    recorder = Recorder()
    # No policyd on this port: every Check fails, and the middleware answers 503.
    app = PolicydMiddleware(echo_app(recorder), f"127.0.0.1:{free_port()}", metrics=registry)
    with serve_asgi(app) as url:
        for _ in range(2):
            reply = httpx.get(f"{url}/api/data/tags/ds-a", headers=bearer(token))
            assert reply.status_code == 503
        two = [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]
        assert httpx.get(f"{url}/api/data/tags/ds-a", headers=two).status_code == 400
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "policyd_middleware_checks_total") == 2
    assert value(samples, "policyd_middleware_policyd_errors_total", kind="unavailable") == 2
    assert value(samples, "policyd_middleware_responses_total", status="503") == 2
    assert value(samples, "policyd_middleware_responses_total", status="400") == 1
    assert recorder.calls == []
    # A second middleware on the same registry shares its families (registered once).
    again = PolicydMiddleware(echo_app(recorder), "127.0.0.1:1", metrics=registry)
    assert again._metrics is app._metrics
    asyncio.run(again.aclose())


def test_importing_the_middleware_imports_no_prometheus_client() -> None:
    import subprocess
    import sys

    code = (
        "import sys, adapters.asgi; from adapters.asgi import PolicydMiddleware;"
        "PolicydMiddleware(lambda *a: None, '127.0.0.1:1');"
        "print('prometheus_client' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr
