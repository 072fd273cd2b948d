"""The cluster benchmark: policyd on PostgreSQL, its throughput against SQLite, and how long
a revoke takes to be exact on every replica (docs/benchmarks.md, "cluster").

One private PostgreSQL server (policyd.pgserver, fsync on, as a real one) for the whole run,
in a folder under /tmp; skipped, with one line, where PostgreSQL's initdb is not installed.

1. **Throughput.** `policyd serve` on a SQLite store against one replica on a PostgreSQL
   database, both with the same small data set and the default configuration (audit log
   on), both pinned to the same CPU as in the check benchmark (bench/check.py), the load
   generator (bench/loadgen.py) on the other CPUs, and PostgreSQL's processes there too, as
   a database on another host. Alternating windows at 16 callers; the figure is
   postgres/sqlite of the median throughputs (goal: at least 0.9). The request is repeated,
   so both answer it from memory; on PostgreSQL while the replica's lease is fresh.
2. **Revoke latency, 3 live replicas.** Three `policyd serve` processes (workers = 1, so
   the process started is the one serving; distinct ports and cluster.node names), on one
   database, under a steady, paced Check load on all three (bench/cluster_load.py). N times:
   `Store.revoke_grant` in this process (revoke latency: from the call to its return, which
   waits for every replica with a live lease to acknowledge), then one Check for the revoked
   grant to each replica (an allow is a stale allow: must be 0), then the grant is added
   again and every replica polled until it allows it.
3. **One replica frozen.** In each of a few cycles, one replica is stopped (SIGSTOP) at a
   random moment of its lease: a revoke then waits until the frozen replica's lease runs
   out (at most store.lease_seconds); a second revoke while it is still stopped does not
   wait (its lease is gone). Both are checked on the live replicas. Then SIGCONT: the
   resumed replica's first answers for the revoked grant must be denies (its lease has
   lapsed: it reads the database afresh, or answers STORE_UNAVAILABLE), and the time until
   it holds a lease again and allows a granted request is its recovery. A watchdog resumes
   the replica if a revoke is still blocked after twice the lease plus 3 s (a replica
   frozen inside its renewal transaction holds the writers' lock shared), and says so.

Everything started here (servers, the load process, PostgreSQL) is stopped in finally
blocks, Ctrl-C included; a stopped replica is resumed before it is told to stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.check import client_cpus, server_cpu
from bench.cluster_load import LoadSpec as BackgroundSpec
from bench.cluster_load import LoadTarget, spec_to_json
from bench.loadgen import LoadSpec, Target, run_in_process
from bench.procs import (
    ROOT,
    ServerProcess,
    child_pids,
    clean_env,
    free_port,
    machine_busy_seconds,
    server_process,
    tree_cpu_seconds,
)
from bench.report import summarize, table
from bench.stats import percentile
from policyd import pgserver
from policyd.config import Config, load_config
from policyd.core.errors import StoreUnavailable
from policyd.core.model import Access
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import open_store, token_settings
from policyd.gen.v1 import decision_pb2
from policyd.store.base import Store
from policyd.store.keys import KeyRing
from policyd.store.postgres import PostgresStore

METHOD = "/policyd.v1.Decision/Check"
CALL_TIMEOUT = 10.0
USER = "u-bench"
APP = "app-bench"
LOAD_DS = "ds-load"  # the background load's grant: never revoked
REVOKE_DS = "ds-revoke"  # the grant revoked and granted again
SCOPES = ("UserInfo", "DataRead")
NAMES = ["sqlite", "postgres"]
RATIOS = [("postgres", "sqlite")]
CALLERS = 16
REPLICAS = ("replica-a", "replica-b", "replica-c")
LOAD_THREADS = 2  # per replica
LOAD_RATE = 200.0  # Check calls/s per replica, all its threads together
FIRST_ANSWERS = 5  # checks of the revoked grant sent to a replica as soon as it resumes
GOAL_RATIO = 0.9
GOAL_REVOKE_P99_MS = 50.0
# A frozen replica holds a revoke up for at most its lease; this much more is allowed for
# the database's and the machine's own delays before the report calls it over the bound.
FROZEN_MARGIN_SECONDS = 0.5


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: float
    duration: float
    revokes: int
    freezes: int


def settings(*, quick: bool, rounds: int, warmup: float, duration: float) -> Settings:
    return Settings(
        rounds=rounds,
        warmup=warmup,
        duration=duration,
        revokes=10 if quick else 50,
        freezes=2 if quick else 5,
    )


# -- homes, data, requests ----------------------------------------------------------------


def write_config(
    path: Path, *, store_url: str, cpu_affinity: str | None, node: str = "", audit: bool = True
) -> Config:
    """A policyd config file in its own folder (store file, audit journals), with the shared
    key folder beside it; the repo's policies; the OAuth server off (its own port)."""
    home = path.parent
    home.mkdir(parents=True, exist_ok=True)
    text = (
        (f'[server]\ncpu_affinity = "{cpu_affinity}"\n' if cpu_affinity is not None else "")
        + "[store]\n"
        + (f'url = "{store_url}"\n' if store_url else "")
        + f'path = "{home / "policyd.db"}"\n'
        + f'[tokens]\nkey_dir = "{home.parent / "keys"}"\n'
        + 'issuer = "https://auth.bench"\naudience = "hub-bench"\n'
        + f'[policy]\ndir = "{ROOT / "policies"}"\n'
        + "[oauth]\nenabled = false\n"
        + (
            f'[audit]\npath = "{home / "audit.db"}"\nkey_file = "{home / "audit.key"}"\n'
            if audit
            else "[audit]\nenabled = false\n"
        )
        + (f'[cluster]\nnode = "{node}"\n' if node else "")
    )
    path.write_text(text)
    return load_config(path, env={})


def seed(store: Store, config: Config) -> dict[str, str]:
    """One user, app and two granted data sources; the serialized requests (hex) for both."""
    store.add_app(APP, APP, redirect_uris=[], scopes=list(SCOPES), confidential=False)
    store.add_user(USER)
    for ds in (LOAD_DS, REVOKE_DS):
        store.add_data_source(ds)
        store.set_user_access(USER, ds, Access.READ)
    store.set_consent(USER, APP, list(SCOPES))
    for ds in (LOAD_DS, REVOKE_DS):
        store.add_grant(USER, APP, ds, Access.READ)
    keyring = KeyRing(store, config.tokens.key_dir)
    keyring.ensure_active()
    token, _ = issue_token(keyring, token_settings(config), sub=USER, client_id=APP, scopes=SCOPES)
    return {ds: check_request(token, ds).SerializeToString().hex() for ds in (LOAD_DS, REVOKE_DS)}


def check_request(token: str, data_source: str) -> decision_pb2.CheckRequest:
    request = decision_pb2.CheckRequest(token=token, request_id="bench-cluster")
    request.http.method = "GET"
    request.http.path = f"/api/data/tags/{data_source}"
    return request


def _policyd(name: str, config_path: Path, log_dir: Path) -> AbstractContextManager[ServerProcess]:
    port = free_port()
    args = ["-m", "policyd", "--config", str(config_path), "serve", "--workers", "1"]
    return server_process(
        name, [*args, "--address", f"127.0.0.1:{port}"], port, log_dir, cwd=config_path.parent
    )


def postmaster_pid(server: pgserver.PgServer) -> int | None:
    try:
        return int((server.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pin_postgres(server: pgserver.PgServer, cpus: set[int]) -> None:
    """Put PostgreSQL's processes on these CPUs: the postmaster (its new backends inherit
    it) and the processes it has started. Quietly nothing where that is not allowed."""
    pid = postmaster_pid(server)
    if pid is None:
        return
    for p in (pid, *child_pids(pid)):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, cpus)


# -- 1. throughput ------------------------------------------------------------------------


def throughput(pg: pgserver.PgServer, root: Path, log_dir: Path, s: Settings) -> dict[str, Any]:
    cpu = server_cpu()
    affinity = str(cpu) if cpu is not None else None
    others = client_cpus()
    if others:
        pin_postgres(pg, set(others))
    homes = {
        "sqlite": write_config(
            root / "sqlite" / "policyd.toml", store_url="", cpu_affinity=affinity
        ),
        "postgres": write_config(
            root / "postgres" / "policyd.toml",
            store_url=pg.create_database("bench_throughput"),
            cpu_affinity=affinity,
            node="bench-one",
        ),
    }
    requests: dict[str, str] = {}
    for name, config in homes.items():
        store = open_store(config)
        try:
            requests[name] = seed(store, config)[LOAD_DS]
        finally:
            store.close()
    with ExitStack() as stack:
        servers = [
            stack.enter_context(_policyd(f"cluster-{name}", root / name / "policyd.toml", log_dir))
            for name in NAMES
        ]
        spec = LoadSpec(
            targets=[
                Target(name, srv.address, srv.pid, METHOD, requests[name])
                for name, srv in zip(NAMES, servers, strict=True)
            ],
            callers=[CALLERS],
            rounds=s.rounds,
            warmup=s.warmup,
            duration=s.duration,
            cpus=others,
        )
        result = run_in_process(spec)
    for name, h in result.responses.items():
        if not decision_pb2.CheckResponse.FromString(bytes.fromhex(h)).allowed:
            raise RuntimeError(f"{name} did not allow the bench request")
    summary = summarize(result, NAMES, RATIOS)
    # Both audit logs recorded every call: the records indexed once the servers stopped,
    # against the calls of the timed windows (the warm-ups' calls come on top).
    summary["audit_records"] = {
        "sqlite": _settled(lambda: _sqlite_records(Path(homes["sqlite"].audit.path))),
        "postgres": _settled(lambda: _pg_records(homes["postgres"].store.url)),
    }
    summary["timed_calls"] = {
        name: sum(w.calls for w in result.windows if w.target == name) for name in NAMES
    }
    summary.update(
        server_cpu=cpu,
        client_cpus=others,
        audit_sync=homes["sqlite"].audit.sync,
        server_threads=homes["sqlite"].server.threads,
    )
    return summary


def _sqlite_records(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


def _pg_records(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM audit_records").fetchone()
    return int(row[0]) if row else 0


def _settled(count: Callable[[], int], timeout: float = 10.0) -> int:
    """The count once it stops growing (a stopped server's indexer finishes its journal)."""
    deadline = time.monotonic() + timeout
    last = count()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = count()
        if now == last:
            break
        last = now
    return last


# -- 2 and 3. revokes ---------------------------------------------------------------------


class Replicas:
    """The bench's own channels to the replicas, for the checks after each revoke."""

    def __init__(self, servers: dict[str, ServerProcess], requests: dict[str, bytes]) -> None:
        self.servers = servers
        self.requests = requests
        self.channels = {name: grpc.insecure_channel(s.address) for name, s in servers.items()}
        self.calls = {
            name: ch.unary_unary(METHOD, None, None) for name, ch in self.channels.items()
        }

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def answer(self, name: str, data_source: str) -> tuple[bool, str]:
        reply: bytes = self.calls[name](self.requests[data_source], timeout=CALL_TIMEOUT)
        response = decision_pb2.CheckResponse.FromString(reply)
        return response.allowed, decision_pb2.Reason.Name(response.reason)

    def wait_allowed(self, names: list[str], data_source: str, timeout: float = 10.0) -> float:
        """Poll until every named replica allows; the seconds it took."""
        t0 = time.perf_counter()
        pending = list(names)
        while pending:
            pending = [n for n in pending if not self.answer(n, data_source)[0]]
            if pending and time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{', '.join(pending)} did not allow {data_source} again")
            if pending:
                time.sleep(0.005)
        return time.perf_counter() - t0


class TimedStore(PostgresStore):
    """The bench process's store: PostgresStore, timing each wait for the replicas'
    acknowledgements (await_replicas, after the write's commit), so that a revoke's
    latency splits into the write itself and that wait."""

    def __init__(self, config: Config) -> None:
        st = config.store
        super().__init__(st.url, pool_size=st.pool_size, lease_seconds=st.lease_seconds)
        self.waits: list[float] = []

    def await_replicas(self, raw: psycopg.Connection[Any], generation: int) -> None:
        t0 = time.perf_counter()
        try:
            super().await_replicas(raw, generation)
        finally:
            self.waits.append(time.perf_counter() - t0)

    def timed_revoke(self) -> tuple[float, float]:
        """Revoke the bench grant: (seconds in all, seconds of them waiting for acks)."""
        before = len(self.waits)
        t0 = time.perf_counter()
        self.revoke_grant(USER, APP, REVOKE_DS)
        total = time.perf_counter() - t0
        return total, sum(self.waits[before:])


def live_leases(store: PostgresStore) -> set[str]:
    """The nodes whose lease the database holds live right now."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT node FROM policyd_replicas WHERE lease_expires_at > clock_timestamp()"
        ).fetchall()
    return {str(r[0]) for r in rows}


def _wait_for(condition: Callable[[], bool], what: str, timeout: float) -> float:
    t0 = time.perf_counter()
    while not condition():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out ({timeout:g} s) waiting for {what}")
        time.sleep(0.005)
    return time.perf_counter() - t0


@dataclass
class Checks:
    """Answers to the checks of the revoked grant: all must be denies."""

    answers: Counter[str]

    def add(self, allowed: bool, reason: str) -> None:
        self.answers["ALLOW " + reason if allowed else reason] += 1

    @property
    def stale(self) -> int:
        return sum(n for k, n in self.answers.items() if k.startswith("ALLOW"))

    @property
    def total(self) -> int:
        return sum(self.answers.values())


class BackgroundLoad:
    """bench/cluster_load.py in its own process, until finish()."""

    def __init__(self, spec: BackgroundSpec, log_path: Path) -> None:
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.cluster_load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=clean_env(),
            )
        assert self.process.stdin is not None
        self.process.stdin.write(spec_to_json(spec).encode() + b"\n")
        self.process.stdin.flush()

    def finish(self) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=CALL_TIMEOUT + 20)
        if self.process.returncode != 0:
            raise RuntimeError(f"the background load failed ({self.process.returncode})")
        result: dict[str, Any] = json.loads(out)
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _resume(pid: int, fired: threading.Event) -> None:
    """The watchdog's: resume a stopped replica whose revoke is blocked."""
    fired.set()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGSTOP the process for the with-block; always SIGCONT it after."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(v * 1000 for v in values)
    return {
        "n": len(ordered),
        "p50_ms": percentile(ordered, 0.5),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else float("nan"),
    }


def revocations(pg: pgserver.PgServer, root: Path, log_dir: Path, s: Settings) -> dict[str, Any]:
    pin_postgres(pg, set(os.sched_getaffinity(0)))  # the replicas are not pinned either
    url = pg.create_database("bench_cluster")
    configs = {
        name: write_config(
            root / name / "policyd.toml", store_url=url, cpu_affinity="none", node=name
        )
        for name in REPLICAS
    }
    first = configs[REPLICAS[0]]
    lease = first.store.lease_seconds
    store = TimedStore(first)
    rng = random.Random(20261205)
    load: BackgroundLoad | None = None
    replicas: Replicas | None = None
    try:
        requests = seed(store, first)
        with ExitStack() as stack:
            servers = {
                name: stack.enter_context(
                    _policyd(f"cluster-{name}", root / name / "policyd.toml", log_dir)
                )
                for name in REPLICAS
            }
            replicas = Replicas(servers, {ds: bytes.fromhex(h) for ds, h in requests.items()})
            _wait_for(lambda: live_leases(store) >= set(REPLICAS), "three live leases", 15)
            load = BackgroundLoad(
                BackgroundSpec(
                    targets=[
                        LoadTarget(name, srv.address, requests[LOAD_DS])
                        for name, srv in servers.items()
                    ],
                    threads=LOAD_THREADS,
                    rate=LOAD_RATE,
                ),
                log_dir / "cluster-load.log",
            )
            replicas.wait_allowed(list(REPLICAS), LOAD_DS)
            time.sleep(1.0)  # the load settles
            ours = [srv.pid for srv in servers.values()] + [load.process.pid]
            postmaster = postmaster_pid(pg)
            ours += [postmaster] if postmaster is not None else []

            def own_cpu() -> float:
                """CPU seconds of this benchmark's processes: the replicas and their
                indexers, the load, PostgreSQL and its backends, this process."""
                total = time.process_time()
                for pid in ours:
                    with contextlib.suppress(OSError):
                        total += tree_cpu_seconds(pid)
                return total

            live = _live_phase(store, replicas, s.revokes, rng, own_cpu)
            frozen = _frozen_phase(store, replicas, servers, s.freezes, lease, rng)
            background = load.finish()
            load = None
            alive = {name: srv.process.poll() is None for name, srv in servers.items()}
    finally:
        if load is not None:
            load.kill()
        if replicas is not None:
            replicas.close()
        store.close()
    return {
        "lease_seconds": lease,
        "load": {"threads_per_replica": LOAD_THREADS, "rate_per_replica": LOAD_RATE},
        "live": live,
        "frozen": frozen,
        "background": background,
        "replicas_alive_at_end": alive,
    }


def _restore(store: Store, replicas: Replicas) -> float:
    """Grant the revoked data source again and wait until every replica allows it."""
    store.add_grant(USER, APP, REVOKE_DS, Access.READ)
    return replicas.wait_allowed(list(REPLICAS), REVOKE_DS)


def _live_phase(
    store: TimedStore,
    replicas: Replicas,
    n: int,
    rng: random.Random,
    own_cpu: Callable[[], float],
) -> dict[str, Any]:
    latencies: list[float] = []
    waits: list[float] = []
    checks = Checks(Counter())
    busy0, own0, wall0 = machine_busy_seconds(), own_cpu(), time.perf_counter()
    lapsed = 0  # times a replica's lease had run out before a revoke (a starved replica)
    for _ in range(n):
        time.sleep(rng.uniform(0.0, 0.05))  # revokes at all moments of the lease cycle
        if live_leases(store) < set(REPLICAS):
            lapsed += 1
            _wait_for(lambda: live_leases(store) >= set(REPLICAS), "three live leases", 15)
        total, wait = store.timed_revoke()
        latencies.append(total)
        waits.append(wait)
        for name in REPLICAS:
            checks.add(*replicas.answer(name, REVOKE_DS))
        _restore(store, replicas)
    return {
        "revoke": _ms(latencies),
        "write": _ms([t - w for t, w in zip(latencies, waits, strict=True)]),
        "ack_wait": _ms(waits),
        "cpus_busy": (machine_busy_seconds() - busy0) / (time.perf_counter() - wall0),
        "cpus_ours": (own_cpu() - own0) / (time.perf_counter() - wall0),
        "revoke_ms": [round(v * 1000, 2) for v in latencies],
        "ack_wait_ms": [round(v * 1000, 2) for v in waits],
        "checks": checks.total,
        "stale_allows": checks.stale,
        "answers": dict(checks.answers),
        "lease_lapses": lapsed,
    }


def _frozen_phase(
    store: TimedStore,
    replicas: Replicas,
    servers: dict[str, ServerProcess],
    cycles: int,
    lease: float,
    rng: random.Random,
) -> dict[str, Any]:
    frozen_name = REPLICAS[-1]
    live_names = [n for n in REPLICAS if n != frozen_name]
    process = servers[frozen_name].process
    first: list[float] = []
    later: list[float] = []
    live_checks = Checks(Counter())
    resumed_checks = Checks(Counter())
    recovery: list[float] = []
    failures: list[str] = []
    blocked = 0
    for _ in range(cycles):
        _wait_for(lambda: live_leases(store) >= set(REPLICAS), "three live leases", 15)
        time.sleep(rng.uniform(0.0, lease / 4))  # a random moment of the renewal cycle
        with stopped(process):
            fired = threading.Event()
            watchdog = threading.Timer(2 * lease + 3.0, _resume, args=(process.pid, fired))
            watchdog.start()
            try:
                first.append(store.timed_revoke()[0])
                for name in live_names:
                    live_checks.add(*replicas.answer(name, REVOKE_DS))
                store.add_grant(USER, APP, REVOKE_DS, Access.READ)
                later.append(store.timed_revoke()[0])
                for name in live_names:
                    live_checks.add(*replicas.answer(name, REVOKE_DS))
            except StoreUnavailable as exc:
                failures.append(str(exc))
            finally:
                watchdog.cancel()
            blocked += fired.is_set()
        resumed = time.perf_counter()
        for _ in range(FIRST_ANSWERS):
            resumed_checks.add(*replicas.answer(frozen_name, REVOKE_DS))
        _wait_for(
            lambda: frozen_name in live_leases(store) and replicas.answer(frozen_name, LOAD_DS)[0],
            f"{frozen_name} to hold a lease and allow again",
            15,
        )
        recovery.append(time.perf_counter() - resumed)
        _restore(store, replicas)
    return {
        "frozen": frozen_name,
        "first_revoke": _ms(first),
        "later_revoke": _ms(later),
        "first_revoke_ms": [round(v * 1000, 1) for v in first],
        "later_revoke_ms": [round(v * 1000, 2) for v in later],
        "bound_seconds": lease + FROZEN_MARGIN_SECONDS,
        "live_checks": live_checks.total,
        "live_stale_allows": live_checks.stale,
        "live_answers": dict(live_checks.answers),
        "resumed_checks": resumed_checks.total,
        "resumed_stale_allows": resumed_checks.stale,
        "resumed_answers": dict(resumed_checks.answers),
        "recovery": _ms(recovery),
        "watchdog_resumed": blocked,
        "failures": failures,
    }


# -- the run and its report ---------------------------------------------------------------


def _server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def run(
    log_dir: Path, *, quick: bool, rounds: int, warmup: float, duration: float
) -> dict[str, Any]:
    s = settings(quick=quick, rounds=rounds, warmup=warmup, duration=duration)
    if not pgserver.available():
        return {"skipped": "PostgreSQL's initdb/pg_ctl not found (Debian's postgresql package)"}
    # The server's folder must be one the `postgres` user can reach (pgserver runs it as
    # that user when this runs as root): directly under /tmp, not inside a private folder.
    pg_root = Path(tempfile.mkdtemp(prefix="policyd-pg-", dir="/tmp"))
    homes = Path(tempfile.mkdtemp(prefix="policyd-bench-cluster-"))
    try:
        with pgserver.running(pg_root, free_port(), fsync=True) as pg:
            version = _server_version(pg.url())
            t0 = time.monotonic()
            load = throughput(pg, homes / "throughput", log_dir, s)
            load["seconds"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            revokes = revocations(pg, homes / "cluster", log_dir, s)
            revokes["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(homes, ignore_errors=True)
    return {
        "postgresql": version,
        "settings": s.__dict__,
        "throughput": load,
        "revocations": revokes,
    }


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"  # NaN


def _answers(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def report(summary: dict[str, Any]) -> str:
    if "skipped" in summary:
        return f"Cluster: skipped: {summary['skipped']}"
    t = summary["throughput"]
    r = summary["revocations"]
    live, frozen = r["live"], r["frozen"]
    lease = r["lease_seconds"]
    entry = t["by_callers"][str(CALLERS)]
    rows = [["server", "calls/s", "p50 us", "p99 us", "srv CPU us/call", "other CPU %"]]
    for name in NAMES:
        m = entry[name]
        rows.append(
            [
                f"{CALLERS} {name}",
                _f(m["calls_per_s"], 0),
                _f(m["p50_us"], 0),
                _f(m["p99_us"], 0),
                _f(m["server_cpu_us_per_call"], 0),
                _f(100 * m["other_cpu_util"], 0),
            ]
        )
    ratio = entry["ratios"]["postgres/sqlite"]
    rows.append(
        [
            f"{CALLERS} ratio postgres/sqlite",
            f"{ratio['throughput']:.2f}",
            "",
            "",
            f"{ratio['server_cpu_per_call']:.2f}",
            "",
        ]
    )
    # A side that recorded fewer records than it answered calls denied some of them
    # (AUDIT_UNAVAILABLE: its indexer fell behind): its calls/s are not allowed answers.
    unrecorded = [n for n in NAMES if t["audit_records"][n] < t["timed_calls"][n]]
    ratio_verdict = (
        "INVALID: fewer audit records than calls on " + ", ".join(unrecorded) + "; it"
        if unrecorded
        else "meets"
        if ratio["throughput"] >= GOAL_RATIO
        else "MISSES"
    )
    pinned = (
        f"servers pinned to CPU {t['server_cpu']}, the load generator, the audit indexers"
        f" and PostgreSQL on CPU {','.join(map(str, t['client_cpus']))}"
        if t["server_cpu"] is not None
        else "one CPU: nothing pinned"
    )
    s = summary["settings"]
    lines = [
        f"Cluster: policyd on PostgreSQL {summary['postgresql']} (private server, fsync on)",
        f"Throughput: `policyd serve` on SQLite vs one replica on PostgreSQL, the same repeated"
        f" allowed Check, audit log on (audit.sync = {t['audit_sync']}); {pinned};"
        f" medians of {s['rounds']} alternating {s['duration']:g} s windows",
        table(rows),
        f"{CALLERS} callers: postgres/sqlite = {ratio['throughput']:.3f}"
        f" ({ratio_verdict} the goal >= {GOAL_RATIO})",
        "audit records indexed / calls in the timed windows (warm-ups come on top): "
        + ", ".join(
            f"{name} {t['audit_records'][name]:,} / {t['timed_calls'][name]:,}" for name in NAMES
        ),
        "",
        f"Revokes: 3 replicas (workers = 1, not pinned) on one database, store.lease_seconds ="
        f" {lease:g}; background load {LOAD_THREADS} callers x {LOAD_RATE / LOAD_THREADS:g}"
        " Check/s on each replica; Store.revoke_grant in the bench process, then one Check of"
        " the revoked grant on each replica",
    ]
    p99 = live["revoke"]["p99_ms"]
    bound_ms = 1000 * frozen["bound_seconds"]
    rows = [["phase", "revokes", "p50 ms", "p99 ms", "max ms", "stale allows / checks"]]
    rows.append(
        [
            "3 live replicas",
            str(live["revoke"]["n"]),
            _f(live["revoke"]["p50_ms"], 2),
            _f(p99, 2),
            _f(live["revoke"]["max_ms"], 2),
            f"{live['stale_allows']} / {live['checks']}",
        ]
    )
    for label, key in (("  of which the write", "write"), ("  of which the ack wait", "ack_wait")):
        m = live[key]
        rows.append([label, "", _f(m["p50_ms"], 2), _f(m["p99_ms"], 2), _f(m["max_ms"], 2), ""])
    for label, key, checks in (
        (
            "1 frozen: first revoke",
            "first_revoke",
            f"{frozen['live_stale_allows']} / {frozen['live_checks']}",
        ),
        ("1 frozen: next revoke", "later_revoke", ""),
    ):
        m = frozen[key]
        rows.append([label, str(m["n"]), _f(m["p50_ms"]), _f(m["p99_ms"]), _f(m["max_ms"]), checks])
    rows.append(
        [
            f"{frozen['frozen']} resumed: first answers",
            "",
            "",
            "",
            "",
            f"{frozen['resumed_stale_allows']} / {frozen['resumed_checks']}",
        ]
    )
    lines.append(table(rows))
    stale = live["stale_allows"] + frozen["live_stale_allows"] + frozen["resumed_stale_allows"]
    first_max = frozen["first_revoke"]["max_ms"]
    lines += [
        f"3 live replicas: revoke p99 = {p99:.1f} ms"
        f" ({'meets' if p99 < GOAL_REVOKE_P99_MS else 'MISSES'} the goal"
        f" < {GOAL_REVOKE_P99_MS:g} ms); the machine's CPUs were"
        f" {live['cpus_busy']:.2f} of {os.cpu_count()} busy meanwhile, this benchmark's"
        f" processes {live['cpus_ours']:.2f} of it",
        f"1 frozen (SIGSTOP, {frozen['first_revoke']['n']} cycles): the first revoke waits for"
        f" its lease: max {first_max:.0f} ms"
        f" ({'within' if first_max <= bound_ms else 'OVER'} lease + {FROZEN_MARGIN_SECONDS:g} s ="
        f" {bound_ms:.0f} ms); the next revoke while it is still stopped does not wait",
        f"{frozen['frozen']} after SIGCONT: first answers {_answers(frozen['resumed_answers'])};"
        f" lease held and allowing again after p50 {frozen['recovery']['p50_ms']:.0f} ms,"
        f" max {frozen['recovery']['max_ms']:.0f} ms",
        f"stale allows: {stale} ({'meets' if stale == 0 else 'MISSES'} the goal 0)",
    ]
    if live["lease_lapses"]:
        lines.append(
            f"WARNING: before {live['lease_lapses']} of the live revokes a replica's lease had"
            " run out (starved of CPU?); each waited until all three held one again"
        )
    if frozen["watchdog_resumed"] or frozen["failures"]:
        lines.append(
            f"WARNING: {frozen['watchdog_resumed']} revoke(s) still blocked after 2 x lease"
            f" + 3 s (the watchdog resumed the replica); failed revokes: {frozen['failures']}"
        )
    bg = r["background"]
    lines.append(
        "Background load (all phases): "
        + "; ".join(
            f"{name} {v['calls_per_s']:.0f}/s, {_answers(v['reasons'])}"
            + (f", failed calls {_answers(v['errors'])}" if v["errors"] else "")
            + f", slowest {v['max_ms']:.0f} ms"
            for name, v in bg.items()
        )
    )
    dead = [name for name, ok in r["replicas_alive_at_end"].items() if not ok]
    if dead:
        lines.append(f"WARNING: replica(s) exited during the run: {', '.join(dead)}")
    lines.append(
        f"({t['seconds']:.0f} s throughput, {r['seconds']:.0f} s revokes; the live replicas'"
        f" answers to the revoked grant: {_answers(live['answers'])})"
    )
    return "\n".join(lines)
