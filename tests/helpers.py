"""Shared test helpers: a policyd home in a temp folder, and real server processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policyd.audit.reader import AuditReader, Query
from policyd.audit.records import AuditRecord
from policyd.config import Config, load_config
from policyd.core.model import Access
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import index_target, open_store, token_settings
from policyd.gen.v1 import decision_pb2, decision_pb2_grpc
from policyd.store.base import Store
from policyd.store.keys import KeyRing
from policyd.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent


def dump_store(store: Store) -> str:
    """Every row of every table of the store, as text (either backend)."""
    tables = (
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        if isinstance(store, SqliteStore)
        else "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' ORDER BY table_name"
    )
    with store.read() as conn:
        names = [r[0] for r in conn.execute(tables).fetchall()]
        return "\n".join(
            repr(row)
            for name in names
            for row in conn.execute(f'SELECT * FROM "{name}"').fetchall()
        )


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, from below the kernel's ephemeral range: a port
    the kernel hands out may be taken by any outgoing connection (the tests make many, to
    PostgreSQL too) between this check and the server's bind. Random, so that tests
    running at once rarely pick the same one."""
    low, _ = _ephemeral_ports()
    if low <= 11_000:  # a tuned kernel: fall back on the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    while True:
        port = random.randrange(10_000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Home:
    """A policyd configuration, store and key folder under one temp directory."""

    root: Path
    extra_config: str = ""
    # "" = the SQLite file under root; a postgresql:// URL = that (empty) database.
    store_url: str = ""
    config_path: Path = field(init=False)
    config: Config = field(init=False)
    store: Store = field(init=False, default=None)  # type: ignore[assignment]
    keyring: KeyRing = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.root / "policyd.toml"
        self.write_config(self.extra_config)

    def write_config(self, extra: str = "") -> None:
        audit = ""
        if "[audit]" not in extra:  # a test that configures the audit log names its files
            audit = (
                f'[audit]\npath = "{self.root / "audit.db"}"\n'
                f'key_file = "{self.root / "audit.key"}"\n'
            )
        # The authorization server (its own HTTP port) only where a test asks for it.
        oauth = "" if "[oauth]" in extra else "[oauth]\nenabled = false\n"
        policy = ""
        if "[policy]" not in extra:  # the repo's default policy, wherever the test runs
            policy = f'[policy]\ndir = "{ROOT / "policies"}"\n'
        url = f'url = "{self.store_url}"\n' if self.store_url else ""
        self.config_path.write_text(
            f'[store]\n{url}path = "{self.root / "policyd.db"}"\n'
            f'[tokens]\nkey_dir = "{self.root / "keys"}"\n'
            'issuer = "https://auth.test"\naudience = "hub-test"\n' + audit + policy + oauth + extra
        )
        self.config = load_config(self.config_path, env={})
        if getattr(self, "store", None) is not None:
            self.store.close()
        self.store = open_store(self.config)
        self.keyring = KeyRing(self.store, self.config.tokens.key_dir)

    def seed(self) -> None:
        """app1 (enabled) and app-off (disabled); alice with ds-a (write), ds-b, ds-c (read);
        alice consented UserInfo DataRead DataWrite to app1, granted ds-a write, ds-b read."""
        s = self.store
        scopes = ["UserInfo", "DataRead", "DataWrite", "AccountDebit"]
        s.add_app(
            "app1",
            "App One",
            redirect_uris=["https://app1.test/cb"],
            scopes=scopes,
            confidential=True,
        )
        s.add_app("app-off", "Disabled", redirect_uris=[], scopes=scopes, confidential=False)
        s.set_app_enabled("app-off", False)
        for user in ("alice", "bob"):
            s.add_user(user)
        for ds in ("ds-a", "ds-b", "ds-c"):
            s.add_data_source(ds)
        s.set_user_access("alice", "ds-a", Access.WRITE)
        s.set_user_access("alice", "ds-b", Access.READ)
        s.set_user_access("alice", "ds-c", Access.READ)
        s.set_consent("alice", "app1", ["UserInfo", "DataRead", "DataWrite"])
        s.set_consent("alice", "app-off", ["UserInfo", "DataRead"])
        s.add_grant("alice", "app1", "ds-a", Access.WRITE)
        s.add_grant("alice", "app1", "ds-b", Access.READ)
        self.keyring.ensure_active()

    def token(
        self,
        sub: str = "alice",
        client_id: str = "app1",
        scopes: tuple[str, ...] = ("UserInfo", "DataRead"),
        **kw: Any,
    ) -> str:
        token, _ = issue_token(
            self.keyring,
            token_settings(self.config),
            sub=sub,
            client_id=client_id,
            scopes=scopes,
            **kw,
        )
        return token

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real `policyd` command in a subprocess against this home."""
        return subprocess.run(
            [sys.executable, "-m", "policyd", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
            cwd=self.root,
            env=_env(),
        )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}


@dataclass
class ServerProcess:
    address: str
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def wait_serving(
    address: str,
    timeout: float = 20.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials
            else grpc.insecure_channel(address)
        )
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:
            last = exc
        finally:
            channel.close()
        time.sleep(0.1)
    raise TimeoutError(f"policyd at {address} did not become healthy: {last}")


@contextmanager
def run_server(
    home: Home, *extra_args: str, port: int | None = None, wait: bool = True, **wait_kw: Any
) -> Iterator[ServerProcess]:
    """Start `policyd serve` as a real process on a free port; always stop it."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    log_path = home.root / f"server-{port}-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "policyd",
                "--config",
                str(home.config_path),
                "serve",
                "--address",
                address,
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=home.root,
            env=_env(),
        )
    server = ServerProcess(address, process, log_path)
    try:
        if wait:
            wait_serving(address, **wait_kw)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def check_request(
    token: str, method: str = "GET", path: str = "/api/user/me", query: str = "", body: bytes = b""
) -> decision_pb2.CheckRequest:
    req = decision_pb2.CheckRequest(token=token, request_id="test")
    req.http.method = method
    req.http.path = path
    req.http.query = query
    req.http.body = body
    return req


def decision_stub(channel: grpc.Channel) -> decision_pb2_grpc.DecisionStub:
    return decision_pb2_grpc.DecisionStub(channel)  # type: ignore[no-untyped-call]


def indexed_records(
    where: str | Path | Config, ids: set[str], timeout: float = 10.0
) -> dict[str, AuditRecord]:
    """The records of these decision ids, once the server's indexer has moved them all from
    its journal into the index (within its index's pass_interval when idle). `where`:
    the SQLite audit file, or a config (its index: the PostgreSQL store's, if it has one)."""
    deadline = time.monotonic() + timeout
    while True:
        reader = index_target(where).reader() if isinstance(where, Config) else AuditReader(where)
        try:
            found = {s.record.id: s.record for s in reader.query(Query(limit=100_000))}
        finally:
            reader.close()
        if ids <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def cmdline(pid: int) -> bytes:
    """The process's command line (arguments NUL-separated), or b"" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def child_pids(pid: int) -> list[int]:
    """The running (not zombie) child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


@dataclass
class HubProcess:
    url: str
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def run_hub(
    home: Home, data_sources: str, *, mode: str = "embedded", **settings: str
) -> Iterator[HubProcess]:
    """The reference hub (`python -m examples.hub`) as a real process on a free port, in
    embedded mode on `home`'s config (remote: asking POLICYD_HUB_POLICYD_ADDRESS);
    `settings`: more POLICYD_HUB_* variables, by their suffix. Stopped with SIGTERM."""
    port = free_port()
    env = {
        **_env(),
        "PYTHONPATH": str(ROOT),
        "POLICYD_HUB_PORT": str(port),
        "POLICYD_HUB_DATA_DIR": str(home.root / f"hub-{port}"),
        "POLICYD_HUB_DATA_SOURCES": data_sources,
        "POLICYD_HUB_MODE": mode,
        "POLICYD_HUB_POLICYD_CONFIG": str(home.config_path),
        **{f"POLICYD_HUB_{name.upper()}": value for name, value in settings.items()},
    }
    log_path = home.root / f"hub-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.hub"],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=home.root,
            env=env,
        )
    hub = HubProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{hub.url}/api/info", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not start: {hub.log()}")
            time.sleep(0.1)
        yield hub
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
