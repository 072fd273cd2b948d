"""The SQLite backend of the store: one file in WAL mode, shared by every policyd process
on the host.

Each thread gets its own connection. Writes run in `BEGIN IMMEDIATE` transactions and bump
the store's generation (by trigger, see migrations.py) in the same transaction, so any
reader that checks the generation after a write has returned sees it (facts.py reads it
through `PRAGMA data_version`). Nothing here opens, maps or locks SQLite's own files.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

from policyd.core.errors import StoreUnavailable
from policyd.core.files import create_private
from policyd.store.base import Store
from policyd.store.migrations import migrations
from policyd.store.sql import Conn

BUSY_TIMEOUT_MS = 5000


def connect(path: Path) -> sqlite3.Connection:
    """Open one connection with the pragmas every policyd connection uses."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on any connection: BEGIN IMMEDIATE, then COMMIT at the end of the
    with-block, or ROLLBACK if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    with _commit_or_rollback(conn):
        yield conn


# Commits this process made through any store or audit connection (bumped after each):
# what tells a batch of recalls on an event loop (Facts.recall) that a write was made in
# this process since its check, even on the loop itself, without a pause between.
commits = 0
_commits_lock = threading.Lock()


@contextmanager
def _commit_or_rollback(conn: sqlite3.Connection) -> Iterator[None]:
    global commits
    try:
        yield
        conn.execute("COMMIT")
        with _commits_lock:  # (a += from two threads could lose one)
            commits += 1
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteStore(Store):
    """The policy store on one SQLite file."""

    backend = "sqlite"
    errors = (sqlite3.Error,)
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(
        self,
        path: str | Path,
        *,
        migrate: bool = True,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Open the store at `path`; with `migrate`, create it and apply pending migrations
        first, reporting `on_progress(applied, pending)` after each."""
        self.path = Path(path)
        self.where = str(self.path)
        self._local = threading.local()
        if migrate:
            self.migrate(on_progress)
        elif not self.path.exists():
            raise StoreUnavailable(f"store {self.path} does not exist")

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = connect(self.path)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def read(self) -> Iterator[Conn]:
        yield self.conn()

    @contextmanager
    def write(self) -> Iterator[Conn]:
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"store {self.path} is busy: {exc}") from exc
        with _commit_or_rollback(conn):
            yield conn

    def migrate(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Create the file (mode 0600) and apply pending migrations, one process at a time;
        `on_progress(applied, pending)` after each (not called when none is pending)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_private(self.path)
        lock_path = self.path.with_name(self.path.name + ".migrate-lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                raw.execute("PRAGMA journal_mode = WAL")
                db = Database(raw, execute_plugins=False)
                pending = [m.name for m in migrations.pending(db)]
                if pending and on_progress is not None:
                    on_progress(0, len(pending))
                # One at a time (each in its own transaction, as apply does them all).
                for done, following in enumerate([*pending[1:], None], 1):
                    migrations.apply(db, stop_before=following)
                    if on_progress is not None:
                        on_progress(done, len(pending))
            except sqlite3.DatabaseError as exc:
                raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
            finally:
                raw.close()
        finally:
            os.close(fd)
