"""The audit log: records, group commit, hash chain, queries, follow, retention, durability."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

from policyd.audit import journal as journal_module
from policyd.audit.index import SqliteIndex
from policyd.audit.journal import JOURNAL_SUFFIX, AuditLog, Indexer, LineTemplate
from policyd.audit.reader import AuditReader, Query, prune, verify
from policyd.audit.records import (
    CANONICAL,
    FIELDS,
    AuditRecord,
    AuditUnavailable,
    chain_hash,
    fields_of_line,
    journal_dir,
    json_strings,
    load_key,
    masked_path,
    open_log_file,
    record_for,
)
from policyd.cli import main
from policyd.core.ids import new_id
from policyd.core.model import CheckInput, Decision, HttpTarget
from policyd.core.reasons import Reason
from policyd.serve.indexer import INDEXER_ENV
from tests.helpers import (
    Home,
    ServerProcess,
    check_request,
    decision_stub,
    indexed_records,
    run_server,
)

# -- helpers ------------------------------------------------------------------------------


def _record(**overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "id": new_id(),
        "ts": time.time(),
        "decision": "allow",
        "reason": "ALLOWED",
        "rule_id": "tags-search",
        "policy_version": "v1",
        "client_id": "app1",
        "user_id": "alice",
        "scopes": ("DataRead",),
        "data_sources": ("ds-a",),
        "action": "tags.search",
        "method": "GET",
        "path": "/api/data/tags/ds-a",
        "door": "grpc",
        "request_id": "r",
        "jti": "j",
        "latency_us": 10,
        "message": "allowed",
    }
    fields.update(overrides)
    if "id" not in overrides:  # as in the server: the id's clock is the decision's time
        fields["id"] = new_id(int(fields["ts"] * 1000))
    return AuditRecord(**fields)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return load_key(tmp_path / "audit.key", create=True)


def _filled(path: Path, key: bytes, records: list[AuditRecord]) -> None:
    audit = AuditLog(path, key)
    for rec in records:
        audit.record(rec)
    audit.close()


def _cli(home: Home, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(home.config_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def serving(seeded: Home) -> Iterator[tuple[Home, ServerProcess, Any]]:
    with run_server(seeded) as server, grpc.insecure_channel(server.address) as channel:
        yield seeded, server, decision_stub(channel)


# -- what a record holds ------------------------------------------------------------------


def test_every_check_over_grpc_is_recorded_with_its_fields_and_no_secrets(
    serving: tuple[Home, ServerProcess, Any],
) -> None:
    home, _, stub = serving
    token = home.token()
    allow = stub.Check(
        check_request(token, path="/api/data/tags/ds-a", query="name=secret-tag&x=1"), timeout=5
    )
    deny = stub.Check(check_request(token, path="/api/data/tags/ds-c"), timeout=5)
    by_id = indexed_records(home.config.audit.path, {allow.decision_id, deny.decision_id})
    assert set(by_id) == {allow.decision_id, deny.decision_id}
    a = by_id[allow.decision_id]
    assert (a.decision, a.reason, a.rule_id, a.action) == (
        "allow",
        "ALLOWED",
        "tags-search",
        "tags.search",
    )
    assert (a.client_id, a.user_id, a.scopes, a.data_sources) == (
        "app1",
        "alice",
        ("UserInfo", "DataRead"),
        ("ds-a",),
    )
    assert (a.method, a.door, a.request_id) == ("GET", "grpc", "test")
    assert a.path == "/api/data/tags/ds-a?name=*&x=*"
    assert a.jti == allow.principal.jti and a.jti
    assert a.policy_version == allow.policy_version
    assert a.latency_us > 0
    d = by_id[deny.decision_id]
    assert (d.decision, d.reason) == ("deny", "DATA_SOURCE_NOT_GRANTED")
    log_file = Path(home.config.audit.path)
    journals = list(journal_dir(log_file).glob("*"))
    assert journals  # the server's journal, still open: read with the log and its WAL
    files = [*log_file.parent.glob("audit.db*"), *journals]
    raw = b"".join(p.read_bytes() for p in files if p.is_file())
    assert token.encode() not in raw
    assert token.split(".")[2].encode() not in raw  # not even the signature
    assert b"secret-tag" not in raw


def test_audit_masks_query_values_left_in_the_path() -> None:
    """audit.masked_path: a Decision API caller that leaves the query in `http.path` (the
    engine denies it, PATH_AMBIGUOUS) had its query values, e.g. an access_token, stored
    verbatim in the audit log."""
    target = HttpTarget("GET", "/api/data/tags/x?access_token=SECRET#frag", "a=b", {}, b"")
    method, path = masked_path(target)
    assert "SECRET" not in path and "frag" not in path
    assert (method, path) == ("GET", "/api/data/tags/x?access_token=*&a=*")


def test_local_cli_check_is_recorded_with_door_cli(
    seeded: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    token = seeded.token()
    code, _, _ = _cli(
        seeded,
        capsys,
        "check",
        "--local",
        "--token",
        token,
        "--path",
        "/api/user/me",
        "--request-id",
        "req-7",
    )
    assert code == 0
    [stored] = AuditReader(seeded.config.audit.path).query(Query(request_id="req-7"))
    assert stored.record.door == "cli"
    assert stored.record.reason == "ALLOWED"


def test_audit_log_file_and_key_are_private(log_path: Path, key: bytes, tmp_path: Path) -> None:
    _filled(log_path, key, [_record()])
    assert log_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "audit.key").stat().st_mode & 0o777 == 0o600


# -- durability and group commit ----------------------------------------------------------


def _journal_lines(log_path: Path) -> list[bytes]:
    """The lines (complete or not) the journals hold; their unused ends read as zeros."""
    return [
        line
        for path in sorted(journal_dir(log_path).glob("*" + JOURNAL_SUFFIX))
        for line in path.read_bytes().split(b"\0", 1)[0].splitlines()
    ]


def _count(log_path: Path) -> int:
    with sqlite3.connect(log_path) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


def test_record_returns_only_once_its_line_is_in_the_journal(log_path: Path, key: bytes) -> None:
    audit = AuditLog(log_path, key)
    audit.start()  # a server's log: an indexer process indexes, and none runs here
    try:
        for _ in range(20):
            rec = _record()
            audit.record(rec)
            assert rec.canonical().encode() in _journal_lines(log_path)
        assert _count(log_path) == 0
    finally:
        audit.close()
    assert Indexer(log_path, key).run_once() == 20
    assert AuditReader(log_path, key).verify().checked == 20
    assert _journal_lines(log_path) == []  # closed and indexed: deleted


def test_an_indexer_moves_records_into_the_log_in_batches(log_path: Path, key: bytes) -> None:
    audit = AuditLog(log_path, key)
    audit.start()
    indexer = Indexer(log_path, key)
    stop = threading.Event()
    indexing = threading.Thread(target=indexer.run, args=(stop,))
    indexing.start()
    ids: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            rec = _record()
            audit.record(rec)
            with lock:
                ids.append(rec.id)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(indexed_records(log_path, set(ids))) == set(ids)  # while the log is open
        assert indexer.records == 1600
        assert indexer.commits < indexer.records / 5  # many records per transaction
    finally:
        audit.close()
        stop.set()
        indexing.join()
        indexer.close()
    assert AuditReader(log_path, key).verify().checked == 1600
    assert _journal_lines(log_path) == []


def test_without_start_record_indexes_before_returning(log_path: Path, key: bytes) -> None:
    audit = AuditLog(log_path, key)  # as `policyd check --local` uses it
    other = sqlite3.connect(log_path)
    for _ in range(5):
        rec = _record()
        audit.record(rec)
        assert other.execute("SELECT count(*) FROM audit WHERE id = ?", (rec.id,)).fetchone()[0]
    audit.close()


_CRASH = """
import os, sys, time
from policyd.audit.records import load_key
from policyd.audit.journal import AuditLog
from tests.test_audit import _record
audit = AuditLog(sys.argv[1], load_key(sys.argv[2]))
audit.start()  # no indexing in this process
for i in range(int(sys.argv[3])):
    audit.record(_record(request_id=f"{sys.argv[4]}{i}"))
if sys.argv[4] == "torn":  # as if killed in the middle of a record
    audit._journal.append(b'["01a0')
print("written", flush=True)
if sys.argv[4] == "hold":  # alive: its journal is locked
    time.sleep(60)
os._exit(0)  # like kill -9: no close
"""


def _writer(log_path: Path, n: int, how: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", _CRASH),
            *(str(log_path), str(log_path.parent / "audit.key"), str(n), how),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "written\n"
    return process


def test_journals_of_ended_processes_are_indexed_whole_then_deleted(
    log_path: Path, key: bytes
) -> None:
    _writer(log_path, 30, "clean").wait()
    _writer(log_path, 20, "torn").wait()
    assert len(_journal_lines(log_path)) == 51
    indexer = Indexer(log_path, key)
    assert indexer.run_once() == 50  # the torn line was never a returned record()
    assert indexer.run_once() == 0  # never indexed twice
    reader = AuditReader(log_path, key)
    assert reader.verify().checked == 50
    assert {s.record.request_id for s in reader.query(Query(limit=100))} == {
        *(f"clean{i}" for i in range(30)),
        *(f"torn{i}" for i in range(20)),
    }
    assert _journal_lines(log_path) == []
    assert list(journal_dir(log_path).iterdir()) == []


def test_a_live_writers_journal_is_indexed_but_kept(log_path: Path, key: bytes) -> None:
    writer = _writer(log_path, 10, "hold")
    indexer = Indexer(log_path, key)
    try:
        assert indexer.run_once() == 10
        assert len(_journal_lines(log_path)) == 10  # still its writer's
    finally:
        writer.kill()
        writer.wait()
    assert indexer.run_once() == 0  # now it has ended: nothing more, and deleted
    assert _journal_lines(log_path) == []
    assert AuditReader(log_path, key).verify().checked == 10


def test_records_are_audit_unavailable_while_no_journal_can_be_made(
    log_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(log_path, key, journal_bytes=1000)  # about 3 records
    audit.record(_record())
    real = journal_module._Journal.__init__

    def full_disk(self: Any, directory: Path, size: int, sync_dir: bool = False) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module._Journal, "__init__", full_disk)
    with pytest.raises(AuditUnavailable, match="No space left"):
        for _ in range(4):
            audit.record(_record())
    monkeypatch.setattr(journal_module._Journal, "__init__", real)
    audit.record(_record())  # space again: a new journal
    audit.close()
    assert AuditReader(log_path, key).verify().ok


def test_a_full_journal_is_replaced_and_deleted_onceindexed_records(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key, journal_bytes=1000)  # about 3 records
    names = set()
    for _ in range(30):
        audit.record(_record())
        names.add(audit._journal.name)
        assert len(list(journal_dir(log_path).glob("*" + JOURNAL_SUFFIX))) == 1
    audit.close()
    assert len(names) >= 8
    assert AuditReader(log_path, key).verify().checked == 30


def test_records_are_refused_while_the_indexer_is_too_far_behind(
    log_path: Path, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="policyd.audit.journal")
    audit = AuditLog(log_path, key, timeout=0.3)
    audit.start()
    try:
        audit.record(_record())  # and no indexer runs
        deadline = time.monotonic() + 10
        with pytest.raises(AuditUnavailable, match=r"not indexed records for 0\.3 s"):
            while time.monotonic() < deadline:
                audit.record(_record())
                time.sleep(0.02)
        indexer = Indexer(log_path, key)
        indexer.run_once()  # it catches up: records are taken again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                audit.record(_record())
                break
            except AuditUnavailable:
                time.sleep(0.05)
        else:
            pytest.fail("records were still refused after the indexer caught up")
        indexer.close()
        said = [r.getMessage() for r in caplog.records]
        assert sum("denying decisions until it catches up" in m for m in said) == 1
        assert sum("has caught up: answering decisions again" in m for m in said) == 1
    finally:
        audit.close()


ODD = 'quote " backslash \\ tab \t nul \x00 line\nbreak é 漢 \U0001f600'


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"message": ODD, "path": "/api/data/tags/ünï?q=*", "jti": ODD},
        {"data_sources": (), "scopes": (), "jti": "", "action": "", "rule_id": ODD},
        {"data_sources": ("a", ODD), "scopes": ("UserInfo", "DataRead"), "door": "envoy"},
    ],
)
@pytest.mark.parametrize(
    ("ts", "request_id", "latency_us"),
    [(time.time(), "r-1", 12), (1.0, ODD, 0), (1e10 + 0.123456789, "x" * 500, 10**9)],
)
def test_a_line_template_makes_exactly_the_canonical_record(
    fields: dict[str, Any], ts: float, request_id: str, latency_us: int
) -> None:
    first = _record(**fields)
    template = LineTemplate.of(first)
    again = replace(first, id=new_id(), ts=ts, request_id=request_id[:200], latency_us=latency_us)
    line = template.line(again.id, ts, request_id, latency_us)
    assert line == again.canonical()
    assert json.loads(line)[14] == request_id[:200]


@pytest.mark.slow
def test_sigkill_under_load_loses_no_record_of_an_answered_decision(seeded: Home) -> None:
    received: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    token = seeded.token()
    with run_server(seeded) as server:

        def drive() -> None:
            with grpc.insecure_channel(server.address) as channel:
                stub = decision_stub(channel)
                while not stop.is_set():
                    try:
                        r = stub.Check(check_request(token, path="/api/data/tags/ds-a"), timeout=2)
                    except grpc.RpcError:
                        return  # the server died: this call was never answered
                    with lock:
                        received.append(r.decision_id)

        threads = [threading.Thread(target=drive) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(received) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        for t in threads:
            t.join(timeout=10)
        stop.set()
    assert len(received) >= 300
    # A restarted server opens the same log; every answered decision is in it.
    with run_server(seeded):
        reader = AuditReader(seeded.config.audit.path, load_key(seeded.config.audit.key_file))
        logged = [s.record.id for s in reader.query(Query(limit=1_000_000))]
        assert set(received) <= set(logged)
        assert len(logged) == len(set(logged)), "a record was indexed twice"
        assert reader.verify().ok


@pytest.mark.slow
def test_two_worker_processes_write_one_chain(seeded: Home) -> None:
    token = seeded.token()
    with run_server(seeded, "--workers", "2") as server:

        def drive() -> None:
            for _ in range(60):
                # a fresh channel each time spreads the calls over both workers
                with grpc.insecure_channel(server.address) as channel:
                    decision_stub(channel).Check(check_request(token), timeout=5)

        threads = [threading.Thread(target=drive) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    reader = AuditReader(seeded.config.audit.path, load_key(seeded.config.audit.key_file))
    result = reader.verify()
    assert result.ok, result.problem
    assert result.checked == 240


# -- the chain ----------------------------------------------------------------------------


def test_verify_accepts_an_untouched_log(log_path: Path, key: bytes) -> None:
    _filled(log_path, key, [_record() for _ in range(5)])
    result = AuditReader(log_path, key).verify()
    assert result.ok and result.checked == 5


def test_verify_finds_an_edited_record(log_path: Path, key: bytes) -> None:
    _filled(log_path, key, [_record() for _ in range(5)])
    with sqlite3.connect(log_path) as db:
        db.execute(
            "UPDATE audit SET decision = 'allow', reason = 'ALLOWED',"
            " user_id = 'mallory' WHERE seq = 3"
        )
    result = AuditReader(log_path, key).verify()
    assert not result.ok and result.seq == 3
    assert "edited" in result.problem


def test_verify_finds_a_deleted_record(log_path: Path, key: bytes) -> None:
    _filled(log_path, key, [_record() for _ in range(5)])
    with sqlite3.connect(log_path) as db:
        db.execute("DELETE FROM audit WHERE seq = 2")
    result = AuditReader(log_path, key).verify()
    assert not result.ok and result.checked == 1
    assert "deleted" in result.problem


def test_verify_finds_an_inserted_record_even_with_renumbered_links(
    log_path: Path, key: bytes
) -> None:
    _filled(log_path, key, [_record() for _ in range(4)])
    with sqlite3.connect(log_path) as db:
        # Make room after record 2 and insert a record that claims to follow it.
        db.execute("UPDATE audit SET seq = seq + 100 WHERE seq > 2")
        db.execute("UPDATE audit SET seq = seq - 99 WHERE seq > 100")
        prev = db.execute("SELECT hash FROM audit WHERE seq = 2").fetchone()[0]
        forged = _record(user_id="mallory")
        db.execute(
            "INSERT INTO audit (seq, id, ts, decision, reason, rule_id, policy_version,"
            " client_id, user_id, scopes, data_sources, action, method, path, door,"
            " request_id, jti, latency_us, message, prev_hash, hash)"
            " VALUES (3, ?, ?, 'allow', 'ALLOWED', '', '', 'app1', 'mallory', '', '[]', '',"
            " 'GET', '/', 'grpc', '', '', 1, '', ?, ?)",
            (forged.id, forged.ts, prev, chain_hash(b"guessed-key" * 3, prev, forged)),
        )
    result = AuditReader(log_path, key).verify()
    assert not result.ok and result.seq == 3


def test_verify_needs_the_key_and_a_wrong_key_breaks_the_chain(log_path: Path, key: bytes) -> None:
    _filled(log_path, key, [_record() for _ in range(2)])
    result = verify(sqlite3.connect(log_path), b"x" * 32)
    assert not result.ok and result.seq == 1


def test_pruned_log_still_verifies_and_keeps_newer_records(log_path: Path, key: bytes) -> None:
    now = time.time()
    _filled(log_path, key, [_record(ts=now - 3600 * (10 - i)) for i in range(10)])
    conn = open_log_file(log_path, "normal")
    assert prune(conn, before=now - 3600 * 4.5) == 6
    conn.close()
    _filled(log_path, key, [_record()])  # the chain goes on after a prune
    reader = AuditReader(log_path, key)
    result = reader.verify()
    assert result.ok and result.checked == 5
    assert [s.seq for s in reader.query(Query(limit=100))] == [7, 8, 9, 10, 11]


def test_a_retention_pass_with_nothing_to_prune_does_not_read_the_whole_log(
    log_path: Path, key: bytes
) -> None:
    """The indexer applies the retention every minute, inside its write transaction: with
    no record old enough, the pass must not walk the log (max(seq) ... WHERE ts < ? did,
    from the newest record back, so its cost grew with the log: on a 700,000-record log
    0.3 s warm and 3.6 s cold, and the indexer fell 5 s behind under `make run`). Counted
    in SQLite's VM steps (a progress handler), not time."""
    now = time.time()

    def steps(records: int) -> int:
        path = log_path.with_name(f"audit-{records}.db")
        _filled(path, key, [_record(ts=now - 60) for _ in range(records)])
        conn = open_log_file(path, "normal")
        counted = [0]

        def count() -> int:
            counted[0] += 1
            return 0  # go on

        conn.set_progress_handler(count, 100)
        assert prune(conn, before=now - 86400) == 0  # a day: none is that old
        conn.set_progress_handler(None, 0)
        conn.close()
        return counted[0]

    small, large = steps(100), steps(3000)
    assert large <= small + 2, (small, large)  # not thirty times the work for thirty times the log


def test_prune_by_size_keeps_the_file_under_the_limit(log_path: Path, key: bytes) -> None:
    _filled(log_path, key, [_record(message="x" * 400) for _ in range(2000)])
    conn = open_log_file(log_path, "normal")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    used_before = conn.execute("PRAGMA page_count").fetchone()[0] * page
    limit = used_before // 2
    removed = prune(conn, max_bytes=limit)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    assert removed > 0
    assert (pages - free) * page <= limit
    assert AuditReader(log_path, key).verify().ok


@pytest.mark.slow
def test_server_applies_retention_while_serving(tmp_path: Path) -> None:
    home = Home(
        tmp_path,
        extra_config=(
            f'[audit]\npath = "{tmp_path / "audit.db"}"\nkey_file = "{tmp_path / "audit.key"}"\n'
            "max_age_days = 0.00002\nretention_interval_seconds = 0.2\n"  # about 1.7 s
        ),
    )
    home.seed()
    token = home.token()
    with run_server(home) as server, grpc.insecure_channel(server.address) as channel:
        stub = decision_stub(channel)
        first = stub.Check(check_request(token), timeout=5).decision_id
        time.sleep(3)
        last = stub.Check(check_request(token), timeout=5).decision_id
        ids = set(indexed_records(home.config.audit.path, {last}))
        reader = AuditReader(home.config.audit.path, load_key(home.config.audit.key_file))
        assert first not in ids and last in ids
        assert reader.verify().ok


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def history(seeded: Home) -> Home:
    """A log with known records: alice/app1 and bob/app2 over two hours."""
    now = time.time()
    key = load_key(seeded.config.audit.key_file, create=True)
    records = [
        _record(
            ts=now - 7200,
            user_id="bob",
            client_id="app2",
            data_sources=("ds-b",),
            door="envoy",
            request_id="old",
        ),
        _record(
            ts=now - 1800,
            decision="deny",
            reason="DATA_SOURCE_NOT_GRANTED",
            data_sources=("ds-c",),
            rule_id="tags-get",
            door="asgi",
            request_id="mid",
        ),
        _record(ts=now - 60, data_sources=("ds-a", "ds-b"), request_id="new"),
    ]
    _filled(Path(seeded.config.audit.path), key, records)
    return seeded


def _request_ids(out: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in out.splitlines()]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["old", "mid", "new"]),
        (["--since", "1h"], ["mid", "new"]),
        (["--until", "10m"], ["old", "mid"]),
        (["--app", "app2"], ["old"]),
        (["--user", "alice"], ["mid", "new"]),
        (["--data-source", "ds-b"], ["old", "new"]),
        (["--data-source", "ds-b", "--since", "1h"], ["new"]),
        (["--data-source", "ds-b", "--user", "bob"], ["old"]),
        (["--data-source", "ds-b", "--user", "alice"], ["new"]),
        (["--data-source", "ds-c", "--user", "bob"], []),
        (["--decision", "deny"], ["mid"]),
        (["--decision", "allow"], ["old", "new"]),
        (["--reason", "DATA_SOURCE_NOT_GRANTED"], ["mid"]),
        (["--rule", "tags-get"], ["mid"]),
        (["--door", "envoy"], ["old"]),
        (["--request-id", "new"], ["new"]),
        (["--limit", "2"], ["mid", "new"]),
        (["--user", "nobody"], []),
    ],
)
def test_query_filters(
    history: Home, capsys: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    code, out, err = _cli(history, capsys, "audit", "query", "--json", *args)
    assert (code, err) == (0, "")
    assert _request_ids(out) == expected


def test_query_since_accepts_an_iso_time(history: Home, capsys: pytest.CaptureFixture[str]) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    code, out, _ = _cli(history, capsys, "audit", "query", "--json", "--since", since)
    assert code == 0 and _request_ids(out) == ["mid", "new"]


def test_query_table_fits_100_columns(history: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(history, capsys, "audit", "query")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].split()[:3] == ["TIME", "DECISION", "REASON"]
    assert all(len(line) <= 100 for line in lines)
    assert "DATA_SOURCE_NOT_GRANTED" in lines[2]


def test_query_csv_has_a_header_and_every_field(
    history: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(history, capsys, "audit", "query", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["request_id"] for r in rows] == ["old", "mid", "new"]
    assert rows[2]["data_sources"] == "ds-a ds-b"
    assert rows[1]["reason"] == "DATA_SOURCE_NOT_GRANTED"


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "yesterday"],
        ["--reason", "NOT_A_REASON"],
        ["--decision", "maybe"],
        ["--limit", "0"],
        ["--json", "--csv"],
    ],
)
def test_query_bad_arguments_are_one_line_errors(
    history: Home, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, out, err = _cli(history, capsys, "audit", "query", *args)
    assert code in (1, 2) and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_show_prints_one_record_whole(history: Home, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _cli(history, capsys, "audit", "query", "--json", "--request-id", "mid")
    record_id = json.loads(out)["id"]
    code, out, _ = _cli(history, capsys, "audit", "show", record_id)
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["id"].strip() == record_id
    assert fields["reason"].strip() == "DATA_SOURCE_NOT_GRANTED"
    assert len(fields["hash"].strip()) == 64
    code, out, err = _cli(history, capsys, "audit", "show", "no-such-id")
    assert code == 1 and "no audit record" in err


def test_stats_counts_by_decision_reason_app_and_data_source(
    history: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(history, capsys, "audit", "stats", "--since", "3h", "--json")
    stats = json.loads(out)
    assert code == 0
    assert stats["decision"] == {"allow": 2, "deny": 1}
    assert stats["reason"] == {"ALLOWED": 2, "DATA_SOURCE_NOT_GRANTED": 1}
    assert stats["app"] == {"app1": 2, "app2": 1}
    assert stats["data_source"] == {"ds-b": 2, "ds-a": 1, "ds-c": 1}
    code, out, _ = _cli(history, capsys, "audit", "stats", "--since", "1h", "--json")
    assert json.loads(out)["decision"] == {"allow": 1, "deny": 1}


def test_verify_command_reports_ok_and_then_the_broken_link(
    history: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(history, capsys, "audit", "verify")
    assert code == 0 and out.startswith("ok: 3 records")
    with sqlite3.connect(history.config.audit.path) as db:
        db.execute("UPDATE audit SET user_id = 'mallory' WHERE seq = 2")
    code, out, _ = _cli(history, capsys, "audit", "verify")
    assert code == 1 and "record 2" in out and "edited" in out


def test_prune_command_keeps_the_chain_verifiable(
    history: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(history, capsys, "audit", "prune", "--before", "1h")
    assert code == 0 and out.strip() == "pruned 1 records"
    code, out, _ = _cli(history, capsys, "audit", "verify")
    assert code == 0 and out.startswith("ok: 2 records")


def test_tail_shows_the_last_records(history: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(history, capsys, "audit", "tail", "-n", "2", "--json")
    assert code == 0 and _request_ids(out) == ["mid", "new"]


class _Lines:
    """Lines of a child's output, read with a time limit ("" when none came in time)."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)

    def read(self, timeout: float) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return ""


def test_tail_follow_streams_new_records_while_the_server_writes(
    serving: tuple[Home, ServerProcess, Any],
) -> None:
    home, _, stub = serving
    token = home.token()
    first = stub.Check(check_request(token), timeout=5)
    # In the log before tail starts (records are indexed a moment after their decision).
    assert first.decision_id in indexed_records(home.config.audit.path, {first.decision_id})
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyd",
            "--config",
            str(home.config_path),
            "audit",
            "tail",
            "-n",
            "0",
            "--follow",
            "--json",
            "--user",
            "alice",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")},
    )
    assert tail.stdout is not None
    lines = _Lines(tail.stdout)
    try:
        # Until tail is following: a decision every 0.2 s until it shows one, then read on
        # to the last one sent (any sent before it started are never shown).
        markers: list[str] = []
        seen = ""
        deadline = time.monotonic() + 30
        while not seen:
            assert time.monotonic() < deadline, "tail --follow showed nothing in 30 s"
            markers.append(stub.Check(check_request(token), timeout=5).decision_id)
            seen = lines.read(0.2)
        while json.loads(seen)["id"] != markers[-1]:
            seen = lines.read(10)
            assert seen, "tail --follow stopped showing decisions"
        sent = [
            stub.Check(check_request(token, path=f"/api/data/tags/{ds}"), timeout=5)
            for ds in ("ds-a", "ds-b", "ds-c")
        ]
        got = [json.loads(lines.read(10) or "{}") for _ in sent]
    finally:
        tail.terminate()
        tail.wait(timeout=10)
    assert [g["id"] for g in got] == [s.decision_id for s in sent]
    assert got[2]["reason"] == "DATA_SOURCE_NOT_GRANTED"


def test_cli_reads_while_the_server_writes_under_load(
    serving: tuple[Home, ServerProcess, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    home, server, _ = serving
    token = home.token()
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = decision_stub(channel)
            while not stop.is_set():
                if not stub.Check(check_request(token), timeout=5).allowed:
                    errors.append("deny")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # At least five reads, and on until the count has grown (records reach the log a
        # moment after their decision, later on a busy machine), for at most 30 s.
        counts: list[int] = []
        deadline = time.monotonic() + 30
        while len(counts) < 5 or (counts[-1] == counts[0] and time.monotonic() < deadline):
            code, out, err = _cli(home, capsys, "audit", "stats", "--since", "1h", "--json")
            assert (code, err) == (0, "")
            counts.append(sum(json.loads(out)["decision"].values()))
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert errors == []


def test_an_indexer_that_opened_a_journal_another_one_finished_indexes_nothing_twice(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key)
    audit.start()  # no inline indexing: the journal stays for the two indexers below
    for i in range(5):
        audit.record(_record(request_id=f"r{i}"))
    audit.close()  # the writer is done: its journal is unlocked
    [path] = journal_dir(log_path).glob("*" + JOURNAL_SUFFIX)
    first, second = Indexer(log_path, key), Indexer(log_path, key)
    fd_first = os.open(path, os.O_RDONLY)
    fcntl.flock(fd_first, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first sees an ended journal
    fd_second = os.open(path, os.O_RDONLY)  # the second opened it too, before the deletion
    try:
        assert first._index_chunk(path, fd_first, True) == (5, False)  # indexed, deleted
        assert second._index_chunk(path, fd_second, False) == (0, False)
    finally:
        os.close(fd_first)
        os.close(fd_second)
    reader = AuditReader(log_path, key)
    ids = [s.record.request_id for s in reader.query(Query(limit=100))]
    assert sorted(ids) == [f"r{i}" for i in range(5)]
    assert sqlite3.connect(log_path).execute("SELECT count(*) FROM audit_journal").fetchone() == (
        0,
    )


def test_threads_sharing_an_unstarted_log_record_every_record_once(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key)  # inline indexing, from every thread
    ids: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            rec = _record()
            audit.record(rec)
            with lock:
                ids.append(rec.id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    stored = [s.record.id for s in AuditReader(log_path, key).query(Query(limit=1000))]
    assert sorted(stored) == sorted(ids)  # each once
    assert AuditReader(log_path, key).verify().checked == 400


def test_a_record_keeps_at_most_256_data_sources(log_path: Path, key: bytes) -> None:
    names = tuple(f"ds-{n:05d}-" + "x" * 300 for n in range(20_000))
    decision = Decision(True, Reason.ALLOWED, "allowed", new_id(), None, "r", "a", names)
    rec = record_for(CheckInput("", HttpTarget("GET", "/x")), decision, 1)
    assert len(rec.data_sources) == 256 and all(len(n) == 200 for n in rec.data_sources)
    audit = AuditLog(log_path, key)
    audit.record(rec)
    audit.close()
    [stored] = AuditReader(log_path, key).query(Query(limit=10))
    assert stored.record.data_sources == rec.data_sources


def test_a_damaged_oversized_line_is_skipped_and_the_rest_indexed(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key, journal_bytes=4 << 20)
    audit.start()
    audit.record(_record(request_id="before"))
    audit._journal.append(b"x" * (journal_module.INDEX_CHUNK_BYTES + 10) + b"\n")  # damage
    audit.record(_record(request_id="after"))
    audit.close()
    assert Indexer(log_path, key).run_once() == 2
    ids = {s.record.request_id for s in AuditReader(log_path, key).query(Query(limit=10))}
    assert ids == {"before", "after"}
    assert _journal_lines(log_path) == []


def test_a_damaged_deeply_nested_line_is_skipped_and_the_rest_indexed(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key)
    audit.start()
    audit.record(_record(request_id="before"))
    audit._journal.append(b"[" * 100_000 + b"\n")  # damage: too deep for json's parser
    audit.record(_record(request_id="after"))
    audit.close()
    assert Indexer(log_path, key).run_once() == 2
    ids = {s.record.request_id for s in AuditReader(log_path, key).query(Query(limit=10))}
    assert ids == {"before", "after"}


@pytest.mark.parametrize(
    "names",
    [[], ["ds1"], ["a", "b"], ['q"uote', "back\\slash", "tab\t", "\u00e9t\u00e9", "\U0001f600"]],
)
def test_json_strings_is_the_canonical_encoding(names: list[str]) -> None:
    assert json_strings(names) == CANONICAL.encode(names)


@pytest.mark.parametrize(
    "values",
    [
        {"not": "a list"},
        ["too", "short"],
        "scopes not a list",
        "a scope not a string",
        "a data source not a string",
    ],
)
def test_fields_of_line_refuses_what_is_not_a_record(values: Any) -> None:
    record = _record()
    assert fields_of_line(record.canonical().encode()) == record.json_values()
    fields = record.json_values()
    if values == "scopes not a list":
        fields[FIELDS.index("scopes")] = "DataRead"
    elif values == "a scope not a string":
        fields[FIELDS.index("scopes")] = ["DataRead", 7]
    elif values == "a data source not a string":
        fields[FIELDS.index("data_sources")] = [None]
    else:
        fields = values
    with pytest.raises(ValueError, match="not an audit record"):
        fields_of_line(json.dumps(fields).encode())


def test_a_pass_reads_past_its_first_read_when_more_was_written(log_path: Path, key: bytes) -> None:
    audit = AuditLog(log_path, key)
    audit.start()  # an indexer process's job: nothing is indexed inline
    ids = []
    for n in range(1200):
        rec = _record(request_id=f"r{n}")
        ids.append(rec.id)
        audit.record(rec)
    assert audit._journal.offset > 2 * journal_module.FIRST_READ_BYTES
    indexer = Indexer(log_path, key)
    assert indexer.run_once() == 1200
    assert indexer.commits == 1  # one chunk, one transaction
    audit.close()
    stored = [s.record.id for s in AuditReader(log_path, key).query(Query(limit=2000))]
    assert sorted(stored) == sorted(ids)


def test_with_sync_full_each_record_is_synced_before_record_returns(
    log_path: Path, key: bytes
) -> None:
    audit = AuditLog(log_path, key, sync="full")
    audit.start()
    try:
        for _ in range(5):
            audit.record(_record())
            journal = audit._journal
            assert journal.synced == journal.offset > 0
    finally:
        audit.close()
    assert Indexer(log_path, key, "full").run_once() == 5


def test_a_closed_log_refuses_records(log_path: Path, key: bytes) -> None:
    audit = AuditLog(log_path, key)
    audit.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        audit.record(_record())


def test_an_indexer_whose_server_is_gone_indexes_what_is_left_and_exits(seeded: Home) -> None:
    audit = AuditLog(seeded.config.audit.path, load_key(seeded.config.audit.key_file, create=True))
    audit.start()
    audit.record(_record(request_id="left"))
    audit.close()
    # Started by a server (INDEXER_ENV) that is not its parent: it was gone before the
    # indexer could look. It must not keep running as an orphan.
    env = dict(os.environ, **{INDEXER_ENV: f"{2**22 + 1}:0"})
    command = [sys.executable, "-m", "policyd", "--config", str(seeded.config_path)]
    result = subprocess.run(
        [*command, "audit", "index", "--follow"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    records = AuditReader(seeded.config.audit.path).query(Query(limit=10))
    assert [s.record.request_id for s in records] == ["left"]


def test_a_journal_whose_making_was_cut_short_is_swept_once_old(log_path: Path, key: bytes) -> None:
    folder = journal_dir(log_path)
    folder.mkdir()
    left = folder / ".new-4242-deadbeef"  # a crash between create and rename
    left.write_bytes(b"\0" * 4096)
    young = folder / ".new-4243-feedbeef"  # as if being made right now, not yet locked
    young.write_bytes(b"")
    making = folder / ".new-4244-cafebeef"  # old, but its maker still holds it
    making.write_bytes(b"")
    old = time.time() - 2 * journal_module.UNFINISHED_SECONDS
    for path in (left, making):
        os.utime(path, (old, old))
    holder = os.open(making, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    indexer = Indexer(log_path, key)
    try:
        indexer.run_once()
    finally:
        os.close(holder)
        indexer.close()
    assert not left.exists()
    assert young.exists() and making.exists()


def test_processes_starting_together_all_get_the_one_whole_audit_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    code = (
        "import sys; from policyd.audit.records import load_key;"
        " print(load_key(sys.argv[1], create=True).hex())"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for _ in range(8)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert keys == {path.read_bytes().hex()} and len(path.read_bytes()) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit.key"]  # no temp left


def _following(indexer: Indexer, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=indexer.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def _indexed_count(log_path: Path) -> int:
    with sqlite3.connect(log_path) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


def _wait_for(what: str, done: Any, timeout: float = 10.0) -> float:
    """Seconds until done() held (AssertionError naming `what` after `timeout`)."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - started


def test_indexers_following_one_folder_take_turns_and_the_next_leads_when_one_exits(
    log_path: Path, key: bytes
) -> None:
    """Of two indexers following one journal folder, one leads (a pass every 20 ms), the
    other makes a pass a second; when the leader exits, the other leads at once."""
    audit = AuditLog(log_path, key)
    audit.start()  # the two indexers below index, not the writer
    first, second = Indexer(log_path, key), Indexer(log_path, key)
    stop_first, stop_second = threading.Event(), threading.Event()
    threads = [_following(first, stop_first)]
    _wait_for("the first indexer leads", lambda: first.leading)
    threads.append(_following(second, stop_second))
    try:
        time.sleep(1.5)
        assert first.leading and not second.leading
        assert second.passes <= 3  # at 0, 1 and (on a slow machine) 2 s
        assert first.passes >= 15  # about 75 at one pass every 20 ms
        stop_first.set()
        threads[0].join(timeout=10)
        _wait_for("the second indexer leads", lambda: second.leading, timeout=1.0)
        for i in range(5):
            audit.record(_record(request_id=f"after-{i}"))
        # Indexed by the new leader's passes, not a follower's once a second.
        assert _wait_for("the records after", lambda: _indexed_count(log_path) == 5) < 0.5
    finally:
        stop_first.set()
        stop_second.set()
        for t in threads:
            t.join(timeout=10)
        audit.close()
    assert not second.leading  # given up when it stopped


def test_a_leader_that_hangs_is_covered_by_a_followers_passes(log_path: Path, key: bytes) -> None:
    """A process that holds the lead but never indexes (stopped, hung) delays records by
    at most a follower's pass interval, well within the writers' audit timeout."""
    audit = AuditLog(log_path, key)
    audit.start()
    hung = os.open(journal_dir(log_path) / journal_module.LEAD_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(hung, fcntl.LOCK_EX)
    follower = Indexer(log_path, key)
    stop = threading.Event()
    thread = _following(follower, stop)
    try:
        time.sleep(0.2)
        for i in range(5):
            audit.record(_record(request_id=f"r{i}"))
        waited = _wait_for("a follower's pass", lambda: _indexed_count(log_path) == 5)
        assert waited <= journal_module.FOLLOWER_PASS_SECONDS + 1.0
        assert not follower.leading
    finally:
        stop.set()
        thread.join(timeout=10)
        os.close(hung)
        audit.close()


def test_a_leader_whose_passes_fail_gives_the_lead_up(log_path: Path, key: bytes) -> None:
    """Three failed passes in a row and the leader steps aside: a follower that can write
    the index leads and indexes what the leader could not."""

    class Unwritable(SqliteIndex):
        def writing(self) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    audit = AuditLog(log_path, key)
    audit.start()
    for i in range(5):
        audit.record(_record(request_id=f"r{i}"))
    failing = Indexer(log_path, key, index=Unwritable(log_path))
    healthy = Indexer(log_path, key)
    stop = threading.Event()
    threads = [_following(failing, stop)]
    try:
        _wait_for("the failing indexer leads", lambda: failing.leading)
        threads.append(_following(healthy, stop))
        _wait_for("the healthy indexer leads", lambda: healthy.leading, timeout=5.0)
        assert not failing.leading
        _wait_for("the records", lambda: _indexed_count(log_path) == 5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        audit.close()
