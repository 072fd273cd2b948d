"""Three replicas on one PostgreSQL database, under continuous Check load on all of them:
after a revoking write returns, no replica allows what it revoked (docs/cluster.md).

Every kind of revoking write (grant, consent, token by jti, app disabled, the user's own
access removed, key retired) 50 times through the store's API (what the CLI and the
settings page call), twice through the CLI (a process each: about 0.7 s), the two the
settings page offers (a grant unticked, an app disconnected) 50 times each through it; then
with faults: one replica SIGSTOPped across the revoke, a replica's listening
backend killed with pg_terminate_backend, PostgreSQL restarted under load, a replica started
while PostgreSQL is down.

A probe thread per replica calls Check in a loop on the request of the moment and records
when each call started. A "stale allow" is an allow for a call that started after the
revoking write returned and before the restoring write began: there must be none.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt
import pytest

from policyd.config import OAuthConfig
from policyd.core.model import Access
from policyd.core.reasons import Reason
from policyd.gen.v1 import decision_pb2
from policyd.oauth.passwords import hash_password
from policyd.oauth.server import RunningAuthorizationServer
from policyd.oauth.storage import OAuthStorage
from policyd.pgserver import PgServer
from tests.helpers import Home, ServerProcess, check_request, decision_stub, free_port, run_server
from tests.oauth_support import PASSWORD, Browser, csrf_token

pytestmark = pytest.mark.slow

REPLICAS = 3
TIMES = 50  # each kind of revoking write through the store's API
CLI_TIMES = 2  # and through the CLI (a process each: slower)
SCOPES = ["UserInfo", "DataRead", "DataWrite"]
KINDS = ("grant", "consent", "token", "app", "access", "key")  # "key" last: it retires keys


@dataclass(frozen=True)
class Result:
    started: float
    allowed: bool
    reason: str


@dataclass
class Probe:
    """Calls Check on one replica in a loop, on whatever request is current."""

    server: ServerProcess
    current: list[decision_pb2.CheckRequest]
    results: list[Result] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with grpc.insecure_channel(self.server.address) as channel:
            stub = decision_stub(channel)
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    reply = stub.Check(self.current[0], timeout=30)
                    result = Result(started, reply.allowed, Reason(reply.reason).name)
                except grpc.RpcError as exc:
                    result = Result(started, False, f"grpc:{exc.code().name}")
                self.results.append(result)
                time.sleep(0.001)  # paced: the replicas' lease threads need CPU too

    def since(self, moment: float) -> list[Result]:
        return [r for r in list(self.results) if r.started > moment]


@dataclass
class Cluster:
    home: Home
    pg: PgServer
    servers: list[ServerProcess]
    probes: list[Probe]
    current: list[decision_pb2.CheckRequest]
    stale: list[str] = field(default_factory=list)

    def probe(self, request: decision_pb2.CheckRequest) -> None:
        self.current[0] = request

    def wait(self, moment: float, done: Callable[[list[Result]], bool], what: str) -> None:
        """Until every probe's results since `moment` satisfy `done`."""
        deadline = time.monotonic() + 30
        while not all(done(p.since(moment)) for p in self.probes):
            if time.monotonic() > deadline:
                tails = [p.since(moment)[-3:] for p in self.probes]
                raise AssertionError(f"{what}: not seen within 30 s; last results {tails}")
            time.sleep(0.002)

    def wait_allowed(self, what: str) -> None:
        now = time.monotonic()
        self.wait(now, lambda rs: any(r.allowed for r in rs), f"{what}: allowed again")

    def revoke_and_check(
        self, label: str, revoke: Callable[[], object], restore: Callable[[], object]
    ) -> float:
        """Revoke; record any allow started after it returned, on any replica, until the
        restore begins (after every replica answered at least twice since); restore and
        wait until every replica allows again. Returns how long the revoke took."""
        began = time.monotonic()
        revoke()
        returned = time.monotonic()
        self.wait(returned, lambda rs: len(rs) >= 2, f"{label}: checks after the revoke")
        restoring = time.monotonic()
        for probe in self.probes:
            window = [r for r in probe.since(returned) if r.started < restoring]
            self.stale += [f"{label} on {probe.server.address}: {r}" for r in window if r.allowed]
        restore()
        self.wait_allowed(label)
        return returned - began


def _names(kind: str) -> tuple[str, str, str]:
    return f"u-{kind}", f"app-{kind}", f"ds-{kind}"


def _request(home: Home, kind: str, token: str | None = None) -> decision_pb2.CheckRequest:
    user, app, ds = _names(kind)
    token = token or home.token(sub=user, client_id=app, scopes=("UserInfo", "DataRead"))
    return check_request(token, path=f"/api/data/tags/{ds}")


def _seed(home: Home) -> None:
    s = home.store
    storage = OAuthStorage(s)
    for kind in KINDS:
        user, app, ds = _names(kind)
        s.add_app(app, app, redirect_uris=[], scopes=SCOPES, confidential=False)
        s.add_user(user)
        storage.set_password_hash(user, hash_password(PASSWORD))
        s.add_data_source(ds)
        s.set_user_access(user, ds, Access.WRITE)
        s.set_consent(user, app, SCOPES)
        s.add_grant(user, app, ds, Access.WRITE)
    home.keyring.ensure_active()


@pytest.fixture(scope="module")
def cluster(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    url = pg_server.create_database("cluster")
    root = tmp_path_factory.mktemp("cluster")
    # Unpaced load on 2 cores may starve an audit indexer: audit lag is not the subject here.
    audit = (
        f'[audit]\npath = "{root / "audit.db"}"\nkey_file = "{root / "audit.key"}"\n'
        "timeout_seconds = 120.0\n"
    )
    home = Home(root, extra_config=audit, store_url=url)
    _seed(home)
    current = [_request(home, "grant")]
    with ExitStack() as stack:
        servers = [stack.enter_context(run_server(home)) for _ in range(REPLICAS)]
        probes = [Probe(server, current) for server in servers]
        for probe in probes:
            probe.start()
        cluster = Cluster(home, pg_server, servers, probes, current)
        try:
            cluster.wait_allowed("start")
            yield cluster
        finally:
            for probe in probes:
                probe.stop.set()
            for probe in probes:
                assert probe.thread is not None
                probe.thread.join(timeout=40)
            for server in servers:
                assert server.process.poll() is None, server.log()
                assert "Traceback" not in server.log(), server.log()
    home.store.close()
    pg_server.drop_database("cluster")


# -- the kinds of revoking write: (revoke, restore) through the store's API or the CLI ------


@dataclass
class Kind:
    """One kind of revoking write on its own user, app and data source."""

    name: str
    home: Home
    token: str = ""

    def __post_init__(self) -> None:
        self.new_token()

    @property
    def names(self) -> tuple[str, str, str]:
        return _names(self.name)

    def new_token(self) -> str:
        user, app, _ = self.names
        self.token = self.home.token(sub=user, client_id=app, scopes=("UserInfo", "DataRead"))
        return self.token

    def request(self) -> decision_pb2.CheckRequest:
        return _request(self.home, self.name, self.token)

    def store_writes(self, cluster: Cluster) -> tuple[Callable[[], object], Callable[[], object]]:
        s = self.home.store
        user, app, ds = self.names
        match self.name:
            case "grant":
                return (
                    lambda: s.revoke_grant(user, app, ds),
                    lambda: s.add_grant(user, app, ds, Access.WRITE),
                )
            case "consent":
                return lambda: s.revoke_consent(user, app), lambda: self._reconnect(cluster)
            case "token":
                claims = jwt.decode(self.token, options={"verify_signature": False})
                return (
                    lambda: s.revoke_token(claims["jti"], float(claims["exp"])),
                    lambda: self._retoken(cluster),
                )
            case "app":
                return lambda: s.set_app_enabled(app, False), lambda: s.set_app_enabled(app, True)
            case "access":
                return (
                    lambda: s.remove_user_access(user, ds),
                    lambda: s.set_user_access(user, ds, Access.WRITE),
                )
            case "key":
                kid = jwt.get_unverified_header(self.token)["kid"]
                self.home.keyring.rotate("ES256")  # the token's key is no longer the signer
                return lambda: self.home.keyring.retire(kid), lambda: self._retoken(cluster)
        raise AssertionError(self.name)

    def cli_revoke(self) -> tuple[str, ...]:
        user, app, ds = self.names
        match self.name:
            case "grant":
                return ("grants", "revoke", user, app, ds)
            case "consent":
                return ("consents", "revoke", user, app)
            case "token":
                jti = jwt.decode(self.token, options={"verify_signature": False})["jti"]
                return ("tokens", "revoke", "--jti", jti)
            case "app":
                return ("apps", "disable", app)
            case "access":
                return ("datasources", "remove-access", user, ds)
            case "key":
                kid = jwt.get_unverified_header(self.token)["kid"]
                self.home.keyring.rotate("ES256")
                return ("keys", "retire", kid)
        raise AssertionError(self.name)

    def _reconnect(self, cluster: Cluster) -> None:
        user, app, ds = self.names
        self.home.store.approve(user, app, SCOPES, {ds: Access.WRITE})

    def _retoken(self, cluster: Cluster) -> None:
        self.new_token()
        cluster.probe(self.request())


def _cli(home: Home, *args: str) -> Callable[[], None]:
    def run() -> None:
        result = home.cli(*args)
        assert result.returncode == 0, result.stderr

    return run


def _assert_no_stale(cluster: Cluster) -> None:
    stale, cluster.stale[:] = list(cluster.stale), []
    assert stale == [], f"{len(stale)} stale allows; first: {stale[:3]}"


@pytest.mark.parametrize("name", KINDS)
def test_no_replica_allows_what_a_store_write_revoked(cluster: Cluster, name: str) -> None:
    kind = Kind(name, cluster.home)
    cluster.probe(kind.request())
    cluster.wait_allowed(f"{name}: first")
    took = []
    for i in range(TIMES):
        revoke, restore = kind.store_writes(cluster)
        took.append(cluster.revoke_and_check(f"{name} #{i}", revoke, restore))
    _assert_no_stale(cluster)
    # Three live replicas acknowledge within milliseconds (not a lease's 2 s).
    assert sorted(took)[len(took) // 2] < 0.5, sorted(took)


@pytest.mark.parametrize("name", KINDS)
def test_no_replica_allows_what_a_cli_command_revoked(cluster: Cluster, name: str) -> None:
    kind = Kind(name, cluster.home)
    cluster.probe(kind.request())
    cluster.wait_allowed(f"{name}: first")
    for i in range(CLI_TIMES):
        _, restore = kind.store_writes(cluster)
        command = kind.cli_revoke()
        cluster.revoke_and_check(
            f"cli {' '.join(command)} #{i}", _cli(cluster.home, *command), restore
        )
    _assert_no_stale(cluster)


def test_no_replica_allows_what_the_settings_page_revoked(cluster: Cluster) -> None:
    home = cluster.home
    port = free_port()
    oauth = dataclasses.replace(home.config.oauth, enabled=True, address=f"127.0.0.1:{port}")
    oauth = dataclasses.replace(oauth, session_key_file=str(home.root / "session.key"))
    assert isinstance(oauth, OAuthConfig)
    # The page's own issuer URL (its forms are checked against it); the tokens the probes
    # send are the home's, whose issuer the replicas expect.
    tokens = dataclasses.replace(home.config.tokens, issuer=f"http://127.0.0.1:{port}")
    page = RunningAuthorizationServer(dataclasses.replace(home.config, oauth=oauth, tokens=tokens))
    page.start()
    try:
        for name in ("grant", "consent"):
            kind = Kind(name, home)
            user, app, ds = kind.names
            browser = Browser(f"http://127.0.0.1:{port}")
            assert browser.sign_in(user).status_code == 303
            cluster.probe(kind.request())
            cluster.wait_allowed(f"page {name}: first")
            for i in range(TIMES):
                token = csrf_token(browser.http.get("/settings").text)
                if name == "grant":
                    path, form = "/settings/revoke", {"client_id": app, "data_source": ds}
                else:
                    path, form = "/settings/disconnect", {"client_id": app}

                def post(
                    path: str = path,
                    form: dict[str, str] = form,
                    token: str = token,
                    browser: Browser = browser,
                ) -> None:
                    reply = browser.http.post(path, data={**form, "csrf_token": token})
                    assert reply.status_code == 303, reply.text

                _, restore = kind.store_writes(cluster)
                cluster.revoke_and_check(f"page {name} #{i}", post, restore)
            browser.close()
    finally:
        page.stop()
    _assert_no_stale(cluster)


# -- faults ---------------------------------------------------------------------------------


def _grant_kind(cluster: Cluster) -> Kind:
    kind = Kind("grant", cluster.home)
    cluster.probe(kind.request())
    cluster.wait_allowed("grant: first")
    return kind


def test_a_stopped_replica_holds_a_revoke_up_for_at_most_its_lease_and_never_allows_it(
    cluster: Cluster,
) -> None:
    kind = _grant_kind(cluster)
    user, app, ds = kind.names
    frozen = cluster.servers[0]
    lease = cluster.home.config.store.lease_seconds
    for i in range(3):
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.2)
            began = time.monotonic()
            cluster.home.store.revoke_grant(user, app, ds)
            returned = time.monotonic()
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        # Held up by the frozen replica, which cannot acknowledge, until its lease lapsed
        # (renewed at most a quarter of a lease before it froze): bounded by the lease.
        assert lease / 2 < returned - began < lease + 1.5, returned - began
        cluster.wait(returned, lambda rs: len(rs) >= 3, "after SIGCONT")
        for probe in cluster.probes:
            allowed = [r for r in probe.since(returned) if r.allowed]
            cluster.stale += [f"frozen #{i} on {probe.server.address}: {r}" for r in allowed]
        cluster.home.store.add_grant(user, app, ds, Access.WRITE)
        cluster.wait_allowed(f"frozen #{i}: recovered")
    _assert_no_stale(cluster)


def test_a_replica_whose_listening_backend_is_killed_stays_exact_and_recovers(
    cluster: Cluster,
) -> None:
    kind = _grant_kind(cluster)
    user, app, ds = kind.names
    victim = cluster.servers[1]
    port = victim.address.rsplit(":", 1)[1]
    for i in range(3):
        with cluster.home.store.read() as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE ?",
                (f"policyd-replica %:{port}/%",),
            ).fetchall()
        assert killed == [(True,)], killed
        cluster.revoke_and_check(
            f"killed listener #{i}",
            lambda: cluster.home.store.revoke_grant(user, app, ds),
            lambda: cluster.home.store.add_grant(user, app, ds, Access.WRITE),
        )
    _assert_no_stale(cluster)


def test_postgres_restarted_under_load_never_allows_stale_and_replicas_recover(
    cluster: Cluster, tmp_path: Path
) -> None:
    kind = _grant_kind(cluster)
    user, app, ds = kind.names
    cluster.pg.stop()  # (the test's own store checks its pooled connections before use)
    stopped = time.monotonic()
    try:
        # While it is down: nothing can be confirmed, nothing is allowed (after the replicas
        # noticed: their listening connections broke with the server's shutdown).
        time.sleep(1.0)
        noticed = time.monotonic()
        cluster.wait(noticed, lambda rs: len(rs) >= 5, "answers while PostgreSQL is down")
        for probe in cluster.probes:
            answers = probe.since(noticed)
            assert answers and all(not r.allowed for r in answers), answers[:5]
            assert {r.reason for r in answers} == {"STORE_UNAVAILABLE"}, answers[:5]
        # A replica started now: one clear line, and it exits (docs/cluster.md).
        started = subprocess.run(
            [
                *(sys.executable, "-m", "policyd", "--config", str(cluster.home.config_path)),
                *("serve", "--address", f"127.0.0.1:{free_port()}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert started.returncode == 1
        lines = started.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("policyd: error: "), started.stderr
        assert "Traceback" not in started.stderr
    finally:
        cluster.pg.start()
    assert time.monotonic() - stopped < 60
    cluster.wait_allowed("after the restart")  # they recover by themselves
    cluster.revoke_and_check(
        "after the restart",
        lambda: cluster.home.store.revoke_grant(user, app, ds),
        lambda: cluster.home.store.add_grant(user, app, ds, Access.WRITE),
    )
    _assert_no_stale(cluster)


def test_cluster_status_lists_every_live_replica_caught_up(cluster: Cluster) -> None:
    result = cluster.home.cli("cluster", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    live = [r for r in status["replicas"] if r["live"]]
    ports = sorted(s.address.rsplit(":", 1)[1] for s in cluster.servers)
    assert sorted(r["node"].rsplit(":", 1)[1] for r in live) == ports
    assert all(r["behind"] == 0 and r["lease_left_seconds"] > 0 for r in live), live
    text = cluster.home.cli("cluster", "status").stdout
    assert f"{len(ports)} live replica(s)" in text.splitlines()[0]
