"""`policyd audit ...`: query, tail, show, stats, verify, prune and index the audit log.

The commands read the index directly: the audit file (read-only, WAL), so they never block
the server writing it, or, with a PostgreSQL store, the audit tables of its database, which
hold every replica's records (each with its node). Times are shown in UTC.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from policyd.audit.reader import Query, Reader
from policyd.audit.reader import follow as follow_records
from policyd.audit.records import FIELDS, StoredRecord, load_key
from policyd.cli.context import Context, pass_ctx
from policyd.cli.progress import progress
from policyd.core import logs
from policyd.core.errors import InvalidInput, PolicydError
from policyd.core.reasons import Reason
from policyd.decision.wiring import index_target
from policyd.serve.indexer import follow, open_indexer

F = TypeVar("F", bound=Callable[..., Any])

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Table columns and widths: together with the gaps they fit 100 columns.
_TABLE = (
    ("time", 19),
    ("decision", 8),
    ("reason", 23),
    ("app", 12),
    ("user", 10),
    ("data sources", 18),
)


def parse_when(text: str, now: float | None = None) -> float:
    """'15m', '2h', '7d' ago, or an ISO 8601 time (UTC when no zone is given)."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"time must be a duration like 15m, 2h, 7d or an ISO time, not {text!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _row(stored: StoredRecord) -> list[str]:
    r = stored.record
    return [
        _iso(r.ts),
        r.decision,
        r.reason,
        r.client_id or "-",
        r.user_id or "-",
        ",".join(r.data_sources) or "-",
    ]


class Printer:
    """Prints records as a table (default), JSON lines or CSV."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._started = False
        self._csv = csv.writer(sys.stdout, lineterminator="\n") if fmt == "csv" else None

    def header(self) -> None:
        if self._started:
            return
        self._started = True
        if self.fmt == "table":
            click.echo("  ".join(name.upper().ljust(w) for name, w in _TABLE).rstrip())
        elif self._csv is not None:
            self._csv.writerow(["seq", *FIELDS])

    def record(self, stored: StoredRecord) -> None:
        self.header()
        if self.fmt == "json":
            click.echo(json.dumps(stored.as_dict(), sort_keys=True))
        elif self._csv is not None:
            d = stored.as_dict()
            self._csv.writerow(
                [stored.seq] + [" ".join(d[f]) if isinstance(d[f], list) else d[f] for f in FIELDS]
            )
        else:
            cells = _row(stored)
            click.echo(
                "  ".join(
                    _fit(c, w).ljust(w) for c, (_, w) in zip(cells, _TABLE, strict=True)
                ).rstrip()
            )
        sys.stdout.flush()


def filter_options(func: F) -> F:
    """The filters shared by `audit query` and `audit tail`."""
    options = [
        click.option("--app", "client_id", help="Only this app (client_id)."),
        click.option("--user", "user_id", help="Only this user."),
        click.option("--data-source", help="Only decisions touching this data source."),
        click.option("--decision", type=click.Choice(["allow", "deny"])),
        click.option("--reason", help="A reason code, e.g. DATA_SOURCE_NOT_GRANTED."),
        click.option("--rule", "rule_id", help="A route rule id."),
        click.option("--door", help="grpc, envoy, envoy_http, asgi, embedded, link or cli."),
        click.option("--request-id"),
        click.option("--node", help="Only this replica's decisions (PostgreSQL store)."),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["table", "json", "csv"]),
            default="table",
            show_default=True,
        ),
        click.option("--json", "as_json", is_flag=True, help="Same as --format json."),
        click.option("--csv", "as_csv", is_flag=True, help="Same as --format csv."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _query(kw: dict[str, Any]) -> tuple[Query, str]:
    reason = kw.get("reason")
    if reason is not None and reason not in Reason.__members__:
        raise InvalidInput(f"unknown reason code {reason!r}")
    as_json, as_csv, fmt = kw.pop("as_json"), kw.pop("as_csv"), kw.pop("fmt")
    if as_json and as_csv:
        raise click.UsageError("give at most one of --json and --csv")
    fmt = "json" if as_json else "csv" if as_csv else fmt
    return Query(**kw), fmt


def _reader(obj: Context, *, with_key: bool = False) -> Reader:
    config = obj.config
    key = load_key(config.audit.key_file) if with_key else None
    return index_target(config).reader(key)


@click.group()
def audit() -> None:
    """The audit log of every decision."""


@audit.command("query")
@click.option("--since", help="Start: a duration ago (15m, 2h, 7d) or an ISO time.")
@click.option("--until", help="End (exclusive): a duration ago or an ISO time.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="At most this many records: the newest that match, oldest first.",
)
@filter_options
@pass_ctx
def audit_query(obj: Context, /, since: str | None, until: str | None, **kw: Any) -> None:
    """Find decisions. Prints the newest matching records, oldest first."""
    now = time.time()
    kw["since"] = parse_when(since, now) if since else None
    kw["until"] = parse_when(until, now) if until else None
    q, fmt = _query(kw)
    reader = _reader(obj)
    printer = Printer(fmt)
    printer.header()
    for stored in reader.query(q):
        printer.record(stored)


@audit.command("tail")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(0, 100_000),
    default=10,
    show_default=True,
    help="Show this many recent records first.",
)
@click.option(
    "-f",
    "--follow",
    "follow_mode",
    is_flag=True,
    help="Keep printing new records as they are written, until Ctrl-C.",
)
@filter_options
@pass_ctx
def audit_tail(obj: Context, /, lines: int, follow_mode: bool, **kw: Any) -> None:
    """Show the latest records; with --follow, stream new ones as they come."""
    q, fmt = _query(kw)
    reader = _reader(obj)
    printer = Printer(fmt)
    printer.header()
    position = reader.position()
    if lines:
        q.limit = lines
        for stored in reader.query(q):
            printer.record(stored)
    if follow_mode:
        for stored in follow_records(reader, q, after=position):
            printer.record(stored)


@audit.command("show")
@click.argument("decision_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit_show(obj: Context, decision_id: str, as_json: bool) -> None:
    """Print one record whole, by decision id."""
    stored = _reader(obj).show(decision_id)
    if stored is None:
        raise InvalidInput(f"no audit record {decision_id!r}")
    data = stored.as_dict()
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
        return
    data["time"] = datetime.fromtimestamp(stored.record.ts, UTC).isoformat(timespec="milliseconds")
    for key in (
        *(["node"] if stored.node else []),
        "seq",
        "id",
        "time",
        *[f for f in FIELDS if f not in ("id", "ts")],
        "prev_hash",
        "hash",
    ):
        value = data[key]
        shown = " ".join(value) if isinstance(value, list) else str(value)
        click.echo(f"{key + ':':16}{shown or '-'}")


@audit.command("stats")
@click.option("--since", default="24h", show_default=True, help="A duration ago or ISO time.")
@click.option("--until", help="End (exclusive).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit_stats(obj: Context, since: str, until: str | None, as_json: bool) -> None:
    """Count decisions by decision, reason, app and data source over a window."""
    now = time.time()
    stats = _reader(obj).stats(parse_when(since, now), parse_when(until, now) if until else None)
    if as_json:
        click.echo(json.dumps(stats, sort_keys=True))
        return
    for title, counts in stats.items():
        click.echo(f"by {title.replace('_', ' ')}:")
        if not counts:
            click.echo("  -")
        width = max((len(k) for k in counts), default=0)
        for name, count in counts.items():
            click.echo(f"  {name.ljust(width)}  {count}")


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per chain.")
@pass_ctx
def audit_verify(obj: Context, as_json: bool) -> None:
    """Check the hash chain (with a PostgreSQL store: each replica's); name the first
    broken link (exit 1 when one is broken)."""
    reader = _reader(obj, with_key=True)
    with progress("verifying records") as bar:
        results = reader.verify_chains(on_progress=bar)
    for result in results:
        if as_json:
            click.echo(json.dumps(result.as_dict(), sort_keys=True))
            continue
        node = f"node {result.node}: " if result.node else ""
        if result.ok:
            click.echo(f"{node}ok: {result.checked} records, chain head {result.head}")
        else:
            click.echo(f"{node}broken after {result.checked} good records: {result.problem}")
    if not results and not as_json:
        click.echo("ok: no records yet")
    if not all(result.ok for result in results):
        sys.exit(1)


@audit.command("prune")
@click.option("--before", required=True, help="Delete records older than this (e.g. 90d).")
@pass_ctx
def audit_prune(obj: Context, before: str) -> None:
    """Delete old records (of every replica's chain); the remaining chains still verify."""
    cut = parse_when(before)
    index = index_target(obj.config).writer()
    try:
        with progress("pruning records") as bar:
            removed = index.prune(before=cut, on_progress=bar)
    finally:
        index.close()
    click.echo(f"pruned {removed} records")


@audit.command("index")
@click.option(
    "--follow",
    "follow_mode",
    is_flag=True,
    help="Keep indexing new records until SIGTERM (what `policyd serve` runs).",
)
@pass_ctx
def audit_index(obj: Context, follow_mode: bool) -> None:
    """Move records from the journals into the audit file (or the PostgreSQL store's).

    Without --follow: one pass, e.g. for journals a crashed server left behind (`policyd
    serve` does that itself when it starts). With --follow, also apply the retention
    settings (audit.max_age_days, audit.max_bytes)."""
    config = obj.config
    indexer = open_indexer(config)
    try:
        if not follow_mode:
            try:
                with progress("indexing journals") as bar:
                    found = indexer.run_once(on_progress=bar)
            except indexer.errors as exc:
                raise PolicydError(f"cannot index the audit journals: {exc}") from None
            click.echo(f"indexed {found} records")
            return
        logs.configure(config.log.format)  # a long-running process: it logs like a server
        follow(indexer, config)
    finally:
        indexer.close()
