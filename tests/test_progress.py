"""Progress bars of the long commands (policyd/cli/progress.py): drawn on stderr when it is
a terminal, nothing at all when it is not or the output is for programs (--json), and
stdout the same either way.

Each command runs as a real process: once with a pseudo-terminal as its stderr (stdout a
pipe, as when a script reads it), once with both piped.
"""

from __future__ import annotations

import io
import os
import pty
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlite_utils import Database

from policyd.audit.journal import AuditLog
from policyd.audit.records import load_key
from policyd.cli.progress import progress, wanted
from policyd.decision.wiring import index_target
from policyd.store import migrations, pg_migrations
from tests.helpers import ROOT, Home
from tests.pg_support import pg_url  # noqa: F401  (a fixture)
from tests.test_audit import _record

RECORDS = 3000


@dataclass
class Run:
    code: int
    out: str
    err: str  # as the terminal got it (its newlines are "\r\n"), or as piped


def _env(term: str = "xterm") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env["TERM"] = term
    return env


def _command(home: Home | Path | None, args: tuple[str, ...]) -> list[str]:
    """policyd with the home's (or this) config file; None: the benchmarks."""
    if home is None:
        return [sys.executable, "-m", "bench", *args]
    config = home.config_path if isinstance(home, Home) else home
    return [sys.executable, "-m", "policyd", "--config", str(config), *args]


def on_terminal(home: Home | Path | None, *args: str, term: str = "xterm") -> Run:
    """Run with a pseudo-terminal as stderr and stdout piped."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        _command(home, args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
        env=_env(term),
    )
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every holder of the slave has closed it
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert process.stdout is not None
    out = process.stdout.read()
    process.stdout.close()
    return Run(process.wait(timeout=60), out.decode(), err.decode())


def piped(home: Home | Path | None, *args: str) -> Run:
    done = subprocess.run(
        _command(home, args), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60
    )
    return Run(done.returncode, done.stdout, done.stderr)


def assert_bar(err: str, label: str, total: int) -> None:
    """A bar labelled `label` was drawn, and ended at total/total, 100%, on its own line."""
    assert label in err, err
    assert re.search(rf"{re.escape(label)}\s+\[#+\]\s+{total}/{total}\s+100%", err), err
    assert err.endswith("\r\n"), err  # the line is ended: what follows starts afresh


def _fill(home: Home, count: int, *, old: int = 0) -> None:
    """`count` records in the audit file, the first `old` of them two hours old."""
    key = load_key(home.config.audit.key_file, create=True)
    audit = AuditLog(Path(home.config.audit.path), key)
    now = time.time()
    for i in range(count):
        audit.record(_record(ts=now - 7200 if i < old else now, request_id=f"r{i}"))
    audit.close()


@pytest.fixture
def logged(home: Home) -> Home:
    _fill(home, RECORDS, old=RECORDS // 2)
    return home


# -- audit verify -------------------------------------------------------------------------


def test_verify_draws_a_bar_over_the_records_on_a_terminal(logged: Home) -> None:
    term = on_terminal(logged, "audit", "verify")
    plain = piped(logged, "audit", "verify")
    assert term.code == plain.code == 0
    assert_bar(term.err, "verifying records", RECORDS)
    assert plain.err == ""
    assert term.out == plain.out and plain.out.startswith(f"ok: {RECORDS} records, chain head ")


def test_verify_with_json_draws_nothing_even_on_a_terminal(logged: Home) -> None:
    term = on_terminal(logged, "audit", "verify", "--json")
    assert term.code == 0 and term.err == ""
    assert term.out == piped(logged, "audit", "verify", "--json").out
    assert f'"checked": {RECORDS}' in term.out


def test_a_dumb_terminal_gets_no_bar(logged: Home) -> None:
    term = on_terminal(logged, "audit", "verify", term="dumb")
    assert term.code == 0 and term.err == ""


def test_a_broken_chain_ends_the_bar_before_the_report(logged: Home) -> None:
    with sqlite3.connect(logged.config.audit.path) as db:
        db.execute("UPDATE audit SET user_id = 'mallory' WHERE seq = 2000")
    term = on_terminal(logged, "audit", "verify")
    assert term.code == 1
    assert "verifying records" in term.err and term.err.endswith("\r\n")
    assert term.out == piped(logged, "audit", "verify").out
    assert term.out.startswith("broken after 1999 good records: record 2000")


# -- audit prune --------------------------------------------------------------------------


def test_prune_draws_a_bar_over_the_records_it_deletes(logged: Home) -> None:
    term = on_terminal(logged, "audit", "prune", "--before", "1h")
    assert term.code == 0
    assert_bar(term.err, "pruning records", RECORDS // 2)
    assert term.out == f"pruned {RECORDS // 2} records\n"
    plain = piped(logged, "audit", "verify")
    assert plain.out.startswith(f"ok: {RECORDS // 2} records")


def test_prune_piped_prints_only_its_result(logged: Home) -> None:
    plain = piped(logged, "audit", "prune", "--before", "1h")
    assert (plain.code, plain.out, plain.err) == (0, f"pruned {RECORDS // 2} records\n", "")


def test_prune_with_bad_input_is_one_line_and_no_bar(logged: Home) -> None:
    term = on_terminal(logged, "audit", "prune", "--before", "yesterday-ish")
    assert term.code == 1 and term.out == ""
    assert (
        term.err.startswith("policyd: error: time must be a duration") and term.err.count("\n") == 1
    )


# -- audit index --------------------------------------------------------------------------


def _journals(home: Home) -> None:
    """Two journals of 30 and 20 records, as two servers that ended left them."""
    key = load_key(home.config.audit.key_file, create=True)
    for count in (30, 20):
        audit = AuditLog(home.config.audit.path, key, index=index_target(home.config))
        audit.start()  # journals only: `policyd audit index` moves them
        for i in range(count):
            audit.record(_record(request_id=f"r{i}"))
        audit.close()


def test_index_draws_a_bar_over_the_journals(home: Home) -> None:
    _journals(home)
    term = on_terminal(home, "audit", "index")
    assert term.code == 0
    assert_bar(term.err, "indexing journals", 2)
    assert term.out == "indexed 50 records\n"


def test_index_piped_prints_only_its_result(home: Home) -> None:
    _journals(home)
    plain = piped(home, "audit", "index")
    assert (plain.code, plain.out, plain.err) == (0, "indexed 50 records\n", "")


# -- migrations ---------------------------------------------------------------------------


def _sqlite_migrations() -> int:
    """How many migrations a new SQLite store applies: all there are."""
    return len(migrations.migrations.pending(Database(memory=True)))


def _unmigrated(home: Home) -> None:
    """Take the store away: the next command makes it again, applying every migration."""
    home.store.close()
    for path in home.root.glob("policyd.db*"):
        path.unlink()


def test_the_first_command_on_a_new_store_draws_a_bar_over_the_migrations(home: Home) -> None:
    expected = piped(home, "apps", "list").out
    _unmigrated(home)
    term = on_terminal(home, "apps", "list")
    assert term.code == 0
    assert_bar(term.err, "migrating the store", _sqlite_migrations())
    assert term.out == expected
    again = on_terminal(home, "apps", "list")  # nothing pending: nothing drawn
    assert (again.code, again.out, again.err) == (0, expected, "")


def test_migrations_draw_nothing_piped_or_with_json(home: Home) -> None:
    expected = piped(home, "apps", "list", "--json").out
    _unmigrated(home)
    plain = piped(home, "apps", "list")
    assert plain.code == 0 and plain.err == ""
    _unmigrated(home)
    term = on_terminal(home, "apps", "list", "--json")
    assert (term.code, term.out, term.err) == (0, expected, "")


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.slow
def test_on_postgresql_migrations_index_verify_and_prune_draw_bars(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    for folder in ("sqlite", "pg"):
        (tmp_path / folder).mkdir()
    home = Home(tmp_path / "sqlite")
    home.store.close()
    # The same home on the (new, empty) PostgreSQL database: its first command migrates it.
    config = tmp_path / "pg.toml"
    config.write_text(
        home.config_path.read_text().replace("[store]\n", f'[store]\nurl = "{pg_url}"\n', 1)
        + '[cluster]\nnode = "n1"\n'
    )
    term = on_terminal(config, "apps", "list")
    assert term.code == 0 and term.out.startswith("CLIENT_ID")
    assert_bar(term.err, "migrating the store", len(pg_migrations.MIGRATIONS))
    assert on_terminal(config, "apps", "list").err == ""  # nothing pending any more
    pg = Home(tmp_path / "pg", extra_config='[cluster]\nnode = "n1"\n', store_url=pg_url)
    pg.store.close()
    _journals(pg)
    term = on_terminal(pg, "audit", "index")
    assert term.code == 0 and term.out == "indexed 50 records\n"
    assert_bar(term.err, "indexing journals", 2)
    term = on_terminal(pg, "audit", "verify")
    assert term.code == 0 and term.out == piped(pg, "audit", "verify").out
    assert_bar(term.err, "verifying records", 50)
    term = on_terminal(pg, "audit", "prune", "--before", "0s")
    assert term.code == 0 and term.out == "pruned 50 records\n"
    assert_bar(term.err, "pruning records", 50)
    assert piped(pg, "audit", "verify").out.startswith("node n1: ok: 0 records")


# -- make bench ---------------------------------------------------------------------------


@pytest.mark.slow  # the benchmark runs twice
def test_bench_draws_a_bar_over_the_benchmarks_on_a_terminal(tmp_path: Path) -> None:
    out = ["--quick", "--only", "policy", "--out", str(tmp_path / "results.json")]
    term = on_terminal(None, *out)
    assert term.code == 0
    assert_bar(term.err, "benchmarks", 1)
    assert re.search(r"benchmarks +\[-+\] +0/1 +0% +policy", term.err), term.err  # running
    assert term.out.startswith("policyd benchmarks, ") and "\r" not in term.out
    plain = piped(None, *out)
    assert plain.code == 0 and plain.err == "running policy ...\n"

    # The same report, but for the measurements themselves (and the padding that aligns
    # them: 9 us and 12 us take different widths).
    def shape(text: str) -> list[str]:
        return [" ".join(re.sub(r"[\d.]+", "N", line).split()) for line in text.splitlines()[1:]]

    assert shape(term.out) == shape(plain.out)


# -- the helper ---------------------------------------------------------------------------


def test_no_bar_is_wanted_on_a_file_or_for_programs() -> None:
    assert not wanted(io.StringIO(), machine=False)
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as terminal:
            assert wanted(terminal, machine=False) or os.environ.get("TERM") == "dumb"
            assert not wanted(terminal, machine=True)
            with progress("x", machine=True, stream=terminal) as bar:
                assert bar is None  # the core is given nothing to call
    finally:
        os.close(slave)
        os.close(master)
