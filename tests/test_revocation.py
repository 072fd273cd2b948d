"""Revocations through the real CLI are enforced by every server from the next check on.

Two `policyd serve` processes share one store file. A client thread per server calls Check
in a loop while the test revokes with the `policyd` command. Every check that *started*
after the command returned, on either server, must be a deny with the revocation's reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

import grpc
import jwt
import pytest

from policyd.core.model import Access
from policyd.core.reasons import Reason
from policyd.gen.v1 import decision_pb2
from tests.backends import both_backends  # noqa: F401  (every test here runs on both)
from tests.conftest import new_database
from tests.helpers import (
    Home,
    ServerProcess,
    check_request,
    decision_stub,
    run_server,
    wait_serving,
)

pytestmark = pytest.mark.slow

# Checks each server must have answered after a revocation returned, for the test to count.
MIN_CHECKS_AFTER = 200
# Checks each server must have answered before the first command starts.
MIN_CHECKS_BEFORE = 20
SCOPES = ("UserInfo", "DataRead")


@dataclass(frozen=True)
class Combo:
    """A user, app and data source used by one test only, so tests do not interfere."""

    kind: str

    @property
    def user(self) -> str:
        return f"u-{self.kind}"

    @property
    def app(self) -> str:
        return f"app-{self.kind}"

    @property
    def data_source(self) -> str:
        return f"ds-{self.kind}"

    def request(self, token: str) -> decision_pb2.CheckRequest:
        return check_request(token, path=f"/api/data/tags/{self.data_source}")


KINDS = (
    "grant",
    "consent",
    "token-stdin",
    "token-jti",
    "app",
    "access",
    "key",
    "regrant",
    "narrow",
    "downgrade",
    "list",
)
WRITE_SCOPES = ("UserInfo", "DataRead", "DataWrite")


def _seed(home: Home) -> None:
    s = home.store
    for kind in KINDS:
        c = Combo(kind)
        s.add_app(c.app, c.app, redirect_uris=[], scopes=list(WRITE_SCOPES), confidential=False)
        s.add_user(c.user)
        s.add_data_source(c.data_source)
        s.set_user_access(c.user, c.data_source, Access.WRITE)
        s.set_consent(c.user, c.app, list(WRITE_SCOPES))
        s.add_grant(c.user, c.app, c.data_source, Access.WRITE)
    # A second data source for the listing test.
    c = Combo("list")
    s.add_data_source(c.data_source + "-2")
    s.set_user_access(c.user, c.data_source + "-2", Access.READ)
    s.add_grant(c.user, c.app, c.data_source + "-2", Access.READ)
    home.keyring.ensure_active()


@dataclass
class Cluster:
    home: Home
    servers: list[ServerProcess]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, store_backend: str
) -> Iterator[Cluster]:
    """Two `policyd serve` processes on different ports and one store: a SQLite file, or a
    PostgreSQL database of which they are two replicas."""
    url = new_database(request, store_backend)
    root = tmp_path_factory.mktemp("revocation")
    # The check loops run unpaced on a 2-core machine beside CLI processes: an audit indexer
    # starved of CPU may fall more than the default 5 s behind (then every check is denied
    # AUDIT_UNAVAILABLE, tests/test_audit.py's subject). These tests are about revocation.
    audit = (
        f'[audit]\npath = "{root / "audit.db"}"\nkey_file = "{root / "audit.key"}"\n'
        "timeout_seconds = 60.0\n"
    )
    home = Home(root, extra_config=audit, store_url=url)
    _seed(home)
    with ExitStack() as stack:
        servers = [stack.enter_context(run_server(home, wait=False)) for _ in range(2)]
        for server in servers:
            wait_serving(server.address)
        yield Cluster(home, servers)
        for server in servers:
            assert server.process.poll() is None, server.log()
            assert "Traceback" not in server.log(), server.log()


# -- the check loops ----------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    started: float  # time.monotonic() when the call started
    allowed: bool
    reason: str  # the reason's name, or the gRPC status of a failed call
    data_sources: tuple[str, ...] = ()


@dataclass
class CheckLoop:
    """Calls Check on one server in a loop, in a thread, until stopped (or bounded out)."""

    address: str
    request: decision_pb2.CheckRequest
    max_calls: int = 50_000
    max_seconds: float = 60.0
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), "check loop did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with grpc.insecure_channel(self.address) as channel:
            stub = decision_stub(channel)
            while (
                not self._stop.is_set()
                and len(self.results) < self.max_calls
                and time.monotonic() < deadline
            ):
                started = time.monotonic()
                try:
                    reply = stub.Check(self.request, timeout=10)
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    self.results.append(Result(started, False, f"gRPC {code}"))
                else:
                    reason = Reason(reply.reason).name
                    sources = tuple(reply.data_sources)
                    self.results.append(Result(started, reply.allowed, reason, sources))

    def started_after(self, moment: float) -> int:
        return sum(1 for r in list(self.results) if r.started > moment)


def _answered_after(loops: list[CheckLoop], moment: float) -> bool:
    return all(loop.started_after(moment) >= MIN_CHECKS_AFTER for loop in loops)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass(frozen=True)
class Expect:
    allowed: bool
    reason: Reason
    data_sources: tuple[str, ...] | None = None  # None: any

    def describe(self) -> str:
        verdict = f"{'allow' if self.allowed else 'deny'} {self.reason.name}"
        return verdict if self.data_sources is None else f"{verdict} {self.data_sources}"

    def matches(self, r: Result) -> bool:
        if (r.allowed, r.reason) != (self.allowed, self.reason.name):
            return False
        return self.data_sources is None or r.data_sources == self.data_sources


ALLOW = Expect(True, Reason.ALLOWED)


@dataclass(frozen=True)
class Step:
    """A `policyd` command, and what every check started after it returned must answer."""

    args: tuple[str, ...]
    expect: Expect
    stdin: str | None = None


def _run_steps(
    cluster: Cluster,
    request: decision_pb2.CheckRequest,
    steps: list[Step],
    initially: Expect = ALLOW,
) -> None:
    """Check in a loop against both servers while running the steps one at a time.

    Checks started before the first command started must allow. Checks started after step
    i's command returned (and before the next command started) must answer step i's
    expectation. Each server must answer MIN_CHECKS_AFTER checks in every such window.
    """
    loops = [CheckLoop(server.address, request) for server in cluster.servers]
    windows: list[tuple[float, float, Expect, str]] = []
    try:
        for loop in loops:
            loop.start()
        _wait_until(
            lambda: all(len(loop.results) >= MIN_CHECKS_BEFORE for loop in loops),
            "the first checks",
        )
        begun = time.monotonic()
        windows.append((0.0, begun, initially, "before any command"))
        for step in steps:
            result = cluster.home.cli(*step.args, stdin=step.stdin)
            returned = time.monotonic()
            assert result.returncode == 0, f"policyd {' '.join(step.args)}: {result.stderr}"
            _wait_until(
                partial(_answered_after, loops, returned),
                f"checks after `policyd {' '.join(step.args)}`",
            )
            windows.append((returned, time.monotonic(), step.expect, " ".join(step.args)))
    finally:
        for loop in loops:
            loop.stop()

    for loop, server in zip(loops, cluster.servers, strict=True):
        for start, end, expect, label in windows:
            window = [r for r in loop.results if start < r.started < end]
            assert len(window) >= min(MIN_CHECKS_BEFORE, MIN_CHECKS_AFTER), (
                f"{server.address}: only {len(window)} checks after `{label}`"
            )
            wrong = [r for r in window if not expect.matches(r)]
            assert not wrong, (
                f"{server.address}: {len(wrong)} of {len(window)} checks started after "
                f"`{label}` did not answer {expect.describe()}; first: {wrong[0]}, "
                f"{wrong[0].started - start:.4f}s after the command returned"
            )


# -- the tests ----------------------------------------------------------------------------


def _token(home: Home, combo: Combo) -> str:
    return home.token(sub=combo.user, client_id=combo.app, scopes=SCOPES)


def _jti(token: str) -> str:
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert isinstance(jti, str)
    return jti


def _deny(reason: Reason) -> Expect:
    return Expect(False, reason)


def test_revoking_a_grant_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("grant")
    step = Step(
        ("grants", "revoke", c.user, c.app, c.data_source),
        _deny(Reason.DATA_SOURCE_NOT_GRANTED),
    )
    _run_steps(cluster, c.request(_token(cluster.home, c)), [step])


def test_revoking_a_consent_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("consent")
    step = Step(("consents", "revoke", c.user, c.app), _deny(Reason.CONSENT_MISSING))
    _run_steps(cluster, c.request(_token(cluster.home, c)), [step])


def test_revoking_a_token_from_stdin_denies_the_next_check_on_every_server(
    cluster: Cluster,
) -> None:
    c = Combo("token-stdin")
    token = _token(cluster.home, c)
    step = Step(("tokens", "revoke"), _deny(Reason.TOKEN_REVOKED), stdin=token + "\n")
    _run_steps(cluster, c.request(token), [step])


def test_revoking_a_token_by_id_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("token-jti")
    token = _token(cluster.home, c)
    step = Step(("tokens", "revoke", "--jti", _jti(token)), _deny(Reason.TOKEN_REVOKED))
    _run_steps(cluster, c.request(token), [step])


def test_disabling_an_app_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("app")
    step = Step(("apps", "disable", c.app), _deny(Reason.APP_DISABLED))
    _run_steps(cluster, c.request(_token(cluster.home, c)), [step])


def test_removing_a_users_access_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("access")
    step = Step(
        ("datasources", "remove-access", c.user, c.data_source), _deny(Reason.USER_ACCESS_MISSING)
    )
    _run_steps(cluster, c.request(_token(cluster.home, c)), [step])


def test_retiring_a_rotated_key_denies_its_tokens_on_every_server(cluster: Cluster) -> None:
    home = cluster.home
    c = Combo("key")
    # A key of this test's own, so retiring it leaves the other tests' tokens alone.
    rotated = home.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    kid = rotated.stdout.split()[-1]
    token = _token(home, c)
    assert jwt.get_unverified_header(token)["kid"] == kid
    steps = [
        # After a rotation the previous key is `retiring` and still verifies its tokens.
        Step(("keys", "rotate"), ALLOW),
        Step(("keys", "retire", kid), _deny(Reason.TOKEN_KEY_UNKNOWN)),
    ]
    _run_steps(cluster, c.request(token), steps)


def test_granting_again_allows_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("regrant")
    steps = [
        Step(
            ("grants", "revoke", c.user, c.app, c.data_source),
            _deny(Reason.DATA_SOURCE_NOT_GRANTED),
        ),
        Step(("grants", "add", c.user, c.app, c.data_source, "--access", "read"), ALLOW),
        Step(
            ("grants", "revoke", c.user, c.app, c.data_source),
            _deny(Reason.DATA_SOURCE_NOT_GRANTED),
        ),
    ]
    _run_steps(cluster, c.request(_token(cluster.home, c)), steps)


def test_narrowing_a_consent_denies_the_next_check_on_every_server(cluster: Cluster) -> None:
    c = Combo("narrow")
    step = Step(
        ("consents", "add", c.user, c.app, "--scope", "UserInfo"),
        _deny(Reason.CONSENT_INSUFFICIENT),
    )
    _run_steps(cluster, c.request(_token(cluster.home, c)), [step])


def test_downgrading_a_grant_denies_the_next_write_on_every_server(cluster: Cluster) -> None:
    c = Combo("downgrade")
    token = cluster.home.token(sub=c.user, client_id=c.app, scopes=("DataWrite",))
    request = check_request(
        token, method="PUT", path=f"/api/data/v2/snapshot/{c.data_source}", body=b"{}"
    )
    step = Step(
        ("grants", "add", c.user, c.app, c.data_source, "--access", "read"),
        _deny(Reason.DATA_SOURCE_ACCESS_INSUFFICIENT),
    )
    _run_steps(cluster, request, [step], initially=Expect(True, Reason.ALLOWED, (c.data_source,)))


def test_revoking_a_grant_drops_it_from_the_next_listing_on_every_server(
    cluster: Cluster,
) -> None:
    c = Combo("list")
    token = _token(cluster.home, c)
    request = check_request(token, path="/api/data/datasources")
    both = Expect(True, Reason.ALLOWED, (c.data_source, c.data_source + "-2"))
    steps = [
        Step(
            ("grants", "revoke", c.user, c.app, c.data_source + "-2"),
            Expect(True, Reason.ALLOWED, (c.data_source,)),
        ),
        Step(
            ("datasources", "remove-access", c.user, c.data_source),
            Expect(True, Reason.ALLOWED, ()),
        ),
    ]
    _run_steps(cluster, request, steps, initially=both)
