"""The headline figure: Check throughput and latency of policyd against an empty handler.

Set-up: a policyd home in a temp folder whose store (the real schema, made by
policyd.store.sqlite.Store) holds `grants` live grants (1,000,000 by default), bulk-inserted with
executemany in one transaction, spread over users x apps x data sources. The checked user
(u000000) and app (app0) are among them. The request is `GET /api/data/tags/ds007` with a
token for DataRead, which policyd allows after every check (route, cached token, revocation,
app, consent, scope, grant, user access).

Three server processes: `policyd serve` as configured by default (so with its audit log:
one durable record per decision), `policyd serve` on the same store with the audit log
off, and bench/empty_server.py, which has the same gRPC server stack and answers every
Check with the bytes of a real allow response captured from policyd (same size). One load
generator process drives all three, alternating windows (policyd, policyd-noaudit, empty,
policyd, ...) at 1 and 16 concurrent callers; the summary takes the median of each metric
over the rounds. The headline ratio is policyd / empty.

Before the servers start, in-process micro-benchmarks on the same store say where the
decision time goes: Engine.decide for a cached allow, Facts.view() alone, and its parts,
with the CPU caches warm (a tight loop) and cold (as between gRPC calls in a server).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from bench.loadgen import LoadSpec, Target, run_in_process
from bench.procs import ROOT, ServerProcess, free_port, server_process
from bench.report import summarize
from bench.stats import time_per_call, time_per_call_cold
from policyd.audit.journal import Indexer, LineTemplate
from policyd.audit.records import record_for
from policyd.config import Config, load_config
from policyd.core.ids import new_id
from policyd.core.routes import split_path
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import build_decider, token_settings
from policyd.doors.service import DecisionServicer, to_input, to_response
from policyd.gen.v1 import decision_pb2, decision_pb2_grpc
from policyd.store.base import Store
from policyd.store.facts import Facts
from policyd.store.keys import KeyRing
from policyd.store.sqlite import SqliteStore

METHOD = "/policyd.v1.Decision/Check"
APPS = 5
DATA_SOURCES = 100
USER = "u000000"
APP = "app0"
DATA_SOURCE = "ds007"
PATH = f"/api/data/tags/{DATA_SOURCE}"
SCOPES = ("UserInfo", "DataRead")


def _user(n: int) -> str:
    return f"u{n:06d}"


def _ds(n: int) -> str:
    return f"ds{n:03d}"


def server_cpu() -> int | None:
    """The one CPU every server of the benchmark is pinned to (None: one CPU, no pinning)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0] if len(allowed) > 1 else None


def client_cpus() -> list[int] | None:
    """The CPUs of the load generator: all but the servers' (server_cpu), as if it ran on
    another host; policyd's audit indexer runs there too (affinity.spare)."""
    cpu = server_cpu()
    return None if cpu is None else sorted(set(os.sched_getaffinity(0)) - {cpu})


def make_home(root: Path) -> tuple[Path, Path]:
    """Two config files on one store and key folder: the defaults (so the audit log is on,
    here in this folder) and the same with the audit log off. Both use the repo's policy
    folder; the OAuth server is off (it has its own port and is idle during a Check).

    Both pin the server to the same CPU (server_cpu), and so does the empty server, which
    reads the same file: with `auto`, each lone server would stay on the CPU it happened to
    start on, and the CPUs of a VM are not alike (on the dev VM, CPU 1 takes the disk's
    interrupts), which moved a server's figures by up to a tenth between runs."""
    cpu = server_cpu()
    common = (
        (f'[server]\ncpu_affinity = "{cpu}"\n' if cpu is not None else "")
        + f'[store]\npath = "{root / "policyd.db"}"\n'
        f'[tokens]\nkey_dir = "{root / "keys"}"\n'
        'issuer = "https://auth.bench"\naudience = "hub-bench"\n'
        f'[policy]\ndir = "{ROOT / "policies"}"\n'
        "[oauth]\nenabled = false\n"
    )
    audited = root / "policyd.toml"
    audited.write_text(
        common + f'[audit]\npath = "{root / "audit.db"}"\nkey_file = "{root / "audit.key"}"\n'
    )
    unaudited = root / "policyd-noaudit.toml"
    unaudited.write_text(common + "[audit]\nenabled = false\n")
    return audited, unaudited


def bulk_insert(db_path: Path, grants: int) -> dict[str, int]:
    """Fill the (already migrated) store with users, apps, data sources, access, consents and
    `grants` live grants in one transaction. Every user has read or write access to every
    data source and consented to every app; grants cover users x apps x data sources."""
    users = -(-grants // (APPS * DATA_SOURCES))  # ceil
    now = time.time()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")  # a benchmark fixture, not a live store
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO apps (client_id, name, redirect_uris, allowed_scopes, confidential,"
            " enabled, created_at) VALUES (?, ?, '[]', ?, 0, 1, ?)",
            [
                (f"app{a}", f"Bench app {a}", "UserInfo DataRead DataWrite", now)
                for a in range(APPS)
            ],
        )
        conn.executemany(
            "INSERT INTO users (user_id, name, created_at) VALUES (?, ?, ?)",
            ((_user(u), _user(u), now) for u in range(users)),
        )
        conn.executemany(
            "INSERT INTO data_sources (name, description, labels, created_at)"
            " VALUES (?, '', '{}', ?)",
            ((_ds(d), now) for d in range(DATA_SOURCES)),
        )
        conn.executemany(
            "INSERT INTO user_access (user_id, data_source, role, created_at) VALUES (?, ?, ?, ?)",
            (
                (_user(u), _ds(d), "write" if d % 2 else "read", now)
                for u in range(users)
                for d in range(DATA_SOURCES)
            ),
        )
        conn.executemany(
            "INSERT INTO consents (user_id, client_id, scopes, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                (_user(u), f"app{a}", "UserInfo DataRead DataWrite", now, now)
                for u in range(users)
                for a in range(APPS)
            ),
        )
        rows: Iterator[tuple[str, str, str, str, float]] = (
            (_user(u), f"app{a}", _ds(d), "read" if d % 3 else "write", now)
            for u in range(users)
            for a in range(APPS)
            for d in range(DATA_SOURCES)
        )
        conn.executemany(
            "INSERT INTO grants (user_id, client_id, data_source, access, granted_at)"
            " VALUES (?, ?, ?, ?, ?)",
            itertools.islice(rows, grants),
        )
        conn.execute("COMMIT")
        counts = {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("users", "apps", "data_sources", "user_access", "consents", "grants")
        }
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return counts


@dataclass
class Seeded:
    """A benchmark home (make_home) with `grants` live grants (bulk_insert) and a DataRead
    token for USER via APP. `store` is left open for in-process work: the caller closes it."""

    audited: Path
    unaudited: Path
    config: Config
    store: SqliteStore
    counts: dict[str, int]
    insert_seconds: float
    token: str


def seed(root: Path, grants: int) -> Seeded:
    audited, unaudited = make_home(root)
    config = load_config(audited, env={})
    store = SqliteStore(config.store.path)
    keyring = KeyRing(store, config.tokens.key_dir)
    t0 = time.perf_counter()
    counts = bulk_insert(Path(config.store.path), grants)
    insert_seconds = time.perf_counter() - t0
    keyring.ensure_active()
    token, _ = issue_token(keyring, token_settings(config), sub=USER, client_id=APP, scopes=SCOPES)
    return Seeded(audited, unaudited, config, store, counts, insert_seconds, token)


def check_request(token: str) -> decision_pb2.CheckRequest:
    request = decision_pb2.CheckRequest(token=token, request_id="bench")
    request.http.method = "GET"
    request.http.path = PATH
    return request


def in_process(
    config: Config, store: Store, request: decision_pb2.CheckRequest, users: int, calls: int
) -> dict[str, float]:
    """CPU microseconds per call of the decision and its parts, in this process."""
    decider = build_decider(config, store)
    audit = decider.audit
    assert audit is not None
    audit.start()  # as in a server: records go to the journal; an indexer indexes them
    engine = decider.engine
    servicer = DecisionServicer(decider)
    context = cast(grpc.ServicerContext, None)
    check_input = to_input(request)
    decision = engine.decide(check_input)
    if not decision.allowed:
        raise RuntimeError(f"bench request is not allowed in-process: {decision}")
    facts = engine.facts
    assert isinstance(store, SqliteStore)  # the bench's store
    conn = store.conn()
    view = facts.view()
    principal = decision.principal
    assert principal is not None
    raw_request = request.SerializeToString()
    response = to_response(decision)
    generation_sql = "SELECT value FROM generation WHERE id = 1"
    grant_sql = (
        "SELECT access FROM grants WHERE user_id = ? AND client_id = ? AND data_source = ?"
        " AND revoked_at IS NULL"
    )
    other_users = itertools.cycle([_user(u) for u in range(0, users, max(1, users // 1000))])

    def grant_uncached() -> object:
        return conn.execute(grant_sql, (next(other_users), APP, _ds(42))).fetchone()

    def cached_rows() -> None:
        view.token_revoked(principal.jti)
        view.app(principal.client_id)
        view.consent(principal.sub, principal.client_id)
        view.grant(principal.sub, principal.client_id, DATA_SOURCE)
        view.user_access(principal.sub, DATA_SOURCE)

    def decide_uncached() -> object:
        # A new Facts has empty caches: the first decision after any store write pays this
        # (token signature check, key load, and one query per row).
        fresh = copy.copy(engine)
        fresh.facts = Facts(store)
        return fresh.decide(check_input)

    def decide() -> object:
        return engine.decide(check_input)

    key = request.SerializeToString(deterministic=True)
    decision_keyed, entry = engine.decide_keyed(key, engine.policy, lambda: check_input)
    assert entry is not None
    record = record_for(check_input, decision_keyed, 10)
    template = LineTemplate.of(record)

    def append_line() -> None:
        audit.append(template.line(new_id(), time.time(), "bench", 10))

    indexer = Indexer(config.audit.path, audit.key)

    def index_batch() -> None:  # ~150 records per transaction, as at 7,500 calls/s
        for _ in range(150):
            audit.append(template.line(new_id(), time.time(), "bench", 10))
        indexer.run_once()

    audited_calls = max(calls // 4, 100)  # each writes an audit record: slower

    cases: list[tuple[str, Callable[[], object], int]] = [
        (
            "DecisionServicer.Check, remembered (key, Decider.answer, encoded response)",
            lambda: servicer.Check(request, context),
            calls,
        ),
        (
            "  Engine.decide_keyed, remembered allow (the full path)",
            lambda: engine.decide_keyed(key, engine.policy, lambda: check_input),
            calls,
        ),
        ("  AuditLog.append of its journal line (LineTemplate.line)", append_line, calls),
        (
            "Decider.check (memo key, remembered, journal line)",
            lambda: decider.check(check_input),
            audited_calls,
        ),
        (
            "Indexer, per record (with its append): 150 lines, then run_once()",
            index_batch,
            max(calls // 150, 20),
        ),
        ("  Engine.decide, cached allow", decide, calls),
        ("    Facts.view()", facts.view, calls),
        (
            "      SELECT generation (inside view)",
            lambda: conn.execute(generation_sql).fetchone(),
            calls,
        ),
        (
            "    Verifier.verify, cached token",
            lambda: engine.verifier.verify(view, request.token),
            calls,
        ),
        ("    5 cached row lookups (revoked, app, consent, grant, access)", cached_rows, calls),
        (
            "    route match (split_path + RouteTable.match)",
            lambda: engine.routes.match("GET", split_path(PATH)),
            calls,
        ),
        ("    new_id() (decision id)", new_id, calls),
        ("  to_input(request)", lambda: to_input(request), calls),
        ("  to_response(decision)", lambda: to_response(decision), calls),
        (
            "  CheckRequest.FromString",
            lambda: decision_pb2.CheckRequest.FromString(raw_request),
            calls,
        ),
        ("  CheckResponse.SerializeToString", response.SerializeToString, calls),
        ("grant SELECT by key, uncached (any user)", grant_uncached, calls),
        (
            "Engine.decide, policyd caches empty (first decision after a store write)",
            decide_uncached,
            max(calls // 20, 50),
        ),
    ]
    results = {name: time_per_call(fn, n) for name, fn, n in cases}
    cold_calls = max(calls // 20, 100)
    results["Engine.decide, cached allow, CPU caches cold (8 MB evicted first)"] = (
        time_per_call_cold(decide, cold_calls)
    )
    results["  Facts.view(), CPU caches cold"] = time_per_call_cold(facts.view, cold_calls)
    results["    SELECT generation, CPU caches cold"] = time_per_call_cold(
        lambda: conn.execute(generation_sql).fetchone(), cold_calls
    )
    results["Indexer, per record (with its append): 150 lines, then run_once()"] /= 150
    audit.close()
    indexer.run_once()
    indexer.close()
    return results


def _fetch_response(address: str, request: decision_pb2.CheckRequest) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = decision_pb2_grpc.DecisionStub(channel)  # type: ignore[no-untyped-call]
        response: decision_pb2.CheckResponse = stub.Check(request, timeout=10)
    if not response.allowed or response.reason != decision_pb2.ALLOWED:
        raise RuntimeError(f"policyd did not allow the bench request: {response}")
    return response.SerializeToString()


def _policyd(
    name: str, config_path: Path, port: int, log_dir: Path
) -> AbstractContextManager[ServerProcess]:
    args = ["-m", "policyd", "--config", str(config_path), "serve"]
    return server_process(
        name, [*args, "--address", f"127.0.0.1:{port}"], port, log_dir, cwd=config_path.parent
    )


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


NAMES = ["policyd", "policyd-noaudit", "empty"]
RATIOS = [("policyd", "empty"), ("policyd-noaudit", "empty")]


def run(
    log_dir: Path,
    *,
    grants: int,
    callers: list[int],
    rounds: int,
    warmup: float,
    duration: float,
    micro_calls: int,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="policyd-bench-") as tmp:
        root = Path(tmp)
        seeded = seed(root, grants)
        audited, unaudited, config, store = (
            seeded.audited,
            seeded.unaudited,
            seeded.config,
            seeded.store,
        )
        counts, insert_seconds = seeded.counts, seeded.insert_seconds
        request = check_request(seeded.token)
        raw = request.SerializeToString().hex()
        micro = in_process(config, store, request, counts["users"], micro_calls)
        store.close()

        policyd_port, noaudit_port, empty_port = _ports(3)
        response_file = root / "allow-response.bin"
        with contextlib.ExitStack() as stack:
            policyd = stack.enter_context(_policyd("policyd", audited, policyd_port, log_dir))
            noaudit = stack.enter_context(
                _policyd("policyd-noaudit", unaudited, noaudit_port, log_dir)
            )
            response_file.write_bytes(_fetch_response(policyd.address, request))
            empty_args = [
                *("-m", "bench.empty_server", "--config", str(audited)),
                *("--address", f"127.0.0.1:{empty_port}", "--response-file", str(response_file)),
            ]
            empty = stack.enter_context(server_process("empty", empty_args, empty_port, log_dir))
            servers = [policyd, noaudit, empty]
            spec = LoadSpec(
                targets=[Target(s.name, s.address, s.pid, METHOD, raw) for s in servers],
                callers=callers,
                rounds=rounds,
                warmup=warmup,
                duration=duration,
                cpus=client_cpus(),
            )
            result = run_in_process(spec)
    sizes = {name: len(h) // 2 for name, h in result.responses.items()}
    for name, h in result.responses.items():
        if not decision_pb2.CheckResponse.FromString(bytes.fromhex(h)).allowed:
            raise RuntimeError(f"{name} did not answer allow")
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"response sizes differ between the servers: {sizes}")
    summary = summarize(result, NAMES, RATIOS)
    summary.update(
        store=counts,
        insert_seconds=insert_seconds,
        request=f"GET {PATH} as {USER} via {APP}",
        request_bytes=len(request.SerializeToString()),
        server_threads=config.server.threads,
        audit_sync=config.audit.sync,
        in_process_us=micro,
    )
    return summary
