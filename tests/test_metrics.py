"""Prometheus metrics of the decision path, scraped from real servers (docs/metrics.md):
exact counts by door and reason after known traffic, a latency histogram counting every
call, one scrape summing two workers, an audit refusal counted, and metrics off by default."""

from __future__ import annotations

import collections
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from policyd.gen.v1 import decision_pb2
from tests.helpers import (
    Home,
    ServerProcess,
    check_request,
    child_pids,
    cmdline,
    decision_stub,
    free_port,
    indexed_records,
    run_server,
)
from tests.metrics_support import exposition, with_metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str, answers: int) -> tuple[str, Samples]:
    """The exposition text of /metrics and its samples by (name, labels), once the server
    has counted `answers` decisions: a serving process adds its tallied counts to the
    shared files every metrics.FLUSH_SECONDS. Never more: the test asserts exact counts."""
    deadline = time.monotonic() + 10
    while True:
        text = exposition(address)
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        if total(samples, "policyd_decisions_total") >= answers or time.monotonic() > deadline:
            return text, samples
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@contextmanager
def metered(home: Home, *args: str) -> Iterator[tuple[ServerProcess, str]]:
    home.seed()
    metrics = with_metrics(home)
    with run_server(home, *args) as server:
        yield server, metrics


def envoy_check(channel: grpc.Channel, token: str, path: str) -> external_auth_pb2.CheckResponse:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "GET"
    http.path = path
    http.headers["authorization"] = f"Bearer {token}"
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return stub.Check(request, timeout=10)


def test_a_scrape_after_known_traffic_has_the_exact_counts(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with metered(home) as (server, metrics):
        token = home.token()
        disabled = home.token(client_id="app-off")
        sent: collections.Counter[tuple[str, str]] = collections.Counter()
        with grpc.insecure_channel(server.address) as channel:
            stub = decision_stub(channel)
            for _ in range(7):  # the first decided in full, six remembered
                assert stub.Check(check_request(token, path="/api/user/me")).allowed
                sent["grpc", "ALLOWED"] += 1
            for _ in range(3):
                reply = stub.Check(check_request("", path="/api/user/me"))
                assert reply.reason == decision_pb2.TOKEN_MISSING
                sent["grpc", "TOKEN_MISSING"] += 1
            for _ in range(2):
                reply = stub.Check(check_request("not-a-jwt", path="/api/user/me"))
                assert reply.reason == decision_pb2.TOKEN_MALFORMED
                sent["grpc", "TOKEN_MALFORMED"] += 1
            reply = stub.Check(check_request(disabled, path="/api/user/me"))
            assert reply.reason == decision_pb2.APP_DISABLED
            sent["grpc", "APP_DISABLED"] += 1
            asgi = check_request(token, path="/api/user/me")
            asgi.door = "asgi"
            assert stub.Check(asgi).allowed
            sent["asgi", "ALLOWED"] += 1
            odd = check_request("", path="/api/user/me")
            odd.door = "made-up-door"  # a caller's own name: counted as "grpc", never a label
            stub.Check(odd)
            sent["grpc", "TOKEN_MISSING"] += 1
            for _ in range(4):
                assert envoy_check(channel, token, "/api/user/me").status.code == 0
                sent["envoy", "ALLOWED"] += 1
            assert envoy_check(channel, "", "/api/user/me").status.code != 0
            sent["envoy", "TOKEN_MISSING"] += 1

        text, samples = scrape(metrics, sum(sent.values()))
    counted = {
        (dict(labels)["door"], dict(labels)["reason"]): v
        for (name, labels), v in samples.items()
        if name == "policyd_decisions_total" and v
    }
    assert counted == {k: float(v) for k, v in sent.items()}, counted
    allowed = total(samples, "policyd_decisions_total", allowed="true")
    assert allowed == sum(v for (_, reason), v in sent.items() if reason == "ALLOWED")
    for door in ("grpc", "asgi", "envoy"):
        calls = sum(v for (d, _), v in sent.items() if d == door)
        assert value(samples, "policyd_decision_duration_seconds_count", door=door) == calls
        assert value(samples, "policyd_decision_duration_seconds_bucket", door=door, le="+Inf") == (
            calls
        )
    hits = value(samples, "policyd_remembered_answers_total", result="hit")
    misses = value(samples, "policyd_remembered_answers_total", result="miss")
    assert hits + misses == sum(sent.values())
    assert hits >= 6  # the six repeats of one allow at least
    # Bounded labels: never a user, an app, a token or a caller's own door name.
    for secret in ("alice", "app1", "app-off", token, "made-up-door"):
        assert secret not in text


def test_the_rule_label_is_the_route_rule_id(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with metered(home) as (server, metrics):
        token = home.token()
        with grpc.insecure_channel(server.address) as channel:
            reply = decision_stub(channel).Check(check_request(token, path="/api/user/me"))
        _, samples = scrape(metrics, 1)
    assert reply.allowed and reply.rule_id
    assert (
        value(
            samples,
            "policyd_decisions_total",
            door="grpc",
            allowed="true",
            reason="ALLOWED",
            rule=reply.rule_id,
        )
        == 1.0
    )


def test_an_audit_refusal_is_counted(tmp_path: Path) -> None:
    home = Home(tmp_path)
    metrics = f"127.0.0.1:{free_port()}"
    home.write_config(
        f'[audit]\npath = "{tmp_path / "audit.db"}"\nkey_file = "{tmp_path / "audit.key"}"\n'
        f'timeout_seconds = 0.5\n[metrics]\naddress = "{metrics}"\n'
    )
    home.seed()
    token = home.token()
    refused = answers = 0
    with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        first = stub.Check(check_request(token, path="/api/user/me"))
        assert first.allowed
        answers += 1
        assert first.decision_id in indexed_records(home.config.audit.path, {first.decision_id})
        with sqlite3.connect(home.config.audit.path) as db:  # the indexer can index no more
            db.execute("DROP TABLE audit")
        deadline = time.monotonic() + 15
        while refused < 3 and time.monotonic() < deadline:
            reply = stub.Check(check_request(token, path="/api/user/me"))
            answers += 1
            if reply.reason == decision_pb2.AUDIT_UNAVAILABLE:
                refused += 1
            time.sleep(0.02)
        assert refused == 3
        _, samples = scrape(metrics, answers)
    assert value(samples, "policyd_audit_refusals_total") == refused
    assert total(samples, "policyd_decisions_total", reason="AUDIT_UNAVAILABLE") == refused


@pytest.mark.slow
def test_one_scrape_sums_two_workers(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with metered(home, "--workers", "2") as (server, metrics):
        token = home.token()
        deadline = time.monotonic() + 20
        while len(child_pids(server.process.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # two workers and the audit indexer
        folder = Path(_metrics_folder(server.log()))
        workers = [p for p in child_pids(server.process.pid) if b"serve" in cmdline(p)]
        # Fresh connections (no shared subchannels): the kernel spreads them over both
        # workers once both listen (a worker may still be starting: then more rounds).
        calls = 0
        deadline = time.monotonic() + 30
        while True:
            for _ in range(8):
                options = [("grpc.use_local_subchannel_pool", 1)]
                with grpc.insecure_channel(server.address, options=options) as channel:
                    stub = decision_stub(channel)
                    for _ in range(5):
                        assert stub.Check(check_request(token, path="/api/user/me")).allowed
                        calls += 1
            _, samples = scrape(metrics, calls)
            by_worker = [_decisions_in(folder / f"counter_{pid}.db") for pid in workers]
            if all(n > 0 for n in by_worker) or time.monotonic() > deadline:
                break
    assert total(samples, "policyd_decisions_total", door="grpc", reason="ALLOWED") == calls
    assert total(samples, "policyd_decisions_total") == calls
    assert value(samples, "policyd_decision_duration_seconds_count", door="grpc") == calls
    # Each worker counted its own share, and the scrape is their sum.
    assert len(by_worker) == 2 and all(n > 0 for n in by_worker), by_worker
    assert sum(by_worker) == calls


def _decisions_in(path: Path) -> float:
    """The decisions one process counted: its own file in the folder, merged alone."""
    from prometheus_client.multiprocess import MultiProcessCollector

    families = MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
    return sum(  # type: ignore[no-any-return]
        s.value
        for f in families
        if f.name == "policyd_decisions"
        for s in f.samples
        if s.name == "policyd_decisions_total"
    )


def _metrics_folder(log: str) -> str:
    for line in log.splitlines():
        if "counting in " in line:
            return line.rsplit("counting in ", 1)[1].strip().rstrip(")")
    raise AssertionError(f"no metrics folder in the log:\n{log}")


def test_metrics_are_off_by_default_and_import_nothing(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import policyd.cli, policyd.serve.server, policyd.decision.wiring\n"
        "from policyd.core import metrics\n"
        "print(metrics.current is None, 'prometheus_client' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICYD_", "PROMETHEUS"))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_a_bad_metrics_address_is_one_line(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with open(home.config_path, "a") as config:  # (Home.write_config would refuse it)
        config.write('[metrics]\naddress = "nowhere"\n')
    result = home.cli("serve")
    assert result.returncode != 0
    assert "metrics.address must be HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_address_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    home = Home(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home.write_config(f'[metrics]\naddress = "127.0.0.1:{port}"\n')
        result = home.cli("serve", "--address", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "metrics.address" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


_BROKEN_FILES = """
import logging, sys, tempfile
from pathlib import Path
from policyd.core import metrics
metrics.enable(tempfile.mkdtemp())
from prometheus_client import values
from policyd.decision.wiring import build_decider
from policyd.doors.service import DecisionServicer
from policyd.gen.v1 import decision_pb2
from tests.helpers import Home, check_request

logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(name)s: %(message)s")
home = Home(Path(tempfile.mkdtemp()))
home.seed()
servicer = DecisionServicer(build_decider(home.config, home.store))

def check(path):
    reply = servicer.Check(check_request(home.token(), path=path), None)
    if isinstance(reply, bytes):
        reply = decision_pb2.CheckResponse.FromString(reply)
    return reply

print("before", check("/api/user/me").allowed)
values.close_all_multiprocess_files()  # every count written from now on fails
print("after", [check(p).reason for p in ("/api/user/me", "/api/data/tags/ds-a")])
metrics.flush()
print("flushed")
"""


def test_counts_that_cannot_be_written_never_change_an_answer(tmp_path: Path) -> None:
    """prometheus_client's files closed under a serving process: the decisions are answered
    as before, the failure is one log line, and flushing carries on (a subprocess: metrics
    are on for its whole life)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICYD_", "PROMETHEUS"))}
    out = subprocess.run(
        [sys.executable, "-c", _BROKEN_FILES],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    allowed = decision_pb2.ALLOWED
    assert lines[0] == "before True"
    assert f"after [{allowed}, {allowed}]" in lines, out.stdout
    assert "flushed" in lines
    failures = [line for line in lines if line.startswith("policyd.core.metrics: ")]
    assert len(failures) == 1 and "not written" in failures[0], out.stdout
