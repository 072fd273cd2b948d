"""Writing the audit log: per-process journals, and the indexer that moves them into SQLite.

A decision is answered only once its record is durable. Here "durable" is one copy into a
memory-mapped journal file: the bytes are then in the kernel's page cache, in a file, and a
crash or `kill -9` of the process loses nothing (with `audit.sync = "full"` an msync, shared
by the records that came meanwhile, also carries them to the disk before the answer). That
copy takes no system call and never releases the GIL, which matters more than its size:
measured on the 2-core dev machine, a write(2) per record cost the gRPC server as much CPU
as the decision itself, because each release of the GIL is a thread hand-off
(docs/audit.md, "Cost").

Journals: `<audit.path>.journal/<ns>-<pid>-<rand>.journal`, mode 0600, made under a
temporary name, locked (flock, exclusive) by the process that writes it for as long as it
writes it, then renamed into place. Space is reserved up front (posix_fallocate) and the
unused end reads as zeros. A record is one line: its canonical JSON (AuditRecord.canonical)
and a newline; JSON escapes every control character, so a line holds no newline and no zero
byte, and a line is complete exactly when it ends in a newline and holds no zero byte.
When a journal is full, its writer switches to a fresh one (made ahead of time by its watch
thread) and unlocks the old one.

The indexer (`Indexer`, run by `policyd audit index --follow`, which `policyd serve` starts
and restarts) reads every journal from its mark, the byte offset stored in the audit file's
`audit_journal` table, and in one transaction chains and inserts the complete lines and
moves the mark. A journal that is unlocked (its writer closed it, or died) and indexed to
its end is deleted, along with its mark. A line its writer never finished (a crash in the
middle of the copy) has no newline or still holds zeros, and no caller saw its decision:
it is skipped.

Fail closed: a record that cannot be written (no new journal can be made) raises
AuditUnavailable, and so does every record while the indexer has been behind for longer
than `audit.timeout_seconds` (the writer's watch thread compares the marks with what it
wrote that long ago): then decisions are denied with AUDIT_UNAVAILABLE until it catches up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from policyd.audit.index import Index
from policyd.audit.reader import Reader
from policyd.audit.records import (
    CANONICAL,
    AuditRecord,
    AuditUnavailable,
    fields_of_line,
    journal_dir,
    json_string,
    open_log_file,
)
from policyd.audit.target import IndexTarget
from policyd.core import metrics
from policyd.core.errors import PolicydError

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
# Bytes reserved per journal file: about 50,000 records.
JOURNAL_BYTES = 16 << 20
# The most the indexer reads from one journal per transaction (about 3,000 records; a
# record is at most about 320 KB: audit.record_for bounds every field).
INDEX_CHUNK_BYTES = 1 << 20
# What a pass reads first (a pass under load finds about 60 KB); only a journal with more
# written than that is read a whole chunk at a time. Reading 1 MiB of mostly unwritten
# journal every 20 ms cost more than the SQL of a small pass.
FIRST_READ_BYTES = 64 << 10
WATCH_INTERVAL_SECONDS = 0.1
# Indexers that follow one journal folder (a server's, each embedded host's) take turns by
# a lock file in it: the one holding LEAD_FILE makes a pass every pass_interval; the others
# make one every FOLLOWER_PASS_SECONDS, which covers a leader that hangs without exiting,
# and take the lead as soon as it is free (a leader that exits frees it at once).
LEAD_FILE = ".indexer.lock"
FOLLOWER_PASS_SECONDS = 1.0
# A leader whose passes fail this many times in a row gives the lead up for LEAD_PAUSE_SECONDS
# (another indexer may do better: a connection of its own, another host's disk).
LEAD_FAILURES = 3
LEAD_PAUSE_SECONDS = 5.0
# How old an unlocked `.new-*` file must be before the indexer deletes it.
UNFINISHED_SECONDS = 60.0
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True, slots=True)
class LineTemplate:
    """The journal line of a remembered decision (engine.Remembered), for any later answer
    of it: only the decision id, the time, the request id and the latency change.

    `line(...)` equals the canonical JSON of the record those values would make
    (AuditRecord.canonical, which the chain hashes), without building the record."""

    middle: str  # the fields from "decision" through "door", JSON, comma-separated
    jti: str  # JSON
    message: str  # JSON

    @classmethod
    def of(cls, record: AuditRecord) -> LineTemplate:
        values = record.json_values()
        encode = CANONICAL.encode
        return cls(encode(values[2:14])[1:-1], encode(values[15]), encode(values[17]))

    def line(self, decision_id: str, ts: float, request_id: str, latency_us: int) -> str:
        # As json encodes them: an id of hex digits and dashes needs no escaping, a float is
        # its repr, an int its str, and a string goes through the same C escaper.
        return (
            f'["{decision_id}",{ts!r},{self.middle},{json_string(request_id[:200])},'
            f"{self.jti},{latency_us},{self.message}]"
        )


class _Journal:
    """One journal file, mapped into memory. Written only under AuditLog._wlock."""

    def __init__(self, directory: Path, size: int, sync_dir: bool = False) -> None:
        # Made under a temporary name, locked, then renamed: an indexer never sees a
        # journal that is not locked by its writer yet.
        temp = directory / f".new-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Blocks reserved now: writing the mapping later never meets a full disk.
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size, flags=_MAP_FLAGS)
            self.name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
            self.path = directory / self.name
            os.rename(temp, self.path)
            if sync_dir:  # audit.sync = "full": the new name survives power loss too
                dir_fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.fd = fd
        self.size = size
        self.offset = 0
        self.synced = 0
        self.closed = False

    def append(self, data: bytes) -> int | None:
        """Copy data after the last line; the offset after it, or None when it won't fit."""
        end = self.offset + len(data)
        if end > self.size:
            return None
        self.map[self.offset : end] = data
        self.offset = end
        return end

    def sync(self) -> None:
        self.map.flush(0, self.offset)

    def close(self) -> None:
        """Unmap and unlock: from now on the indexer may finish and delete it."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, ValueError):
                self.map.close()
            with contextlib.suppress(OSError):
                os.close(self.fd)


class AuditLog:
    """The writer side of the audit log, shared by all threads of one process.

    Until `start()`, each record is also indexed before record() returns (an in-process
    Indexer pass): for `policyd check --local` and tests. A server calls start(), and an
    indexer process does the indexing.

    `index` is where records are indexed (the SQLite file at `path` unless given; a
    PostgreSQL database for a replica of the PostgreSQL store, wiring.index_target): the
    in-process passes write it, and the watch thread reads from
    it how far the indexer has come."""

    def __init__(
        self,
        path: str | Path,
        key: bytes,
        *,
        sync: str = "normal",
        timeout: float = 5.0,
        journal_bytes: int = JOURNAL_BYTES,
        index: IndexTarget | None = None,
    ) -> None:
        self.path = Path(path)
        self.index = index or IndexTarget(self.path, sync=sync)
        self.key = key
        self.timeout = timeout
        self.sync_full = sync == "full"
        self.journal_bytes = journal_bytes
        self.journal_dir = self.index.journals
        self._wlock = threading.Lock()  # the journals
        self._synclock = threading.Lock()  # one msync at a time (sync = "full")
        self._standby: _Journal | None = None
        self._closed = False
        self._stuck = ""  # why records are refused, while the indexer is too far behind
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self._indexer: Indexer | None = None
        self._indexer_lock = threading.Lock()
        try:
            if not self.index.postgres:
                open_log_file(self.path, sync).close()  # the file and its schema, for readers
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The journals' folder, and on PostgreSQL the node's folder in it: both 0700.
            journal_dir(self.path).mkdir(mode=0o700, exist_ok=True)
            self.journal_dir.mkdir(mode=0o700, exist_ok=True)
            self._journal = _Journal(self.journal_dir, journal_bytes, self.sync_full)
        except (OSError, sqlite3.Error) as exc:
            raise AuditUnavailable(f"cannot open audit log {self.path}: {exc}") from exc

    # -- writing ---------------------------------------------------------------------

    def record(self, record: AuditRecord) -> None:
        """Make the record durable; raises AuditUnavailable when it cannot be."""
        self.append(record.canonical())

    def append(self, canonical: str) -> None:
        """Make a record durable from its canonical JSON (AuditRecord.canonical)."""
        data = (canonical + "\n").encode()
        with self._wlock:
            if self._stuck:
                raise AuditUnavailable(self._stuck)
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            journal = self._journal
            end = journal.append(data)
            if end is None:
                journal = self._next_journal()
                end = journal.append(data)
                if end is None:
                    raise AuditUnavailable(f"audit record of {len(data)} bytes: too large")
        if self.sync_full:
            self._sync(journal, end)
        m = metrics.current
        if m is not None:  # durable now (counted only once it is)
            m.audit_written(len(data))
        if self._watch is None:
            self._index_inline()

    def _sync(self, journal: _Journal, end: int) -> None:
        """msync the journal up to at least `end`; callers meanwhile share one msync."""
        with self._synclock:
            if journal.synced >= end:
                return
            if journal.closed:  # closed before this record was synced: not durable
                raise AuditUnavailable("audit journal closed before its sync")
            target = journal.offset
            try:
                journal.sync()
            except (OSError, ValueError) as exc:
                raise AuditUnavailable(f"audit journal sync failed: {exc}") from exc
            journal.synced = target

    def _next_journal(self) -> _Journal:
        """(Under _wlock.) Switch to the standby journal, or a new one; retire the full one."""
        try:
            fresh = self._standby or _Journal(self.journal_dir, self.journal_bytes, self.sync_full)
        except OSError as exc:
            raise AuditUnavailable(f"cannot start a new audit journal: {exc}") from exc
        self._standby = None
        old, self._journal = self._journal, fresh
        with self._synclock:  # no msync may use the old mapping once it is closed
            if self.sync_full:
                with contextlib.suppress(OSError, ValueError):
                    old.sync()
                    old.synced = old.offset  # only when the sync worked: see _sync
            old.close()
        return fresh

    def _index_inline(self) -> None:
        """Index now (no watch thread: no indexer process either). The record is already
        durable, so a failure here only leaves it for the next pass."""
        problem = self._index_here()
        if problem:
            log.warning("audit indexing failed, the record waits in its journal: %s", problem)

    def _index_here(self) -> str:
        """One pass of this process's own indexer; what went wrong ("" when nothing)."""
        try:
            indexer = self._own_indexer()
            try:
                indexer.run_once()
            except indexer.errors as exc:
                raise PolicydError(str(exc)) from exc
        except (OSError, PolicydError) as exc:
            return str(exc)
        return ""

    def flush(self) -> int:
        """Index everything written so far, in this process; returns how many records."""
        return self._own_indexer().run_once()

    def _own_indexer(self) -> Indexer:
        with self._indexer_lock:  # one, whichever thread asks first (it is thread-safe)
            if self._indexer is None:
                self._indexer = Indexer(
                    self.path,
                    self.key,
                    "full" if self.sync_full else "normal",
                    index=self.index.writer(),
                    journals=self.journal_dir,
                )
            return self._indexer

    # -- serving ---------------------------------------------------------------------

    def start(self) -> None:
        """From now on an indexer process indexes; watch that it keeps up, and keep a
        standby journal ready so that switching journals costs a decision nothing."""
        if self._watch is not None:
            return
        self._watch = threading.Thread(target=self._watch_loop, name="audit-watch", daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        samples: deque[tuple[float, str, int]] = deque()  # (time, journal, offset written)
        marks: Reader | None = None
        while not self._stopping.wait(WATCH_INTERVAL_SECONDS):
            if self._standby is None:
                self._prepare_standby()
            now = time.monotonic()
            journal = self._journal
            samples.append((now, journal.name, journal.offset))
            while len(samples) > 1 and samples[1][0] <= now - self.timeout:
                samples.popleft()
            when, name, offset = samples[0]
            if now - when < self.timeout or offset == 0:
                self._unstick()
                continue
            try:
                if marks is None:
                    marks = self.index.reader()
                mark = marks.journal_mark(name)
                indexed = (self.journal_dir / name).exists() is False or (
                    mark is not None and mark >= offset
                )
            except Exception as exc:  # never let the watch die: it is what fails closed
                indexed = False
                log.warning("audit watch cannot read the log: %s", exc)
                if marks is not None:  # a fresh connection next time
                    with contextlib.suppress(Exception):
                        marks.close()
                    marks = None
            if indexed:
                self._unstick()
            elif not self._stuck:
                self._stuck = (
                    f"the audit log has not indexed records for {self.timeout:g} s"
                    " (is `policyd audit index` running?)"
                )
                log.error("%s: denying decisions until it catches up", self._stuck)
        if marks is not None:
            marks.close()

    def _unstick(self) -> None:
        if self._stuck:  # said before records are taken again
            log.warning("the audit log has caught up: answering decisions again")
            self._stuck = ""

    def _prepare_standby(self) -> None:
        try:
            standby = _Journal(self.journal_dir, self.journal_bytes, self.sync_full)
        except OSError as exc:
            log.warning("cannot prepare the next audit journal: %s", exc)
            return
        with self._wlock:
            if self._standby is None:
                self._standby = standby
                return
        _discard(standby)

    def close(self) -> None:
        """Stop the watch thread and close the journals (which unlocks them for the
        indexer). Without a watch thread, index what is left first."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join(timeout=10)
        with self._wlock:
            self._closed = True  # a late record is refused, not written to a closed map
            journals = [self._journal]
            standby, self._standby = self._standby, None
        if standby is not None:
            _discard(standby)
        with self._synclock:
            for journal in journals:
                if self.sync_full:
                    with contextlib.suppress(OSError, ValueError):
                        journal.sync()
                journal.close()
        if self._watch is None:  # no indexer process: index what is left here
            problem = self._index_here()
            if problem:
                log.error("audit: records stay in %s: %s", self.journal_dir, problem)
        if self._indexer is not None:
            self._indexer.close()


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _after_next_line(fd: int, offset: int) -> int | None:
    """The offset after the next newline from `offset`, or None when none is written yet."""
    while True:
        data = os.pread(fd, INDEX_CHUNK_BYTES, offset)
        newline, zero = data.find(b"\n"), data.find(b"\0")
        if not data or (zero >= 0 and (newline < 0 or zero < newline)):
            return None
        if newline >= 0:
            return offset + newline + 1
        offset += len(data)


def _discard(journal: _Journal) -> None:
    """Close and delete a journal that was never written."""
    journal.close()
    with contextlib.suppress(OSError):
        journal.path.unlink()


class Stop(Protocol):
    """What Indexer.run stops on: a threading.Event, or a signal flag."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


class Indexer:
    """Moves records from the journals at `path` into the index (index.py: the audit
    file, unless another is given): one pass is `run_once()`.

    Several indexers (processes) may run at once on one log: the marks are read and moved
    inside the write transaction that inserts the records, so no line is indexed twice."""

    def __init__(
        self,
        path: str | Path,
        key: bytes,
        sync: str = "normal",
        *,
        index: Index | None = None,
        journals: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.key = key
        # IndexTarget.journals: on PostgreSQL, the node's own folder.
        self.journal_dir = journals if journals is not None else journal_dir(self.path)
        self.index: Index = (
            index if index is not None else IndexTarget(self.path, sync=sync).writer()
        )
        # What a pass may meet and survive (logged, retried): the index's and the files'.
        self.errors: tuple[type[Exception], ...] = (OSError, *self.index.errors)
        self.records = 0  # indexed by this indexer, and in how many transactions
        self.commits = 0
        # What the last pass found not yet indexed: how many records, and the time of the
        # oldest (each chunk's first line: a journal is written in time order, give or take
        # the microseconds between a decision's clock and its append).
        self.found = 0
        self.oldest: float | None = None
        # The chain's head after this indexer's last commit, and how often the next
        # transaction found the chain short of it (check_head).
        self._head: tuple[int, str] | None = None
        self.chain_breaks = 0
        self._known: dict[str, int] = {}  # journal -> mark, as last seen
        self._lock = threading.Lock()  # one pass at a time on the one connection
        self._next_sweep = 0.0  # when to look for journals cut short again
        self.passes = 0  # passes made by run()
        self._lead_fd: int | None = None  # LEAD_FILE, open (and locked once leading)
        self.leading = False
        self._lead_after = 0.0  # (monotonic) not before, after giving the lead up

    def close(self) -> None:
        with self._lock:
            self.index.close()

    def run_once(self, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Index what every journal holds now; returns how many records. A journal that
        cannot be read is logged and skipped (the others still get indexed); an error of
        the audit file itself is raised. `on_progress(journals done, journals)` after each
        journal."""
        total = 0
        with self._lock:
            self.found, self.oldest = 0, None
            try:
                paths = sorted(self.journal_dir.glob("*" + JOURNAL_SUFFIX))
            except FileNotFoundError:
                return 0
            if on_progress is not None:
                on_progress(0, len(paths))
            for done, path in enumerate(paths, 1):
                more = True
                while more:
                    try:
                        indexed, more = self._index_file(path)
                    except OSError as exc:
                        log.error("audit journal %s cannot be read: %s", path.name, exc)
                        break
                    total += indexed
                if on_progress is not None:
                    on_progress(done, len(paths))
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + UNFINISHED_SECONDS
                self._sweep_unfinished()
        return total

    def _sweep_unfinished(self) -> None:
        """Delete journals whose making was cut short (`.new-*`: never renamed, so never
        written). Its maker holds its lock from the moment after it is created until the
        rename; one that is unlocked and a minute old was left by a crash."""
        for path in self.journal_dir.glob(".new-*"):
            try:
                if time.time() - path.stat().st_mtime < UNFINISHED_SECONDS:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
                log.info("audit: removed %s, a journal whose making was cut short", path.name)
            except OSError:
                pass  # still being made (locked), or gone
            finally:
                os.close(fd)

    def _index_file(self, path: Path) -> tuple[int, bool]:
        """Index one chunk of the journal; (records, whether more is left to read)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # finished and deleted by another indexer
            return 0, False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                ended = True  # its writer closed it, or died
            except BlockingIOError:
                ended = False
            if not ended and os.pread(fd, 1, self._known.get(path.name, 0)) in (b"\0", b""):
                return 0, False  # nothing new since the last pass (no transaction needed)
            return self._index_chunk(path, fd, ended)
        finally:
            os.close(fd)

    def _index_chunk(self, path: Path, fd: int, ended: bool) -> tuple[int, bool]:
        with self.index.writing() as tx:
            # Another indexer may have finished this journal (indexed, deleted the file, then
            # its mark) since it was opened: inside the write lock, make sure it still exists
            # as this file, or the missing mark would read as 0 and index it all again.
            if not _same_file(path, fd):
                return 0, False
            mark = tx.mark(path.name)
            data = os.pread(fd, FIRST_READ_BYTES, mark)
            if len(data) == FIRST_READ_BYTES and b"\0" not in data:
                data = os.pread(fd, INDEX_CHUNK_BYTES, mark)  # more written: a whole chunk
            zero = data.find(b"\0")
            written = data if zero < 0 else data[:zero]
            complete = written[: written.rfind(b"\n") + 1]
            records = []
            for line in complete.splitlines():
                try:
                    records.append((line, fields_of_line(line)))
                except ValueError as exc:  # damaged: not as AuditLog wrote it
                    log.error("audit journal %s: skipping an unreadable line: %s", path, exc)
            if records:
                self.found += len(records)
                first = records[0][1][1]
                if self.oldest is None or first < self.oldest:
                    self.oldest = first
            new_mark = mark + len(complete)
            if not complete and len(written) == INDEX_CHUNK_BYTES:
                # A line longer than a chunk: AuditLog never writes one (record_for bounds
                # every field), so it is damage. Skip it, or the journal would stall here.
                after = _after_next_line(fd, mark + len(written))
                if after is not None:
                    log.error("audit journal %s: skipping an oversized line", path.name)
                    new_mark = after
            head = None
            if records:
                self._check_head(tx.chain_head())
                tx.append(self.key, records)
                head = tx.chain_head()
            if new_mark != mark:
                tx.set_mark(path.name, new_mark)
        if head is not None:  # committed
            self._head = head
        if records:
            self.records += len(records)
            self.commits += 1
            indexed = len(records)
            metrics.safely(lambda m: m.audit_indexed.inc(indexed))
        self._known[path.name] = new_mark
        more = len(data) == INDEX_CHUNK_BYTES and zero < 0
        if ended and not more:
            # All of it is indexed; what follows the last complete line, if anything, is a
            # line its writer never finished. Delete the file, then its mark (in that order:
            # a crash in between leaves a mark without a file, never a file without a mark).
            if complete != written:
                log.warning("audit journal %s: dropping an unfinished last line", path.name)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.index.forget(path.name)
            self._known.pop(path.name, None)
        return len(records), more

    def _passed(self, m: metrics.Metrics, started: float) -> None:
        m.audit_backlog_records.set(self.found)
        oldest = self.oldest
        m.audit_lag_seconds.set(0.0 if oldest is None else max(0.0, started - oldest))
        m.audit_last_pass.set(time.time())

    def _check_head(self, found: tuple[int, str]) -> None:
        """The chain must still end where this indexer left it, or further on (another
        indexer may have added records since). A head further back, or the same record
        with another hash, means the newest records were deleted or edited: the one
        tampering a chain cannot show by itself (docs/audit.md). Said and counted; the
        chain goes on from what is there, and `policyd audit verify` names the damage."""
        left = self._head
        if left is None or found[0] > left[0] or found == left:
            return
        self.chain_breaks += 1
        log.error(
            "the audit chain ends at record %d, but this indexer left it at record %d"
            " (%s...): its newest records were deleted or edited; run `policyd audit verify`",
            found[0],
            left[0],
            left[1][:12],
        )
        metrics.safely(lambda m: m.audit_verify_failures.inc())

    def prune(self, *, before: float | None = None, max_bytes: int | None = None) -> int:
        with self._lock:
            return self.index.prune(before=before, max_bytes=max_bytes)

    def run(
        self,
        stop: Stop,
        *,
        interval: float | None = None,
        retention: tuple[float | None, int | None] = (None, None),
        retention_every: float = 60.0,
        parent: int | None = None,
    ) -> None:
        """Index until `stop` is set (or the process `parent` is gone), then once more.

        `retention` is (max age in seconds, max bytes); applied every retention_every s.
        `interval`: between passes (default: the index's pass_interval).
        Of the indexers following one folder, the one holding LEAD_FILE makes a pass every
        interval, the others every FOLLOWER_PASS_SECONDS (docs/audit.md, "Indexers")."""
        if interval is None:
            interval = self.index.pass_interval
        failures = 0
        next_retention = time.monotonic() + retention_every
        next_pass = 0.0  # a follower's next pass
        try:
            while not stop.is_set():
                if parent is not None and os.getppid() != parent:
                    log.warning("audit indexer: the server is gone; indexing what is left")
                    break
                leading = self._lead()
                if not leading and time.monotonic() < next_pass:
                    stop.wait(interval)
                    continue
                next_pass = time.monotonic() + FOLLOWER_PASS_SECONDS
                failures = self._pass(failures)
                if leading and failures >= LEAD_FAILURES:
                    log.warning("audit indexer: %d passes failed, giving up the lead", failures)
                    self._unlead()
                    self._lead_after = time.monotonic() + LEAD_PAUSE_SECONDS
                # Each indexer applies its own settings (a leader's config may have none).
                max_age, max_bytes = retention
                if (max_age or max_bytes) and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + retention_every
                    self._retain(max_age, max_bytes)
                # Every pass, even a busy one, is followed by a pause: records gather
                # meanwhile, and one transaction carries them all (about interval x rate).
                stop.wait(interval if failures == 0 else min(2.0, interval * 2**failures))
        finally:
            self._unlead()  # a follower may lead from now on
        try:
            self.run_once()
        except self.errors as exc:
            log.error("audit indexing failed at exit; records stay in their journals: %s", exc)

    def _pass(self, failures: int) -> int:
        """One pass of run(); how many passes in a row have failed since."""
        self.passes += 1
        started = time.time()
        try:
            self.run_once()
            if failures:
                log.info("audit indexing works again")
            failures = 0
        except self.errors as exc:
            failures += 1
            if failures == 1 or failures % 100 == 0:
                log.error("audit indexing failed (%d times): %s", failures, exc)
        if metrics.current is not None:
            # What this pass found waiting, and for how long the oldest of it had waited
            # when the pass began. A failed pass (the index cannot be written) finds the
            # same records again next time, so the lag keeps growing.
            metrics.safely(functools.partial(self._passed, started=started))
        return failures

    def _retain(self, max_age: float | None, max_bytes: int | None) -> None:
        try:
            removed = self.prune(
                before=time.time() - max_age if max_age else None,
                max_bytes=max_bytes or None,
            )
            if removed:
                log.info("audit retention pruned %d records", removed)
        except self.errors as exc:
            log.warning("audit retention failed: %s", exc)

    def _lead(self) -> bool:
        """Whether this indexer holds its folder's LEAD_FILE (taking it when it is free)."""
        if self.leading:
            return True
        if time.monotonic() < self._lead_after:
            return False
        try:
            if self._lead_fd is None:
                self._lead_fd = os.open(
                    self.journal_dir / LEAD_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            fcntl.flock(self._lead_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # (say, no folder yet): then a follower's passes
            log.debug("audit indexer cannot take the lead: %s", exc)
            return False
        self.leading = True
        return True

    def _unlead(self) -> None:
        fd, self._lead_fd, self.leading = self._lead_fd, None, False
        if fd is not None:
            os.close(fd)  # the flock goes with its only descriptor
