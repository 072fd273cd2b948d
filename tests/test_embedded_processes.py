"""Embedded mode across processes: two reference hubs (`python -m examples.hub`, deciding in
their own processes) and a `policyd serve`, all on one store (the revocation tests: a SQLite
file, then a PostgreSQL database of which all three are replicas) and one audit log.

* Revocation: HUB_CONNECTIONS client threads per hub (HTTP: so that one loop iteration
  of a hub decides several requests, which share its store check) and one on the server
  (gRPC) ask in a loop
  while the test revokes through the real `policyd` command, or on the real Connected apps
  page of the server's authorization server (a data source unticked, the app
  disconnected). Every request that started after the revocation returned must be denied,
  on every process: not one allow.
* kill -9 of a hub under load: every request it answered has its audit record, once the
  indexers still running (the other hub's, the server's) have indexed its journal.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from tests.backends import both_backends  # noqa: F401  (the revocation tests run on both)
from tests.conftest import new_database
from tests.helpers import (
    Home,
    HubProcess,
    ServerProcess,
    check_request,
    child_pids,
    cmdline,
    indexed_records,
    run_hub,
    run_server,
    wait_serving,
)
from tests.oauth_support import Browser, Flow, csrf_token, exchange, oauth_home
from tests.test_revocation import (
    KINDS,
    CheckLoop,
    Combo,
    Result,
    _jti,
    _seed,
    _token,
    _wait_until,
)

pytestmark = pytest.mark.slow

MIN_BEFORE = 20
MIN_AFTER = 100  # answers each loop must give after a revocation returned
# Client connections per hub in the revocation tests: concurrent requests that one loop
# iteration decides together (adapters/embedded: one store check per iteration).
HUB_CONNECTIONS = 3
# The audit watch denies (AUDIT_UNAVAILABLE) when indexing falls this far behind: generous,
# since the check loops run unpaced beside three indexers on a 2-core machine.
AUDIT = "timeout_seconds = 60.0\n"


@dataclass
class Cluster:
    home: Home
    server: ServerProcess
    hubs: list[HubProcess]


def _audit(home_root: object) -> str:
    return f'[audit]\npath = "{home_root}/audit.db"\nkey_file = "{home_root}/audit.key"\n' + AUDIT


def _data_sources() -> str:
    return ",".join(Combo(kind).data_source for kind in KINDS)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, store_backend: str
) -> Iterator[Cluster]:
    url = new_database(request, store_backend)
    root = tmp_path_factory.mktemp("embedded-revocation")
    home = Home(root, extra_config=_audit(root), store_url=url)
    _seed(home)
    with run_server(home, wait=False) as server:
        with run_hub(home, _data_sources()) as one, run_hub(home, _data_sources()) as two:
            wait_serving(server.address)
            if url:  # each hub process is a replica with a live lease, as the server is
                status = home.cli("cluster", "status", "--json")
                assert status.returncode == 0, status.stderr
                live = {r["pid"] for r in json.loads(status.stdout)["replicas"] if r["live"]}
                assert {one.process.pid, two.process.pid, server.process.pid} <= live, live
            yield Cluster(home, server, [one, two])
            for hub in (one, two):
                assert hub.process.poll() is None, hub.log()
        for hub in (one, two):
            assert "Traceback" not in hub.log(), hub.log()
    assert "Traceback" not in server.log(), server.log()


@dataclass
class HubLoop:
    """GETs one hub path in a loop, in a thread, over one keep-alive connection."""

    url: str
    path: str
    token: str
    max_seconds: float = 60.0
    stop_on_error: bool = False  # end at the first request without an answer
    results: list[Result] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # the decision id of every answer
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), "hub loop did not stop"

    def started_after(self, moment: float) -> int:
        return sum(1 for r in list(self.results) if r.started > moment)

    def _run(self) -> None:
        where = urlsplit(self.url)
        deadline = time.monotonic() + self.max_seconds
        headers = {"Authorization": f"Bearer {self.token}"}
        conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    conn.request("GET", self.path, headers=headers)
                    reply = conn.getresponse()
                    body = reply.read()
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    self.results.append(Result(started, False, f"no answer: {exc!r}"))
                    if self.stop_on_error:
                        return
                    continue
                if reply.status == 200:
                    self.ids.append(reply.headers["x-policyd-decision-id"])
                    self.results.append(Result(started, True, "ALLOWED"))
                else:
                    doc = json.loads(body)
                    self.ids.append(doc["decision_id"])
                    self.results.append(Result(started, False, doc["reason"]))
        finally:
            conn.close()


Loop = HubLoop | CheckLoop


def _revoke_and_watch(
    cluster: Cluster, combo: Combo | str, token: str, revoke: Callable[[], None], reasons: set[str]
) -> None:
    """Ask every process in a loop for the combo's data source (or this data source);
    revoke; every request started after the revocation returned must be denied, with one
    of `reasons`."""
    data_source = combo if isinstance(combo, str) else combo.data_source
    path = f"/api/data/tags/{data_source}"
    loops: list[Loop] = [
        HubLoop(hub.url, path, token) for hub in cluster.hubs for _ in range(HUB_CONNECTIONS)
    ]
    loops.append(CheckLoop(cluster.server.address, check_request(token, path=path)))
    try:
        for loop in loops:
            loop.start()
        _wait_until(lambda: all(len(x.results) >= MIN_BEFORE for x in loops), "the first answers")
        # Answers complete before the revocation began (a request in flight while it commits
        # may see it: the store calls commit within a millisecond of being made).
        done = [len(x.results) for x in loops]
        revoke()
        returned = time.monotonic()
        _wait_until(
            lambda: all(x.started_after(returned) >= MIN_AFTER for x in loops),
            "answers after the revocation",
        )
    finally:
        for loop in loops:
            loop.stop()
    for loop, count in zip(loops, done, strict=True):
        where = getattr(loop, "url", None) or getattr(loop, "address", "")
        before = loop.results[:count]
        assert before and all(r.allowed for r in before), (
            where,
            [r for r in before if not r.allowed][:3],
        )
        after = [r for r in loop.results if r.started > returned]
        allows = [r for r in after if r.allowed]
        assert not allows, f"{where}: {len(allows)} allows of {len(after)} after the revocation"
        wrong = [r for r in after if r.reason not in reasons]
        assert not wrong, f"{where}: {wrong[:3]}"


def _cli(cluster: Cluster, *args: str, stdin: str | None = None) -> Callable[[], None]:
    def run() -> None:
        result = cluster.home.cli(*args, stdin=stdin)
        assert result.returncode == 0, f"policyd {' '.join(args)}: {result.stderr}"

    return run


def test_revoking_a_grant_denies_the_next_request_on_every_hub(cluster: Cluster) -> None:
    c = Combo("grant")
    revoke = _cli(cluster, "grants", "revoke", c.user, c.app, c.data_source)
    _revoke_and_watch(cluster, c, _token(cluster.home, c), revoke, {"DATA_SOURCE_NOT_GRANTED"})


def test_revoking_a_consent_denies_the_next_request_on_every_hub(cluster: Cluster) -> None:
    c = Combo("consent")
    revoke = _cli(cluster, "consents", "revoke", c.user, c.app)
    _revoke_and_watch(cluster, c, _token(cluster.home, c), revoke, {"CONSENT_MISSING"})


def test_revoking_a_token_denies_the_next_request_on_every_hub(cluster: Cluster) -> None:
    c = Combo("token-jti")
    token = _token(cluster.home, c)
    revoke = _cli(cluster, "tokens", "revoke", "--jti", _jti(token))
    _revoke_and_watch(cluster, c, token, revoke, {"TOKEN_REVOKED"})


def test_disabling_an_app_denies_the_next_request_on_every_hub(cluster: Cluster) -> None:
    c = Combo("app")
    revoke = _cli(cluster, "apps", "disable", c.app)
    _revoke_and_watch(cluster, c, _token(cluster.home, c), revoke, {"APP_DISABLED"})


def test_removing_a_users_access_denies_the_next_request_on_every_hub(cluster: Cluster) -> None:
    c = Combo("access")
    revoke = _cli(cluster, "datasources", "remove-access", c.user, c.data_source)
    _revoke_and_watch(cluster, c, _token(cluster.home, c), revoke, {"USER_ACCESS_MISSING"})


def test_the_settings_page_revoking_and_disconnecting_denies_the_next_request(
    tmp_path_factory: pytest.TempPathFactory, store_url: str
) -> None:
    """The real Connected apps page of `policyd serve`'s authorization server: alice
    connects app1 (sign-in, consent, code exchange), then unticks a data source, then
    disconnects the app; each time the next request is denied on both hubs and the server."""
    root = tmp_path_factory.mktemp("embedded-page")
    home, secret = oauth_home(root, store_url=store_url)
    text = home.config_path.read_text()
    home.config_path.write_text(text.replace("[audit]\n", "[audit]\n" + AUDIT, 1))
    base = home.config.tokens.issuer
    with run_server(home) as server:
        _wait_until(lambda: _up(base), "the authorization server")
        browser = Browser(base)
        try:
            browser.sign_in()
            flow = Flow()
            code = browser.authorize(flow, data_sources=("ds-a", "ds-b"))["code"]
            token = exchange(base, code, flow, secret=secret).json()["access_token"]
            with run_hub(home, "ds-a,ds-b,ds-c") as one, run_hub(home, "ds-a,ds-b,ds-c") as two:
                cluster = Cluster(home, server, [one, two])

                def untick() -> None:
                    csrf = csrf_token(browser.http.get("/settings").text)
                    reply = browser.http.post(
                        "/settings/revoke",
                        data={"client_id": "app1", "data_source": "ds-b", "csrf_token": csrf},
                    )
                    assert reply.status_code == 303, reply.text

                def disconnect() -> None:
                    csrf = csrf_token(browser.http.get("/settings").text)
                    reply = browser.http.post(
                        "/settings/disconnect", data={"client_id": "app1", "csrf_token": csrf}
                    )
                    assert reply.status_code == 303, reply.text

                _revoke_and_watch(cluster, "ds-b", token, untick, {"DATA_SOURCE_NOT_GRANTED"})
                # Disconnecting revokes the pair's access tokens with the consent.
                _revoke_and_watch(
                    cluster, "ds-a", token, disconnect, {"TOKEN_REVOKED", "CONSENT_MISSING"}
                )
                for hub in (one, two):
                    assert "Traceback" not in hub.log(), hub.log()
        finally:
            browser.close()
    assert "Traceback" not in server.log(), server.log()


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/.well-known/oauth-authorization-server", timeout=2):
            return True
    except OSError:
        return False


# -- kill -9 of a hub under load ----------------------------------------------------------


def test_kill_9_of_a_hub_under_load_loses_no_record_of_an_answered_request(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("embedded-kill")
    home = Home(root, extra_config=_audit(root))
    home.seed()
    token = home.token()
    with run_hub(home, "ds-a,ds-b,ds-c") as victim, run_hub(home, "ds-a,ds-b,ds-c") as survivor:
        indexers = [pid for pid in child_pids(victim.process.pid) if b"index" in cmdline(pid)]
        assert len(indexers) == 1, [cmdline(p) for p in child_pids(victim.process.pid)]
        # Allows (ds-a granted) and denies (ds-c not), four clients on the victim.
        loads = [
            HubLoop(victim.url, f"/api/data/tags/{ds}", token, stop_on_error=True)
            for ds in ("ds-a", "ds-c") * 2
        ]
        other = HubLoop(survivor.url, "/api/data/tags/ds-a", token)
        for loop in (*loads, other):
            loop.start()
        _wait_until(lambda: sum(len(x.ids) for x in loads) >= 400, "answers under load")
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        for loop in loads:
            loop.stop()
        time.sleep(0.3)  # the survivor keeps answering meanwhile
        other.stop()
        answered = {i for loop in loads for i in loop.ids}
        assert len(answered) >= 400
        assert not any(
            r.allowed is False and r.reason == "AUDIT_UNAVAILABLE" for x in loads for r in x.results
        )
        records = indexed_records(root / "audit.db", answered | set(other.ids), timeout=60)
        missing = answered - set(records)
        assert not missing, f"{len(missing)} of {len(answered)} answered decisions not in the log"
        assert {records[i].door for i in answered} == {"embedded"}
        assert {records[i].reason for i in answered} == {"ALLOWED", "DATA_SOURCE_NOT_GRANTED"}
        assert set(other.ids) <= set(records)
        # The victim's indexer saw its parent go, made its last pass and ended.
        _wait_until(lambda: not any(cmdline(pid) for pid in indexers), "the indexer to end")
        assert survivor.process.poll() is None, survivor.log()
    verify = home.cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
