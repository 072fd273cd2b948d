"""`make run-cluster` (scripts/run-cluster.sh): a private PostgreSQL, three policyd replicas
sharing it, the hub and one Envoy balancing ext_authz over the replicas. A revocation with
the CLI is seen by every replica on the very next request, and Ctrl-C stops everything,
PostgreSQL included."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from adapters.envoy import config as envoy_config
from policyd import pgserver
from policyd.gen.v1 import decision_pb2
from tests.helpers import (
    ROOT,
    check_request,
    child_pids,
    cmdline,
    decision_stub,
    free_port,
    wait_serving,
)

NODES = ("replica-1", "replica-2", "replica-3")
PATH = "/api/data/tags/edge-historian"


def test_several_policyd_ports_are_balanced_round_robin() -> None:
    ports = envoy_config.Ports(policyd=6001)
    config = envoy_config.render(ports, policyd_replicas=[6002, 6003])
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "policyd"]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        6001,
        6002,
        6003,
    ]
    # One port: the sample's cluster, unchanged.
    single = envoy_config.render(ports)
    (cluster,) = [c for c in single["static_resources"]["clusters"] if c["name"] == "policyd"]
    assert "lb_policy" not in cluster
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 1


def _descendants(pid: int) -> list[int]:
    found = []
    for child in child_pids(pid):
        found += [child, *_descendants(child)]
    return found


def _postmaster(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pids: dict[int, bytes]) -> dict[int, bytes]:
    """Those of these processes that still run (same pid, same command line)."""
    return {pid: cmd for pid, cmd in pids.items() if cmd and cmdline(pid) == cmd}


def _using(folder: Path) -> list[int]:
    """Processes whose command line names the folder (e.g. `postgres -D FOLDER/pg/data`)."""
    needle = str(folder).encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and needle in cmdline(int(p))]


def _need_postgresql() -> None:
    if not pgserver.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb/pg_ctl are missing (.ci/run installs postgresql)")
        pytest.skip("PostgreSQL's initdb/pg_ctl are missing: apt-get install postgresql")


@contextlib.contextmanager
def _cluster(taken_port: int | None = None) -> Iterator[Cluster]:
    """scripts/run-cluster.sh as a process group of its own, on free ports (replica-2 on
    `taken_port` if given), with VAR in a new folder under /tmp (not pytest's tmp_path, mode
    0700: PostgreSQL's own user must reach VAR/pg). Whatever happens, everything it started
    is stopped and the folder removed."""
    _need_postgresql()
    var = Path(tempfile.mkdtemp(prefix="policyd-cluster-"))
    var.chmod(0o755)
    c = Cluster(
        var=var,
        pg_port=free_port(),
        replica_ports=[free_port(), taken_port or free_port(), free_port()],
        envoy_port=free_port(),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(
        BIN=str(Path(sys.executable).parent),
        VAR=str(var),
        PG_PORT=str(c.pg_port),
        REPLICA_PORTS=" ".join(map(str, c.replica_ports)),
        ENVOY_PORT=str(c.envoy_port),
        HUB_PORT=str(free_port()),
        ENVOY_ADMIN_PORT=str(free_port()),
        POLICYD_OAUTH_ADDRESS=f"127.0.0.1:{free_port()}",
    )
    # What the script prints for the CLI in another terminal.
    c.cli_env = dict(
        env,
        POLICYD_STORE_URL=f"postgresql://policyd@127.0.0.1:{c.pg_port}/policyd",
        POLICYD_STORE_PATH=str(var / "policyd.db"),
        POLICYD_TOKENS_KEY_DIR=str(var / "keys"),
        POLICYD_AUDIT_PATH=str(var / "audit.db"),
        POLICYD_AUDIT_KEY_FILE=str(var / "audit.key"),
    )
    log = open(c.log_path, "w")  # noqa: SIM115 (closed in finally)
    c.process = subprocess.Popen(
        ["bash", "scripts/run-cluster.sh"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield c
    finally:
        if c.process.poll() is None:
            os.killpg(c.process.pid, signal.SIGKILL)  # never leave the processes behind
            c.process.wait()
        c.pg.stop(mode="immediate")  # before the rest: PostgreSQL's own way, not SIGKILL
        for pid in _alive(c.started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(var, ignore_errors=True)


@dataclass
class Cluster:
    var: Path
    pg_port: int
    replica_ports: list[int]
    envoy_port: int
    cli_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] = field(init=False)
    # Every process the script started (pid: command line), once they all run.
    started: dict[int, bytes] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.var / "run-cluster.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pg(self) -> pgserver.PgServer:
        return pgserver.PgServer(self.var / "pg", self.pg_port)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "policyd", *args],
            capture_output=True, text=True, env=self.cli_env, timeout=60, cwd=ROOT,
        )  # fmt: skip

    def assert_all_gone(self) -> None:
        out = self.log()
        assert "Traceback" not in out, out
        assert not _alive(self.started), (_alive(self.started), out)
        assert not _using(self.var), out  # no postgres (nor anything else) left on the folder
        assert not self.pg.running(), out  # pg_ctl status


@pytest.mark.slow
def test_run_cluster_revokes_on_every_replica_and_stops_everything() -> None:
    began = time.monotonic()
    with _cluster() as c:
        for port in c.replica_ports:
            wait_serving(f"127.0.0.1:{port}", timeout=120)
        envoy = f"http://127.0.0.1:{c.envoy_port}"
        token = (c.var / "demo-alice.token").read_text().strip()
        bearer = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 60
        while True:  # Envoy and the hub are up
            try:
                if httpx.get(envoy + PATH, headers=bearer, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, c.log()
            time.sleep(0.1)
        for _ in range(6):  # round robin: every replica answers some of these
            read = httpx.get(envoy + PATH, headers=bearer, timeout=5)
            assert read.status_code == 200, read.text
            assert read.json()["data_source"] == "edge-historian"
        # Everything the script started, before it stops: the replicas and their audit
        # indexers, the hub, Envoy (descendants of the script) and PostgreSQL (a daemon).
        postmaster = _postmaster(c.pg.data)
        assert postmaster is not None
        pids = [*_descendants(c.process.pid), postmaster, *_descendants(postmaster)]
        c.started = {pid: cmdline(pid) for pid in pids}
        commands = b"\n".join(c.started.values())
        assert commands.count(b"policyd\x00serve") == 3, commands
        assert b"envoy-cluster.json" in commands and b"examples.hub" in commands

        revoked = c.cli("grants", "revoke", "alice", "demo-app", "edge-historian")
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        try:
            # The very next request through Envoy, whichever replica it reaches, is denied.
            for _ in range(6):
                denied = httpx.get(envoy + PATH, headers=bearer, timeout=5)
                assert denied.status_code == 403, denied.text
                assert denied.json()["reason"] == "DATA_SOURCE_NOT_GRANTED"
            # Each replica, asked directly over the Decision API, denies it.
            for port in c.replica_ports:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    reply = decision_stub(channel).Check(check_request(token, path=PATH), timeout=5)
                assert not reply.allowed, port
                assert reply.reason == decision_pb2.DATA_SOURCE_NOT_GRANTED, port
            # The audit log names the replica of each record: Envoy's denials came from all.
            deadline = time.monotonic() + 30
            while True:
                query = c.cli(
                    "audit", "query", "--since", "10m", "--door", "envoy",
                    "--decision", "deny", "--json",
                )  # fmt: skip
                assert query.returncode == 0, query.stderr
                nodes = {json.loads(line)["node"] for line in query.stdout.splitlines()}
                if nodes == set(NODES) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert nodes == set(NODES), query.stdout
        finally:
            restored = c.cli(
                "grants", "add", "alice", "demo-app", "edge-historian", "--access", "write"
            )
        assert restored.returncode == 0, restored.stdout + restored.stderr
        again = httpx.get(envoy + PATH, headers=bearer, timeout=5)
        assert again.status_code == 200, again.text

        # Ctrl-C in the terminal, and an impatient SIGTERM right after it: stopping goes on
        # to the end, PostgreSQL included.
        stopping = time.monotonic()
        os.killpg(c.process.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(c.process.pid, signal.SIGTERM)
        c.process.wait(timeout=60)
        c.assert_all_gone()
        print(
            f"run-cluster: up, through the walkthrough and down in {time.monotonic() - began:.1f}"
            f" s (down in {time.monotonic() - stopping:.1f} s)"
        )


@pytest.mark.slow
def test_a_failed_start_stops_what_was_started() -> None:
    """A replica's port is taken: the script stops the rest, PostgreSQL included, with a
    one-line error and no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with _cluster(taken_port=port) as c:
            status = c.process.wait(timeout=120)
            out = c.log()
            assert status != 0, out
            assert f"server.address: 127.0.0.1:{port} is already in use" in out, out
            c.assert_all_gone()
