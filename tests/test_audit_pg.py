"""The audit log of several replicas in one PostgreSQL database (policyd/audit/pg.py).

Real PostgreSQL (tests/pg_support.py), no mocks: each replica (node) has its own journals
and its own indexer, and extends its own chain in the shared tables.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from policyd.audit.journal import AuditLog, Indexer
from policyd.audit.pg import PgIndex
from policyd.audit.reader import Query, follow
from policyd.audit.records import load_key
from policyd.audit.target import IndexTarget
from policyd.cli import main
from policyd.core.urls import redact
from policyd.decision.wiring import index_target
from tests.helpers import Home, check_request, decision_stub, run_server
from tests.pg_support import pg_url
from tests.test_audit import _record

__all__ = ["pg_url"]  # a fixture, used by name


class Node:
    """One replica's audit side: its journals (audit path), its name, its indexer."""

    def __init__(self, root: Path, name: str, url: str, key: bytes) -> None:
        self.name = name
        self.path = root / name / "audit.db"
        self.path.parent.mkdir(parents=True)
        self.key = key
        self.target = IndexTarget(self.path, url, name)
        self.log = AuditLog(self.path, key, index=self.target)

    def indexer(self) -> Indexer:
        return Indexer(
            self.path, self.key, index=self.target.writer(), journals=self.target.journals
        )


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return load_key(tmp_path / "audit.key", create=True)


def _write(node: Node, n: int, prefix: str, pause_every: int = 0) -> list[str]:
    """n records through the node's journal, as its server would (a pause of 3 ms after
    every `pause_every` records, to spread them over many indexing passes)."""
    ids = []
    for i in range(n):
        record = _record(request_id=f"{prefix}{i}", user_id=f"user-{node.name}")
        node.log.record(record)
        ids.append(record.id)
        if pause_every and i % pause_every == 0:
            time.sleep(0.003)
    return ids


def _rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def _change(url: str, sql: str) -> None:
    """Tamper with the tables as someone with write access to the database could."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def _indexed(url: str, n: int, timeout: float = 60.0) -> int:
    """Wait until the database holds n records; how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        made = _rows(url, "SELECT to_regclass('audit_records') IS NOT NULL")[0][0]
        count = int(_rows(url, "SELECT count(*) FROM audit_records")[0][0]) if made else 0
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


# -- two replicas, one database -------------------------------------------------------------


def test_two_nodes_index_concurrently_into_one_database_each_its_own_chain(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    nodes = [Node(tmp_path, name, pg_url, key) for name in ("node-a", "node-b")]
    for node in nodes:
        node.log.start()  # its records wait for its indexer, as in a server
    indexers = [node.indexer() for node in nodes]
    stop = threading.Event()
    running = [
        threading.Thread(target=ix.run, args=(stop,), kwargs={"interval": 0.005}) for ix in indexers
    ]
    for thread in running:
        thread.start()
    written: dict[str, list[str]] = {}
    writers = [
        threading.Thread(
            target=lambda n=node: written.__setitem__(n.name, _write(n, 600, n.name, 5))
        )
        for node in nodes
    ]
    try:
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        assert _indexed(pg_url, 1200) == 1200
    finally:
        stop.set()
        for thread in running:
            thread.join(timeout=30)
        for node in nodes:
            node.log.close()
        for ix in indexers:
            ix.close()
    assert all(ix.commits > 10 for ix in indexers)  # both indexed while the other did
    reader = nodes[0].target.reader(key)
    try:
        records = reader.query(Query(limit=10_000))
        by_node: dict[str, list[int]] = {}
        for stored in records:
            by_node.setdefault(stored.node, []).append(stored.seq)
            assert stored.record.user_id == f"user-{stored.node}"  # in its own node's chain
        # Each chain is 1..600 with no gap and no record of the other node in it.
        assert {n: sorted(seqs) for n, seqs in by_node.items()} == {
            "node-a": list(range(1, 601)),
            "node-b": list(range(1, 601)),
        }
        assert {s.record.id for s in records} == {*written["node-a"], *written["node-b"]}
        results = reader.verify_chains()
        assert [(r.node, r.ok, r.checked) for r in results] == [
            ("node-a", True, 600),
            ("node-b", True, 600),
        ]
        assert reader.stats(None, None)["node"] == {"node-a": 600, "node-b": 600}
        only_b = reader.query(Query(node="node-b", limit=10_000))
        assert len(only_b) == 600 and {s.node for s in only_b} == {"node-b"}
        assert reader.query(Query(user_id="user-node-a", limit=5))[-1].node == "node-a"
        shown = reader.show(written["node-b"][7])
        assert shown is not None and shown.node == "node-b" and shown.seq == 8
        assert shown.as_dict()["node"] == "node-b"
    finally:
        reader.close()


def test_tail_follows_the_records_of_every_node(pg_url: str, tmp_path: Path, key: bytes) -> None:
    nodes = [Node(tmp_path, name, pg_url, key) for name in ("a", "b")]
    for node in nodes:
        _write(node, 3, f"old-{node.name}")  # not started: indexed before record() returns
    reader = nodes[0].target.reader(key)
    stop = threading.Event()
    seen: list[str] = []

    def tail() -> None:
        for stored in follow(reader, Query(), poll=0.02, stop=stop):
            seen.append(f"{stored.node}:{stored.record.request_id}")

    thread = threading.Thread(target=tail)
    position = reader.position()
    assert position == {"a": 3, "b": 3}
    thread.start()
    try:
        time.sleep(0.1)
        _write(nodes[1], 2, "new-b")
        _write(nodes[0], 2, "new-a")
        deadline = time.monotonic() + 10
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=10)
        for node in nodes:
            node.log.close()
    assert sorted(seen) == ["a:new-a0", "a:new-a1", "b:new-b0", "b:new-b1"]
    tail_query = reader.query(Query(limit=4))  # what `audit tail -n 4` prints
    assert [s.record.request_id for s in tail_query] == ["new-b0", "new-b1", "new-a0", "new-a1"]
    reader.close()


def test_verify_names_the_node_and_record_of_a_tampered_row(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    nodes = [Node(tmp_path, name, pg_url, key) for name in ("a", "b")]
    for node in nodes:
        _write(node, 5, node.name)
        node.log.close()
    edited = _rows(pg_url, "SELECT id FROM audit_records WHERE node = 'b' AND seq = 3")[0][0]
    _change(pg_url, "UPDATE audit_records SET user_id = 'mallory' WHERE node = 'b' AND seq = 3")
    reader = nodes[0].target.reader(key)
    a, b = reader.verify_chains()
    assert (a.node, a.ok, a.checked) == ("a", True, 5)
    assert (b.node, b.ok, b.checked, b.seq) == ("b", False, 2, 3)
    assert b.problem == f"record 3 ({edited}) does not match its hash: edited"
    # The newest records deleted (no gap to see): the chain's head says they are missing.
    _change(pg_url, "DELETE FROM audit_records WHERE node = 'a' AND seq >= 4")
    a, _ = reader.verify_chains()
    assert (a.ok, a.checked, a.problem) == (
        False,
        3,
        "records 4 to 5 are missing (the chain's head is record 5): deleted",
    )
    reader.close()


def test_a_chain_made_with_another_key_is_named_not_called_edited(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    other = Node(tmp_path, "elsewhere", pg_url, b"k" * 32)
    _write(other, 2, "x")
    other.log.close()
    (result,) = PgIndex(pg_url, "here", key=key).verify_chains()
    assert (result.node, result.ok) == ("elsewhere", False)
    assert "another audit key" in result.problem


def test_one_nodes_indexers_running_twice_never_fork_its_chain(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    # A restart overlapping the old indexer, or `policyd audit index` by hand beside the
    # server's: two indexers of one node, on one journal folder, at once.
    node = Node(tmp_path, "n", pg_url, key)
    node.log.start()
    indexers = [node.indexer(), node.indexer()]
    stop = threading.Event()
    threads = [
        threading.Thread(target=ix.run, args=(stop,), kwargs={"interval": 0.001}) for ix in indexers
    ]
    for thread in threads:
        thread.start()
    try:
        ids = _write(node, 1500, "r")
        assert _indexed(pg_url, 1500) == 1500
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        node.log.close()
    assert sum(ix.records for ix in indexers) == 1500  # each record indexed by one of them
    rows = _rows(pg_url, "SELECT seq, id FROM audit_records ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, 1501))
    assert sorted(r[1] for r in rows) == sorted(ids)
    reader = node.target.reader(key)
    assert [(r.ok, r.checked) for r in reader.verify_chains()] == [(True, 1500)]
    reader.close()
    for ix in indexers:
        ix.close()


def test_the_schema_is_made_once_when_replicas_start_together(pg_url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def open_index(i: int) -> None:
        start.wait()
        try:
            PgIndex(pg_url, f"n{i}").close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_index, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [r[0] for r in _rows(pg_url, "SELECT version FROM audit_schema")] == [1]
    tables = _rows(
        pg_url,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    assert [t[0] for t in tables] == [
        "audit_chains",
        "audit_data_sources",
        "audit_journals",
        "audit_records",
        "audit_schema",
    ]


def test_prune_moves_each_nodes_anchor_and_both_chains_still_verify(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    nodes = [Node(tmp_path, name, pg_url, key) for name in ("a", "b")]
    now = time.time()
    for node in nodes:
        for i in range(10):
            node.log.record(_record(ts=now - (10 - i) * 3600, request_id=f"{node.name}{i}"))
        node.log.close()
    index = nodes[0].target.writer()
    assert index.prune(before=now - 5.5 * 3600) == 10  # records 1-5 of each chain
    reader = nodes[0].target.reader(key)
    assert [(r.node, r.ok, r.checked) for r in reader.verify_chains()] == [
        ("a", True, 5),
        ("b", True, 5),
    ]
    assert _rows(pg_url, "SELECT count(*) FROM audit_data_sources")[0][0] == 10
    # By size: the tables are over any limit this small, so the oldest share goes too.
    assert index.prune(max_bytes=1) == 10
    assert [(r.ok, r.checked) for r in reader.verify_chains()] == [(True, 0), (True, 0)]
    # New records still chain on after a chain pruned to nothing.
    again = Node(tmp_path / "again", "a", pg_url, key)
    _write(again, 2, "later")
    again.log.close()
    a, _ = reader.verify_chains()
    assert (a.node, a.ok, a.checked) == ("a", True, 2)
    reader.close()
    index.close()


def test_a_nul_in_a_field_is_stored_as_u_fffd_and_still_verifies(
    pg_url: str, tmp_path: Path, key: bytes
) -> None:
    node = Node(tmp_path, "n", pg_url, key)
    node.log.record(_record(request_id="a\0b"))
    node.log.close()
    reader = node.target.reader(key)
    (stored,) = reader.query(Query())
    assert stored.record.request_id == "a\ufffdb"
    assert [r.ok for r in reader.verify_chains()] == [True]
    reader.close()


# -- the commands, as real processes ----------------------------------------------------------


def _pg_home(root: Path, url: str, node: str, *, seed: bool = True) -> Home:
    """A home on the test database (policy store and audit index) whose replica is `node`;
    `seed`: the store gets the standard test data (once per database)."""
    root.mkdir(parents=True, exist_ok=True)
    home = Home(root, extra_config=f'[cluster]\nnode = "{node}"\n', store_url=url)
    if seed:
        home.seed()
    assert home.config.postgres
    return home


def test_cli_query_verify_and_stats_read_every_node_from_postgres(
    pg_url: str, tmp_path: Path
) -> None:
    homes = [_pg_home(tmp_path / n, pg_url, n, seed=n == "h1") for n in ("h1", "h2")]
    key = load_key(homes[0].config.audit.key_file, create=True)
    load_key(homes[1].config.audit.key_file, create=True)
    Path(homes[1].config.audit.key_file).write_bytes(key)  # one key for the cluster
    for home, n in zip(homes, (3, 4), strict=True):
        audit = AuditLog(home.config.audit.path, key, index=index_target(home.config))
        audit.start()  # journals only: `policyd audit index` moves them below
        for i in range(n):
            audit.record(_record(request_id=f"{home.config.node}-{i}"))
        audit.close()
        result = home.cli("audit", "index")
        assert (result.returncode, result.stdout) == (0, f"indexed {n} records\n"), result.stderr
    h1 = homes[0]
    result = h1.cli("audit", "query", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((r["node"], r["seq"]) for r in rows) == [
        *(("h1", i) for i in range(1, 4)),
        *(("h2", i) for i in range(1, 5)),
    ]
    result = h1.cli("audit", "query", "--node", "h2", "--json")
    assert [json.loads(line)["request_id"] for line in result.stdout.splitlines()] == [
        f"h2-{i}" for i in range(4)
    ]
    result = h1.cli("audit", "stats", "--json")
    stats = json.loads(result.stdout)
    assert stats["node"] == {"h2": 4, "h1": 3}
    assert stats["decision"] == {"allow": 7}
    result = h1.cli("audit", "verify", "--json")
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(v["node"], v["ok"], v["checked"]) for v in verdicts] == [
        ("h1", True, 3),
        ("h2", True, 4),
    ]
    _change(pg_url, "UPDATE audit_records SET decision = 'deny' WHERE node = 'h2' AND seq = 2")
    result = h1.cli("audit", "verify")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("node h1: ok: 3 records, chain head ")
    assert lines[1].startswith("node h2: broken after 1 good records: record 2 (")
    assert lines[1].endswith("does not match its hash: edited")


def _config_only(root: Path, url: str) -> Home:
    """A home (made on SQLite) whose config then names `url` as its store: for a database
    that cannot be reached."""
    root.mkdir(parents=True, exist_ok=True)
    home = Home(root)
    text = home.config_path.read_text()
    home.config_path.write_text(text.replace("[store]\n", f'[store]\nurl = "{url}"\n', 1))
    return home


def test_an_unreachable_database_is_a_one_line_error_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _config_only(tmp_path, "postgresql://policyd:s3cret-pw@127.0.0.1:1/nowhere")
    code = main(["--config", str(home.config_path), "audit", "query"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "policyd: error: cannot connect to the audit database"
        " postgresql://policyd:***@127.0.0.1:1/nowhere: "
    )
    assert "s3cret-pw" not in err
    bad = _config_only(tmp_path / "bad", "postgresql://policyd:s3cret-pw@127.0.0.1:port/db")
    code = main(["--config", str(bad.config_path), "audit", "stats"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err and "s3cret-pw" not in err
    assert err.startswith("policyd: error: cannot connect to the audit database ")
    assert redact("postgresql://u:p@h/db?password=p") == "postgresql://u:***@h/db?password=***"


def _index_follow(home: Home) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "policyd", "--config", str(home.config_path)),
            *("audit", "index", "--follow"),
        ],
        cwd=home.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts: killed at the end, whatever happened."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_kill_9_of_an_indexer_mid_run_then_a_restart_loses_and_duplicates_nothing(
    pg_url: str, tmp_path: Path, stopped: list[subprocess.Popen[bytes]]
) -> None:
    home = _pg_home(tmp_path, pg_url, "n1")
    audit = AuditLog(
        home.config.audit.path,
        load_key(home.config.audit.key_file, create=True),
        index=index_target(home.config),
    )
    audit.start()  # as a server: the indexer process indexes
    written: list[str] = []
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            record = _record(request_id=f"r{len(written)}")
            audit.record(record)
            written.append(record.id)
            if len(written) % 50 == 0:
                time.sleep(0.001)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        first = _index_follow(home)
        stopped.append(first)
        assert 0 < _indexed(pg_url, 2000) < len(written) + 1
        first.send_signal(signal.SIGKILL)  # mid-run: records keep coming meanwhile
        first.wait()
        time.sleep(0.2)
        second = _index_follow(home)
        stopped.append(second)
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join()
        audit.close()  # its journal ends: the indexer finishes and deletes it
    assert _indexed(pg_url, len(written)) == len(written)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    rows = _rows(pg_url, "SELECT seq, id FROM audit_records WHERE node = 'n1' ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, len(written) + 1))  # one chain, no gap
    assert sorted(r[1] for r in rows) == sorted(written)  # none lost, none twice
    result = home.cli("audit", "verify")
    assert result.returncode == 0 and result.stdout.startswith(
        f"node n1: ok: {len(written)} records"
    ), result.stdout + result.stderr
    assert list(Path(str(home.config.audit.path) + ".journal").glob("*.journal")) == []


def test_check_local_on_a_postgres_store_indexes_its_record_there(
    pg_url: str, tmp_path: Path
) -> None:
    home = _pg_home(tmp_path, pg_url, "laptop")
    result = home.cli("check", "--local", "--token", home.token(), "--path", "/api/user/me")
    assert result.returncode == 0, result.stderr
    rows = _rows(pg_url, "SELECT node, door, user_id FROM audit_records")
    assert rows == [("laptop", "cli", "alice")]


def test_a_server_on_a_postgres_store_indexes_its_decisions_there_under_its_node(
    pg_url: str, tmp_path: Path
) -> None:
    home = _pg_home(tmp_path, pg_url, "replica-1")
    token = home.token()
    ids = []
    with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        for _ in range(20):
            reply = stub.Check(check_request(token), timeout=5)
            assert reply.allowed
            ids.append(reply.decision_id)
        assert _indexed(pg_url, 20, timeout=20) == 20
        # Its watch reads the marks from PostgreSQL too: it keeps answering.
        time.sleep(home.config.audit.timeout_seconds + 0.5)
        reply = stub.Check(check_request(token), timeout=5)
        assert reply.allowed  # not AUDIT_UNAVAILABLE
        ids.append(reply.decision_id)
    rows = _rows(pg_url, "SELECT node, id FROM audit_records ORDER BY seq")
    assert sorted(r[1] for r in rows) == sorted(ids)
    assert {r[0] for r in rows} == {"replica-1"}


def test_the_indexer_says_when_its_nodes_newest_records_were_deleted(
    tmp_path: Path, pg_url: str, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL too: the chain's head is read from the node's records (not from its
    audit_chains row, which only the indexer writes), so deleting the newest records is
    said and counted (metrics' policyd_audit_verify_failures_total) at the next pass."""
    node = Node(tmp_path, "here", pg_url, key)
    node.log.start()  # its records wait for its indexer, as in a server
    indexer = node.indexer()
    try:
        _write(node, 4, "a")
        assert indexer.run_once() == 4
        _write(node, 1, "b")
        assert indexer.run_once() == 1
        assert indexer.chain_breaks == 0
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the newest two deleted
            conn.execute("DELETE FROM audit_records WHERE node = 'here' AND seq >= 4")
        _write(node, 1, "c")
        with caplog.at_level(logging.ERROR, logger="policyd.audit.journal"):
            assert indexer.run_once() == 1
        assert indexer.chain_breaks == 1
        assert "ends at record 3, but this indexer left it at record 5" in caplog.text
        _write(node, 1, "d")  # said once
        assert indexer.run_once() == 1
        assert indexer.chain_breaks == 1
    finally:
        node.log.close()
        indexer.close()
