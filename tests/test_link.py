"""The link over real sockets: a LinkHub on uvicorn (in a thread of the test), upstreams,
and `policyd-connector` as real processes. policyd's decision is stood in for by
TableAuthorizerForTests (tests/link_support.py); tests/test_link_e2e.py asks the real one."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.link import LinkTimeout, LinkUnavailable
from adapters.link.certs import ensure
from tests.link_support import (
    ConnectorProcess,
    HubThread,
    TableAuthorizerForTests,
    eventually,
    start_connector,
    write_config,
)


@pytest.fixture
def authorizer() -> TableAuthorizerForTests:
    table = TableAuthorizerForTests()
    table.add("conn-a", "ds-a")
    table.add("conn-b", "ds-b")
    return table


@pytest.fixture
def started() -> Iterator[list[object]]:
    """Everything a test starts, stopped at its end whatever happens."""
    things: list[object] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, ConnectorProcess):
            thing.stop(signal.SIGKILL)
        elif isinstance(thing, HubThread):
            thing.close()


def _hub(started: list[object], authorizer: TableAuthorizerForTests, **kw: object) -> HubThread:
    hub = HubThread(authorizer, **kw)  # type: ignore[arg-type]
    started.append(hub)
    return hub


def _connector(
    started: list[object],
    tmp_path: Path,
    hub: HubThread,
    connector_id: str,
    sources: dict[str, str],
    *,
    secret: str | None = None,
    extra: str = "",
    insecure: bool = True,
) -> ConnectorProcess:
    entry = hub.authorizer.connectors.get(connector_id)
    config = write_config(
        tmp_path,
        connector_id,
        hub_url=hub.url,
        token_url=hub.token_url,
        secret=secret if secret is not None else (entry.secret if entry else "nope"),
        sources=sources,
        extra=extra,
        insecure=insecure,
    )
    process = start_connector(config)
    started.append(process)
    return process


def test_requests_reach_the_connector_serving_their_data_source(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    up_a, url_a = hub.upstream("plant-a")
    up_b, url_b = hub.upstream("plant-b")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url_a})
    b = _connector(started, tmp_path, hub, "conn-b", {"ds-b": url_b})
    hub.wait_online("conn-a")
    hub.wait_online("conn-b")

    answer = hub.forward(
        "ds-a",
        "POST",
        "/api/data/v2/snapshot",
        "x=1&y=%20",
        [
            ("content-type", "application/json"),
            ("authorization", "Bearer app-token"),
            ("cookie", "s=1"),
            ("x-policyd-client-id", "demo-app"),
        ],
        b'{"tags": {"ds-a": ["T1"]}}',
    )
    assert answer.status == 200
    echoed = json.loads(answer.body)
    assert echoed["upstream"] == "plant-a"
    assert (echoed["method"], echoed["path"], echoed["query"]) == (
        "POST",
        "/api/data/v2/snapshot",
        "x=1&y=%20",
    )
    assert echoed["body"] == '{"tags": {"ds-a": ["T1"]}}'
    # The app's credential never leaves the hub; the hub's decision headers go along.
    assert "authorization" not in echoed["headers"] and "cookie" not in echoed["headers"]
    assert echoed["headers"]["x-policyd-client-id"] == "demo-app"
    # Of the upstream's own headers only those an app may see come back (no set-cookie).
    assert ("etag", '"plant-a"') in answer.headers
    assert not {n for n, _ in answer.headers} & {"x-upstream", "set-cookie"}

    assert json.loads(hub.forward("ds-b").body)["upstream"] == "plant-b"
    assert [p for _, p in up_a.seen] == ["/api/data/v2/snapshot"]
    assert [p for _, p in up_b.seen] == ["/echo"]
    # Every forward asked policyd for that data source alone, with that link's token.
    assert any(ds == ("ds-b",) for _, ds, _ in authorizer.checks)
    log = b.log()
    assert "connected to" in log and "serving ds-b" in log
    assert "tok-" not in log and "secret-of" not in log  # never a token or a secret


def test_no_connector_online_is_503_at_once(
    authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    began = time.monotonic()
    with pytest.raises(LinkUnavailable) as raised:
        hub.forward("ds-a")
    assert time.monotonic() - began < 1
    response = raised.value.response()
    assert response.status == 503
    assert json.loads(response.body)["error"] == "connector_unavailable"


def test_the_polling_fallback_serves_when_the_hub_refuses_websocket(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer, transports=["polling"])
    _, url = hub.upstream("plant-a")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    assert hub.wait_online("conn-a")["transport"] == "polling"
    for _ in range(3):
        assert json.loads(hub.forward("ds-a").body)["upstream"] == "plant-a"


def test_websocket_is_used_where_it_can_be(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    eventually(
        lambda: hub.online()[0]["transport"] == "websocket", 10, "the link upgraded to WebSocket"
    )
    assert hub.forward("ds-a").status == 200


def test_a_connector_killed_mid_request_fails_it_at_once(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer, timeout_seconds=20)
    up, url = hub.upstream("plant-a")
    a = _connector(
        started, tmp_path, hub, "conn-a", {"ds-a": url}, extra='transports = ["websocket"]'
    )
    hub.wait_online("conn-a")
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            hub.forward("ds-a", path="/slow", query="seconds=30")
        except BaseException as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    eventually(lambda: bool(up.seen), 10, "the request reached the upstream")
    killed = time.monotonic()
    a.process.kill()
    asker.join(10)
    assert not asker.is_alive()
    assert time.monotonic() - killed < 3  # not the 20 s timeout
    assert isinstance(outcome[0], LinkUnavailable), outcome
    assert outcome[0].response().status == 503
    assert hub.online() == []


def test_no_answer_in_time_is_504(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer, timeout_seconds=1)
    _, url = hub.upstream("plant-a")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    began = time.monotonic()
    with pytest.raises(LinkTimeout) as raised:
        hub.forward("ds-a", path="/slow", query="seconds=3")
    assert 0.9 < time.monotonic() - began < 2.5
    assert raised.value.response().status == 504
    # The link still serves.
    assert hub.forward("ds-a").status == 200


@pytest.mark.slow
def test_after_a_hub_restart_the_connector_reconnects_and_serves_by_itself(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    a = _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    hub.stop()
    a.wait_log("disconnected from the hub")
    time.sleep(0.5)
    hub.start()
    seconds = eventually(lambda: bool(hub.online()), 10, "the connector came back")
    assert hub.forward("ds-a").status == 200
    assert seconds < 5
    # It announced its data sources again with a (new) token.
    assert authorizer.checks[-2][1] == ("ds-a",)


def test_a_write_is_never_sent_twice(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    """The link closes while a PUT is in flight: the app gets 503, the connector reconnects,
    and the upstream saw the write once, never again."""
    hub = _hub(started, authorizer, timeout_seconds=20)
    up, url = hub.upstream("plant-a")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    outcome: list[BaseException] = []

    def write() -> None:
        try:
            hub.forward("ds-a", "PUT", "/slow-snapshot/ds-a", "seconds=1", [], b'{"values": {}}')
        except BaseException as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    eventually(lambda: bool(up.seen), 10, "the write reached the upstream")
    hub.stop()  # the link goes while the write is in flight
    hub.start()
    writer.join(10)
    assert isinstance(outcome[0], LinkUnavailable), outcome
    eventually(lambda: bool(hub.online()), 10, "the connector came back")
    time.sleep(1.5)  # longer than the write takes: a replay would have arrived by now
    assert up.seen == [("PUT", "/slow-snapshot/ds-a")]


def test_a_connector_claiming_a_data_source_it_does_not_own_is_refused(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    # Claiming only what it does not own: refused.
    b = _connector(started, tmp_path, hub, "conn-a", {"ds-b": url})
    b.wait_log("refused by the hub: DATA_SOURCE_NOT_OWNED")
    assert hub.online() == []
    b.stop()
    # Claiming that and its own: it serves its own only (a data source taken from a
    # connector must not take its others offline when it reconnects).
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url, "ds-b": url})
    assert hub.wait_online("conn-a")["data_sources"] == ["ds-a"]
    with pytest.raises(LinkUnavailable):
        hub.forward("ds-b")
    assert hub.forward("ds-a").status == 200


def test_a_disabled_connector_gets_no_request_and_its_link_closes_within_a_second(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    up, url = hub.upstream("plant-a")
    a = _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    assert hub.forward("ds-a").status == 200
    authorizer.connectors["conn-a"].enabled = False
    # The very next request is refused without reaching the connector.
    with pytest.raises(LinkUnavailable) as raised:
        hub.forward("ds-a")
    assert raised.value.reason == "CONNECTOR_DISABLED"
    assert len(up.seen) == 1
    a.wait_log("refused by the hub: CONNECTOR_DISABLED", timeout=10)


def test_an_idle_disabled_connector_is_closed_within_a_second(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    a = _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    authorizer.connectors["conn-a"].enabled = False
    assert eventually(lambda: hub.online() == [], 1.0, "the idle link closed") < 1.0
    a.wait_log("disconnected from the hub")


def test_a_bad_credential_is_refused(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    a = _connector(started, tmp_path, hub, "conn-a", {"ds-a": url}, secret="wrong")
    log = a.wait_log("refused by the hub: TOKEN_MISSING")
    assert "cannot get an access token: the token endpoint refused: 401 invalid_client" in log
    assert "wrong" not in log
    assert hub.online() == []


@pytest.mark.slow
def test_an_expiring_token_is_renewed_and_rechecked_by_the_hub(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    authorizer.token_lifetime = 2.0
    hub = _hub(started, authorizer)
    _, url = hub.upstream("plant-a")
    a = _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    a.wait_log("access token renewed", timeout=5)
    time.sleep(1.0)  # past the first token's expiry
    assert hub.online() and hub.forward("ds-a").status == 200


def _tls(tmp_path: Path) -> tuple[Path, Path]:
    good, other = tmp_path / "tls", tmp_path / "other-ca"
    ensure(good)
    ensure(other)
    return good, other


def test_tls_and_mutual_tls(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    good, _ = _tls(tmp_path)
    hub = _hub(
        started,
        authorizer,
        tls=(str(good / "server.pem"), str(good / "server.key"), str(good / "ca.pem")),
    )
    _, url = hub.upstream("plant-a")
    # insecure_dev stays for the test's plain token endpoint; the hub URL is https://.
    mutual = (
        f'ca_file = "{good / "ca.pem"}"\nclient_cert_file = "{good / "client.pem"}"\n'
        f'client_key_file = "{good / "client.key"}"'
    )
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url}, extra=mutual)
    hub.wait_online("conn-a")
    assert hub.forward("ds-a").status == 200
    # Without a client certificate the handshake fails.
    b = _connector(
        started, tmp_path, hub, "conn-b", {"ds-b": url}, extra=f'ca_file = "{good / "ca.pem"}"'
    )
    b.wait_log("cannot connect to the hub")
    assert [c["connector_id"] for c in hub.online()] == ["conn-a"]


def test_a_hub_with_an_untrusted_certificate_is_refused(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    good, other = _tls(tmp_path)
    hub = _hub(started, authorizer, tls=(str(good / "server.pem"), str(good / "server.key"), ""))
    _, url = hub.upstream("plant-a")
    a = _connector(
        started, tmp_path, hub, "conn-a", {"ds-a": url}, extra=f'ca_file = "{other / "ca.pem"}"'
    )
    a.wait_log("the server's TLS certificate is not trusted (check ca_file)")
    assert hub.online() == []


def test_the_link_listener_refuses_plain_http_unless_told(
    authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    hub = _hub(started, authorizer, allow_insecure=False)
    reply = httpx.get(f"{hub.url}/socket.io/?EIO=4&transport=polling")
    assert reply.status_code == 403
    assert reply.json()["error"] == "tls_required"


def test_a_request_for_a_data_source_the_connector_does_not_serve_is_not_replayed(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    """Even if a hub asked, a connector only ever calls its configured upstreams."""
    hub = _hub(started, authorizer)
    up, url = hub.upstream("plant-a")
    _connector(started, tmp_path, hub, "conn-a", {"ds-a": url})
    hub.wait_online("conn-a")
    assert hub.hub is not None
    conn = hub.hub.serving("ds-a")
    assert conn is not None
    conn.data_sources = ("ds-a", "ds-x")  # a hub gone wrong
    authorizer.connectors["conn-a"].data_sources.add("ds-x")
    answer = hub.forward("ds-x")
    assert answer.status == 404 and json.loads(answer.body)["error"] == "not_served"
    assert up.seen == []


@pytest.mark.slow
def test_a_frozen_connector_is_found_dead_by_the_heartbeat(
    tmp_path: Path, authorizer: TableAuthorizerForTests, started: list[object]
) -> None:
    """No TCP reset (the process is stopped, its socket open): Engine.IO's ping timeout
    finds the dead link and the request in flight fails then, not at the 20 s timeout."""
    hub = _hub(started, authorizer, timeout_seconds=20, ping_interval=1, ping_timeout=1)
    up, url = hub.upstream("plant-a")
    a = _connector(
        started, tmp_path, hub, "conn-a", {"ds-a": url}, extra='transports = ["websocket"]'
    )
    hub.wait_online("conn-a")
    a.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(LinkUnavailable):
            hub.forward("ds-a")
        assert time.monotonic() - began < 5
        assert up.seen == [] and hub.online() == []
    finally:
        a.process.send_signal(signal.SIGCONT)
