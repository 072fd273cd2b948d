"""Audit-log queries over a generated log of 10 million records (1 million with --quick),
and the indexer's cost per record as a log grows.

The log is generated inside SQLite (a recursive CTE, so generation takes about a minute,
not an hour of Python) into the real schema that `policyd.audit.records.open_log_file` creates,
then queried through `AuditReader.query` exactly as `policyd audit query` does (default
limit 100): by user, by data source, by app, and by a one-hour time window. The generated
records are realistic in shape (1,000 users, 20 apps, 100 data sources, 1-2 data sources
per record, 30 days of history) but their hash links are placeholders: the chain's cost
is the writer's, measured by bench/check.py (audit on vs off), not a query cost.

The generated file is kept in var/bench/ and reused when it has the wanted size.

Indexing (`indexing`): records written through `AuditLog` (the journal, as a server
writes them) and indexed by an `Indexer` in batches of BATCH, as the indexer process does
under load, into a new log in a temporary folder, with the same spread of users, apps and
data sources. The indexer's CPU time per record is reported per step of STEP records,
so its growth with the log's size shows.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from policyd.audit.journal import AuditLog, Indexer
from policyd.audit.reader import AuditReader, Query
from policyd.audit.records import AuditRecord, load_key, open_log_file
from policyd.core.ids import new_id

DAYS = 30
USERS = 1000
APPS = 20
DATA_SOURCES = 100
REPEATS = 5
# Indexing: records per measured step, and per indexer pass (what a pass every 20 ms finds
# at 7,500 decisions/s).
STEP = 30_000
BATCH = 150

_GENERATE = """
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < :count)
INSERT INTO audit (seq, id, ts, decision, reason, rule_id, policy_version, client_id,
                   user_id, scopes, data_sources, action, method, path, door, request_id,
                   jti, latency_us, message, prev_hash, hash)
SELECT x,
       printf('%012x-7000-8000-%012x', CAST((:start + x * :step) * 1000 AS INTEGER), x),
       :start + x * :step,
       CASE WHEN x % 7 = 0 THEN 'deny' ELSE 'allow' END,
       CASE WHEN x % 7 = 0 THEN 'DATA_SOURCE_NOT_GRANTED' ELSE 'ALLOWED' END,
       'tags-search', 'bench', 'app-' || (x % :apps), 'user-' || ((x * 7919) % :users),
       'UserInfo DataRead',
       CASE WHEN x % 3 = 0
            THEN '["ds-' || (x % :ds) || '","ds-' || ((x + 1) % :ds) || '"]'
            ELSE '["ds-' || (x % :ds) || '"]' END,
       'tags.search', 'GET', '/api/data/tags/ds-' || (x % :ds), 'envoy', 'req-' || x,
       'jti-' || x, 150, 'allowed', printf('%064x', x - 1), printf('%064x', x)
FROM n
"""


def generated_log(count: int) -> Path:
    """A log file with `count` records (made once, then reused)."""
    path = ROOT / "var" / "bench" / f"audit-{count}.db"
    if path.exists():
        conn = sqlite3.connect(path)
        try:
            have = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
        except sqlite3.Error:
            have = -1
        conn.close()
        if have == count:
            return path
        for stale in path.parent.glob(path.name + "*"):
            stale.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"bench audit: generating {count:,} records in {path} ...", file=sys.stderr, flush=True)
    conn = open_log_file(path, "normal")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")  # 256 MiB while generating
    start = time.time() - DAYS * 86400
    conn.execute("BEGIN")
    conn.execute(
        _GENERATE,
        {
            "count": count,
            "start": start,
            "step": DAYS * 86400 / count,
            "apps": APPS,
            "users": USERS,
            "ds": DATA_SOURCES,
        },
    )
    conn.execute(
        "INSERT INTO audit_data_sources (data_source, ts, seq)"
        " SELECT j.value, a.ts, a.seq FROM audit a, json_each(a.data_sources) j"
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"bench audit: generated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return path


def _time(reader: AuditReader, query: Query) -> dict[str, Any]:
    times, found = [], 0
    for _ in range(REPEATS):
        started = time.perf_counter()
        found = len(reader.query(query))
        times.append(time.perf_counter() - started)
    return {
        "median_ms": statistics.median(times) * 1000,
        "max_ms": max(times) * 1000,
        "first_ms": times[0] * 1000,
        "records": found,
    }


def _record(n: int) -> AuditRecord:
    return AuditRecord(
        new_id(), time.time(), "allow", "ALLOWED", "tags-search", "bench",
        f"app-{n % APPS}", f"user-{(n * 7919) % USERS}", ("UserInfo", "DataRead"),
        (f"ds-{n % DATA_SOURCES}",), "tags.search", "GET", f"/api/data/tags/ds-{n % DATA_SOURCES}",
        "envoy", f"req-{n}", f"jti-{n}", 150, "allowed",
    )  # fmt: skip


def indexing(steps: int) -> list[dict[str, float]]:
    """Index steps x STEP records into a new log; CPU us per record for each step."""
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-index-") as tmp:
        path = Path(tmp) / "audit.db"
        key = load_key(Path(tmp) / "audit.key", create=True)
        log = AuditLog(path, key)
        log.start()  # no indexing inline: the Indexer below does it, as a server's would
        indexer = Indexer(path, key)
        n = 0
        for _ in range(steps):
            total = 0.0
            indexed = 0
            for _ in range(STEP // BATCH):
                for _ in range(BATCH):
                    log.record(_record(n))
                    n += 1
                started = time.process_time()
                indexed += indexer.run_once()
                total += time.process_time() - started
            out.append(
                {
                    "records_after": n,
                    "us_per_record": total / max(indexed, 1) * 1e6,
                    "file_mb": path.stat().st_size / 1e6,
                }
            )
        indexer.close()
        log.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    count = 1_000_000 if quick else 10_000_000
    path = generated_log(count)
    reader = AuditReader(path)
    now = time.time()
    queries = {
        "by user": Query(user_id="user-42"),
        "by data source": Query(data_source="ds-7"),
        "by app, last 7 days": Query(client_id="app-3", since=now - 7 * 86400),
        "by time window (1 h, 10 days ago)": Query(
            since=now - 10 * 86400 - 3600, until=now - 10 * 86400
        ),
        "by user and data source, 2 days": Query(
            user_id="user-42", data_source="ds-42", since=now - 2 * 86400
        ),
        "denies of one app, last day": Query(client_id="app-5", decision="deny", since=now - 86400),
    }
    results = {name: _time(reader, q) for name, q in queries.items()}
    reader.close()
    return {
        "records": count,
        "file_bytes": path.stat().st_size,
        "queries": results,
        "indexing": indexing(2 if quick else 10),
    }


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"audit queries over {summary['records']:,} records "
        f"({summary['file_bytes'] / 1e9:.1f} GB), limit 100, median of {REPEATS} "
        "(goal: under 1 s each)",
    ]
    for name, r in summary["queries"].items():
        verdict = "ok" if r["max_ms"] < 1000 else "MISSES GOAL"
        lines.append(
            f"  {name:36} {r['median_ms']:8.1f} ms  (first {r['first_ms']:7.1f} ms,"
            f" {r['records']:3d} records)  {verdict}"
        )
    lines.append(
        f"indexing as a new log grows ({USERS:,} users, {APPS} apps, {DATA_SOURCES} data"
        f" sources; batches of {BATCH}), indexer CPU us per record:"
    )
    for step in summary.get("indexing", []):
        lines.append(
            f"  up to {step['records_after']:>9,} records ({step['file_mb']:5.0f} MB):"
            f" {step['us_per_record']:5.1f}"
        )
    return "\n".join(lines)


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    print(report(run(quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
