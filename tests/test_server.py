"""`policyd serve` as a real process: health, reflection, graceful shutdown, TLS and mTLS,
several workers on one port, and start-up errors."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policyd.gen.v1 import decision_pb2
from tests.helpers import (
    Home,
    ServerProcess,
    check_request,
    child_pids,
    cmdline,
    decision_stub,
    free_port,
    run_server,
)

DECISION = "policyd.v1.Decision"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}


def _policyd(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the real `policyd` command with a config file of our own."""
    return subprocess.run(
        [sys.executable, "-m", "policyd", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=_env(),
    )


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _refuses_connections(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Taken into the backlog of a listener that closed before accepting it: the port
        # is closing; ask again (the caller waits) until it refuses.
        return False
    return False


def _check_ok(channel: grpc.Channel, token: str, ds: str = "ds-a") -> decision_pb2.CheckResponse:
    reply: decision_pb2.CheckResponse = decision_stub(channel).Check(
        check_request(token, path=f"/api/data/tags/{ds}"), timeout=10
    )
    return reply


def _rpc_code(call: Callable[[], Any]) -> grpc.StatusCode | None:
    """The status code a call fails with, or None when it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    return None


# -- health and reflection ----------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_the_decision_service(
    shared_server: ServerProcess,
) -> None:
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", DECISION):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == SERVING, service
        code = _rpc_code(
            lambda: stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        )
        assert code == grpc.StatusCode.NOT_FOUND


def _reflect(address: str, request: Any) -> Any:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert len(replies) == 1
    return replies[0]


def test_reflection_lists_and_describes_the_decision_service(
    shared_server: ServerProcess,
) -> None:
    listed = _reflect(
        shared_server.address, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {DECISION, "grpc.health.v1.Health"} <= names

    described = _reflect(
        shared_server.address,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=DECISION),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {f"{f.package}.{s.name}/{m.name}" for f in files for s in f.service for m in s.method}
    assert f"{DECISION}/Check" in methods


# -- graceful shutdown --------------------------------------------------------------------


def _slow_snapshot_request(token: str, size: int) -> decision_pb2.CheckRequest:
    """A granted request whose JSON body takes the engine a while to parse (many objects)."""
    head, tail = b'{"tags": {"ds-a": [', b"{}]}}"
    body = head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail
    return check_request(token, method="POST", path="/api/data/v2/snapshot", body=body)


@pytest.mark.slow
def test_sigterm_finishes_calls_in_flight_then_exits_zero(tmp_path: Path) -> None:
    # Two threads, so most of the calls wait in the server's queue when SIGTERM arrives.
    home = Home(tmp_path, "[server]\nthreads = 2\n[engine]\nmax_body_bytes = 2500000\n")
    home.seed()
    token = home.token()
    # Each a different body: none is answered from memory (a remembered decision).
    requests = [_slow_snapshot_request(token, 2_000_000 + 3 * n) for n in range(12)]
    with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
        assert _check_ok(channel, token).allowed  # connected and warm
        with grpc.insecure_channel(server.address) as watch_channel:
            watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            assert next(watch).status == SERVING
            calls = [decision_stub(channel).Check.future(r, timeout=60) for r in requests]
            # Once one has been answered, the others have reached the server too.
            _wait_until(lambda: any(call.done() for call in calls), "a first answer")
            in_flight = [call for call in calls if not call.done()]
            server.process.send_signal(signal.SIGTERM)

            # The health watch sees NOT_SERVING, and the port stops accepting, while the
            # open watch keeps the process in its grace period.
            assert next(watch).status == NOT_SERVING
            _wait_until(lambda: _refuses_connections(server.address), "the port to close")
            # Refused: UNAVAILABLE once the client has seen the server's GOAWAY, CANCELLED
            # when the stream reaches the server first and grpc-core cancels it.
            late = _rpc_code(lambda: _check_ok(channel, token))
            assert late in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (
                f"a call started after SIGTERM: {late}"
            )
            assert server.process.poll() is None, "exited before finishing calls in flight"

            replies = []
            for call in calls:
                try:
                    replies.append(call.result())
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    pytest.fail(f"a call in flight at SIGTERM failed with {code}")
            watch.cancel()
        assert len(in_flight) >= 6, f"only {len(in_flight)} calls were in flight at SIGTERM"
        assert all(r.allowed for r in replies), [r.reason for r in replies]
        assert server.process.wait(timeout=30) == 0, server.log()
    assert "Traceback" not in server.log(), server.log()
    assert "stopped" in server.log()


# -- TLS and mutual TLS -------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Any = None) -> tuple[Path, Path]:
    cert_path = folder / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    client certificate from an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("policyd test CA", ca_key, "policyd test CA", ca_key, ca=True)
    ca_cert, _ = _write(folder, "ca", ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, "policyd test CA", ca_key, server=True)
    server_cert, server_key_path = _write(folder, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("gateway", client_key, "policyd test CA", ca_key, client=True)
    client_cert, client_key_path = _write(folder, "client", client, client_key)
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate("stranger", stranger_key, "other CA", other_ca_key, client=True)
    stranger_cert, stranger_key_path = _write(folder, "stranger", stranger, stranger_key)
    return PKI(
        ca_cert,
        server_cert,
        server_key_path,
        client_cert,
        client_key_path,
        stranger_cert,
        stranger_key_path,
    )


def _tls_config(pki: PKI, *, mutual: bool, client: bool) -> str:
    text = f'[server.tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
    if mutual:
        text += f'client_ca_file = "{pki.ca_cert}"\n'
    if client:
        text += f'[client]\nca_file = "{pki.ca_cert}"\n'
        if mutual:
            text += f'cert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
    return text


def _credentials(pki: PKI, cert: Path | None = None, key: Path | None = None) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _check_code(address: str, token: str, credentials: Any | None) -> grpc.StatusCode | None:
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        return _rpc_code(lambda: _check_ok(channel, token))


def _cli_check(config: Path, address: str, token: str) -> subprocess.CompletedProcess[str]:
    return _policyd(
        config, "check", "--server", address, "--token", token, "--path", "/api/data/tags/ds-a"
    )


def _config_without_client_section(home: Home, pki: PKI, *, mutual: bool) -> Path:
    """The same home, but a [client] that trusts the CA and has no client certificate."""
    path = home.root / "no-client-cert.toml"
    text = home.config_path.read_text().split("[client]")[0]
    path.write_text(text + f'[client]\nca_file = "{pki.ca_cert}"\n' if mutual else text)
    return path


@pytest.mark.slow
def test_tls_server_serves_tls_clients_and_refuses_plaintext(tmp_path: Path, pki: PKI) -> None:
    home = Home(tmp_path, _tls_config(pki, mutual=False, client=True))
    home.seed()
    token = home.token()
    tls = _credentials(pki)
    with run_server(home, credentials=tls) as server:
        with grpc.secure_channel(server.address, tls) as channel:
            assert _check_ok(channel, token).allowed
        assert _check_code(server.address, token, None) == grpc.StatusCode.UNAVAILABLE

        through_tls = _cli_check(home.config_path, server.address, token)
        assert through_tls.returncode == 0, through_tls.stderr
        assert through_tls.stdout.startswith("allow ALLOWED")

        plaintext = _cli_check(
            _config_without_client_section(home, pki, mutual=False), server.address, token
        )
        assert plaintext.returncode == 1
        assert plaintext.stderr.strip().splitlines() == [
            f"policyd: error: cannot reach policyd at {server.address}: UNAVAILABLE"
        ]
    assert "(TLS" in server.log()


@pytest.mark.slow
def test_mtls_server_requires_a_client_certificate_from_its_ca(tmp_path: Path, pki: PKI) -> None:
    home = Home(tmp_path, _tls_config(pki, mutual=True, client=True))
    home.seed()
    token = home.token()
    mtls = _credentials(pki, pki.client_cert, pki.client_key)
    with run_server(home, credentials=mtls) as server:
        with grpc.secure_channel(server.address, mtls) as channel:
            assert _check_ok(channel, token).allowed
        unavailable = grpc.StatusCode.UNAVAILABLE
        assert _check_code(server.address, token, _credentials(pki)) == unavailable
        stranger = _credentials(pki, pki.stranger_cert, pki.stranger_key)
        assert _check_code(server.address, token, stranger) == unavailable
        assert _check_code(server.address, token, None) == unavailable

        through_mtls = _cli_check(home.config_path, server.address, token)
        assert through_mtls.returncode == 0, through_mtls.stderr
        assert through_mtls.stdout.startswith("allow ALLOWED")

        without_cert = _cli_check(
            _config_without_client_section(home, pki, mutual=True), server.address, token
        )
        assert without_cert.returncode == 1
        assert without_cert.stderr.strip().splitlines() == [
            f"policyd: error: cannot reach policyd at {server.address}: UNAVAILABLE"
        ]
    assert "(mTLS" in server.log()


# -- several workers on one port ----------------------------------------------------------


def _workers(pid: int) -> list[int]:
    """The supervisor's serving processes (not its audit indexer)."""
    return [child for child in child_pids(pid) if b"audit\0index" not in cmdline(child)]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_sockets(port: int) -> list[tuple[str, str]]:
    """(state, inode) of IPv4/IPv6 TCP sockets whose local port is `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.append((fields[3], fields[9]))
    return found


LISTEN, ESTABLISHED = "0A", "01"


def _sockets_by_process(pids: list[int], port: int) -> dict[int, set[str]]:
    """For each process, the states of its TCP sockets on the port."""
    sockets = _tcp_sockets(port)
    out: dict[int, set[str]] = {}
    for pid in pids:
        mine = _socket_inodes(pid)
        out[pid] = {state for state, inode in sockets if inode in mine}
    return out


@pytest.mark.slow
def test_two_workers_share_one_port_and_stop_with_the_supervisor(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    token = home.token()
    with run_server(home, "--workers", "2") as server:
        port = int(server.address.rsplit(":", 1)[1])
        supervisor = server.process.pid
        _wait_until(lambda: len(_workers(supervisor)) == 2, "two worker processes")
        workers = _workers(supervisor)
        _wait_until(
            lambda: all(LISTEN in s for s in _sockets_by_process(workers, port).values()),
            "both workers to listen on the port",
        )
        assert LISTEN not in _sockets_by_process([supervisor], port)[supervisor]
        if len(os.sched_getaffinity(0)) >= 2:  # server.cpu_affinity = "auto": one CPU each
            pinned = [_cpus_allowed(pid) for pid in (supervisor, *workers)]
            assert pinned[0] == _cpus_allowed(os.getpid())  # the supervisor is not pinned
            assert len(set(pinned[1:])) == 2 and all("-" not in p for p in pinned[1:]), pinned

        # Fresh connections (no shared subchannels); the kernel spreads them over both.
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(24)
        ]
        try:
            for channel in channels:
                assert _check_ok(channel, token).allowed
            served = _sockets_by_process(workers, port)
            assert all(ESTABLISHED in states for states in served.values()), served
        finally:
            for channel in channels:
                channel.close()

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
        assert _refuses_connections(server.address)
    assert "Traceback" not in server.log(), server.log()


def _cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


def _start_supervisor(home: Home) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyd",
            "--config",
            str(home.config_path),
            "serve",
            "--address",
            f"127.0.0.1:{free_port()}",
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=home.root,
        env=_env(),
    )


def _orphans(home: Home) -> set[int]:
    """Processes whose command line names this home's config, reparented away from us."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(home.config_path).encode() in cmdline and b"serve" in cmdline:
                found.add(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_while_workers_start_stops_them_all_and_exits_zero(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    process = _start_supervisor(home)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while not workers and time.monotonic() < deadline:
            workers = child_pids(process.pid)
        assert workers, "no worker started"
        process.send_signal(signal.SIGTERM)  # the workers are still importing
        workers = sorted(set(workers) | set(child_pids(process.pid)))
        code = process.wait(timeout=30)
        workers = sorted(set(workers) | set(child_pids(process.pid)) | _orphans(home))
        deadline = time.monotonic() + 3
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for worker in workers:  # orphans of ours, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    assert alive == [], f"workers {alive} outlived the supervisor (exit {code})"
    assert code == 0


@pytest.mark.slow
def test_when_a_worker_dies_the_supervisor_stops_the_other_and_fails(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    with run_server(home, "--workers", "2") as server:
        supervisor = server.process.pid
        _wait_until(lambda: len(_workers(supervisor)) == 2, "two worker processes")
        first, second = _workers(supervisor)
        _wait_until(lambda: _catches(second, signal.SIGTERM), "the second worker to start")
        os.kill(first, signal.SIGKILL)
        assert server.process.wait(timeout=30) != 0
        assert not Path(f"/proc/{second}").exists(), "the other worker was left running"
        assert "a worker exited" in server.log()


@pytest.mark.slow
def test_when_the_supervisor_is_killed_its_workers_and_indexer_stop(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.seed()
    with run_server(home, "--workers", "2") as server:
        supervisor = server.process.pid
        _wait_until(lambda: len(_workers(supervisor)) == 2, "two worker processes")
        _wait_until(lambda: len(child_pids(supervisor)) == 3, "the workers and the indexer")
        children = child_pids(supervisor)
        _wait_until(
            lambda: all(_catches(child, signal.SIGTERM) for child in children),
            "every child to start",
        )
        os.kill(supervisor, signal.SIGKILL)
        server.process.wait(timeout=10)
        _wait_until(
            lambda: not any(_alive(c) for c in children),
            "the orphaned workers and indexer to stop",
            timeout=30,
        )
        assert _refuses_connections(server.address)


# -- start-up errors ----------------------------------------------------------------------


def _serve_error(config: Path, *args: str) -> str:
    """Run `policyd serve`, expecting it to fail at once; its one stderr line."""
    address = f"127.0.0.1:{free_port()}"
    try:
        result = _policyd(config, "serve", "--address", address, *args, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("policyd serve started instead of failing")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


BAD_CONFIGS = {
    "unknown key": ("[server]\nbogus = 1\n", "server.bogus"),
    "unknown section": ("[sever]\naddress = '127.0.0.1:1'\n", "sever"),
    "wrong type": ('[server]\nthreads = "many"\n', "server.threads"),
    "boolean for a number": ("[server]\ngrace_seconds = true\n", "server.grace_seconds"),
    "value for a table": ("[server]\ntls = 5\n", "server.tls"),
    "address without port": ('[server]\naddress = "localhost"\n', "server.address"),
    "port out of range": ('[server]\naddress = "127.0.0.1:70000"\n', "server.address"),
    "bad client address": ('[client]\naddress = "127.0.0.1:http"\n', "client.address"),
    "no workers": ("[server]\nworkers = 0\n", "server.workers"),
    "bad CPU list": ('[server]\ncpu_affinity = "fast"\n', "server.cpu_affinity"),
    "unavailable CPU": ('[server]\ncpu_affinity = "4095"\n', "server.cpu_affinity"),
    "missing TLS file": (
        '[server.tls]\ncert_file = "/nonexistent/server.crt"\n'
        'key_file = "/nonexistent/server.key"\n',
        "server.tls.cert_file",
    ),
    "missing client CA file": (
        "[server.tls]\ncert_file = '{cert}'\nkey_file = '{cert}'\n"
        "client_ca_file = '/nonexistent/ca.crt'\n",
        "server.tls.client_ca_file",
    ),
    "TLS key without certificate": (
        "[server.tls]\nkey_file = '{cert}'\n",
        "cert_file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_serve_with_a_bad_config_fails_with_one_line_naming_the_key(
    tmp_path: Path, case: str
) -> None:
    extra, key = BAD_CONFIGS[case]
    some_file = tmp_path / "exists.pem"
    some_file.write_text("not used\n")
    home = Home(tmp_path)
    home.config_path.write_text(home.config_path.read_text() + extra.format(cert=some_file))
    line = _serve_error(home.config_path)
    assert line.startswith("policyd: error:")
    assert key in line


def test_serve_with_a_bad_address_flag_fails_with_one_line(tmp_path: Path) -> None:
    home = Home(tmp_path)
    line = _policyd(home.config_path, "serve", "--address", "nonsense", timeout=20)
    assert line.returncode == 1
    assert line.stderr.strip().splitlines() == [
        "policyd: error: server.address must be HOST:PORT, not 'nonsense'"
    ]


def test_serve_on_a_port_in_use_fails_with_one_line(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = _policyd(home.config_path, "serve", "--address", address, timeout=20)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert address in lines[0]
    assert "in use" in lines[0]


def _time_wait_on(port: int) -> int:
    """How many TCP connections of this port are in TIME_WAIT (the kernel's table)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                    count += 1
    return count


def _leave_time_wait(port: int) -> None:
    """One connection on `port` that its listening side closes first: that side waits in
    TIME_WAIT, as a stopped server's side of its connections does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side first
            assert client.recv(1) == b""  # the client sees it, then closes its side


def test_serve_starts_again_at_once_on_its_address_after_a_busy_run(tmp_path: Path) -> None:
    """A restart right after load (here after a crash) must not wait for the old
    connections' TIME_WAIT to pass (about 60 s); a live server on the port is still
    refused."""
    home = Home(tmp_path)
    home.seed()
    token = home.token()
    port = free_port()
    with run_server(home, port=port) as first:
        channels = [grpc.insecure_channel(first.address) for _ in range(24)]
        try:
            for _ in range(125):  # 3,000 calls over 24 connections
                for channel in channels:
                    assert _check_ok(channel, token).allowed
            # It dies (a crash) while its clients are still connected: the kernel closes
            # the server's side first, so that side of every connection waits in TIME_WAIT.
            first.process.kill()
            first.process.wait(timeout=30)
        finally:
            for channel in channels:
                channel.close()
    # A killed server's connections may also be reset (data still unread): then its side
    # has no TIME_WAIT. Leave one the way a closing server does, so the port is surely in
    # the state a restart must come up through.
    _leave_time_wait(port)
    assert _time_wait_on(port) > 0, "no connection in TIME_WAIT: the test proves nothing"
    with run_server(home, port=port, timeout=10) as second:
        with grpc.insecure_channel(second.address) as channel:
            assert _check_ok(channel, token).allowed
        taken = _policyd(home.config_path, "serve", "--address", second.address, timeout=20)
        assert taken.returncode == 1, taken.stderr
        assert taken.stderr.strip().splitlines() == [
            f"policyd: error: server.address: {second.address} is already in use"
        ]


def test_serve_with_a_tls_file_that_is_not_pem_fails_with_one_line_naming_it(
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    home = Home(tmp_path, f'[server.tls]\ncert_file = "{garbage}"\nkey_file = "{garbage}"\n')
    line = _serve_error(home.config_path)
    assert "server.tls.cert_file" in line


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_burst_of_signals_still_stops_the_server_cleanly(tmp_path: Path, workers: str) -> None:
    # Ctrl-C in `make run` sends SIGINT to the process group while run.sh sends SIGTERM:
    # signals arriving together once deadlocked a handler that took a lock.
    home = Home(tmp_path)
    home.seed()
    for _ in range(3):
        with run_server(home, "--workers", workers) as server:
            for _ in range(30):
                server.process.send_signal(signal.SIGHUP)
            server.process.send_signal(signal.SIGINT)
            server.process.send_signal(signal.SIGTERM)
            server.process.send_signal(signal.SIGINT)
            assert server.process.wait(timeout=20) == 0, server.log()
