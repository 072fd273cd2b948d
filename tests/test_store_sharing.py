"""Processes sharing one store file keep SQLite's own locks: policyd never opens, maps or
locks SQLite's private files, so a process that opens the store later can never take the
shared memory of live readers for its own (issue 13: a server died with SIGBUS, and could
have read a damaged WAL index, while CLI processes revoked and restored grants)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from policyd.core.model import Access
from policyd.store.facts import Facts
from policyd.store.sqlite import SqliteStore
from tests.helpers import ROOT

# A long-lived reader, as `policyd serve` is: two threads decide without pause (their
# errors end the process), and each line on stdin starts one more view, which prints the
# generation it saw and whether a remembered answer was recalled.
_READER = textwrap.dedent(
    """
    import os, sys, threading
    from policyd.store.facts import Facts
    from policyd.store.sqlite import SqliteStore

    facts = Facts(SqliteStore(sys.argv[1], migrate=False))

    def busy():
        try:
            while True:
                view = facts.view()
                view.data_source_labels("ds-0")
                facts.recall("other")
                facts.store.conn().execute("SELECT count(*) FROM data_sources").fetchone()
        except BaseException as exc:
            print("busy thread:", repr(exc), file=sys.stderr, flush=True)
            os._exit(3)

    for _ in range(2):
        threading.Thread(target=busy, daemon=True).start()
    for line in sys.stdin:
        view = facts.view()
        if line.strip() == "remember":
            view.remember("key", "answer")
        print(view.generation, facts.recall("key"), flush=True)
    """
)

# A short-lived writer, as a CLI command is: opens the store, writes once, exits.
STEPS = 30
_WRITER = textwrap.dedent(
    """
    import sys
    from policyd.store.sqlite import SqliteStore

    SqliteStore(sys.argv[1], migrate=False).add_data_source(sys.argv[2])
    """
)


def _locks_held_on(path: Path) -> list[str]:
    """This process's POSIX locks on `path`, as the kernel lists them (/proc/locks; the
    file itself is only stat'ed, never opened)."""
    inode = os.stat(path).st_ino
    pid = str(os.getpid())
    return [
        line
        for line in Path("/proc/locks").read_text().splitlines()
        if "POSIX" in line and line.split()[4] == pid and line.split()[5].endswith(f":{inode}")
    ]


def test_deciding_keeps_sqlites_lock_on_the_shared_memory_file(tmp_path: Path) -> None:
    """Every SQLite connection holds a shared lock on `<db>-shm` while it is open, which tells
    other processes the shared memory is in use. Closing any other descriptor of that file
    in the process would drop it (POSIX): views, remembering and recalling must keep it."""
    db = tmp_path / "policyd.db"
    store = SqliteStore(db)
    store.add_user("alice")
    shm = db.with_name(db.name + "-shm")
    assert _locks_held_on(shm), "SQLite holds no lock on its shared memory: test set-up"
    facts = Facts(store)
    for _ in range(3):
        facts.view().remember("key", "answer")
        facts.recall("key")
        store.add_data_source(f"ds-{_}")
    assert _locks_held_on(shm)


def _write(db: Path, name: str) -> None:
    subprocess.run([sys.executable, "-c", _WRITER, str(db), name], check=True, cwd=ROOT, timeout=60)


def test_a_short_lived_writer_process_leaves_a_live_readers_shared_memory_alone(
    tmp_path: Path,
) -> None:
    """The old commit watch (before PRAGMA data_version) opened `<db>-shm` with open() and
    closed it after mapping it: on POSIX that dropped every fcntl lock the reader process
    held on the file, SQLite's
    "shared memory in use" lock included. The next process to open the store then thought
    itself alone, reset the shared memory under the reader (SIGBUS in the reader) and, on
    closing, deleted it (the reader stopped seeing commits)."""
    db = tmp_path / "policyd.db"
    SqliteStore(db).close()  # created and migrated; this process keeps no connection
    start = SqliteStore(db, migrate=False)
    first = start.generation()
    start.close()
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert reader.stdin is not None and reader.stdout is not None
    seen: list[str] = []

    def ask(command: str) -> None:
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write(command + "\n")
        reader.stdin.flush()
        seen.append(reader.stdout.readline().strip())

    try:
        for step in range(STEPS):
            ask("remember" if step % 2 == 0 else "view")
            _write(db, f"ds-{step}")
        ask("view")
    except BrokenPipeError:
        pass  # the reader died: its exit status and error are asserted below
    finally:
        with contextlib.suppress(BrokenPipeError):
            reader.stdin.close()
        try:
            reader.wait(timeout=30)
        except subprocess.TimeoutExpired:
            reader.kill()
            reader.wait()
        assert reader.stderr is not None
        err = reader.stderr.read()
        reader.stdout.close()
        reader.stderr.close()
    assert reader.returncode == 0, f"reader exited {reader.returncode}: {err[-2000:]}"
    # Each view sees every write that returned before it, and a remembered answer is
    # recalled only until the next write: one bump of the generation per data source.
    expected = [f"{first + step} {'answer' if step % 2 == 0 else None}" for step in range(STEPS)]
    assert seen == [*expected, f"{first + STEPS} None"]


def test_a_write_on_the_deciding_threads_own_connection_is_seen_by_its_next_view(
    tmp_path: Path,
) -> None:
    """A thread that writes (the authorization server's, say) and then decides: the change
    counter SQLite offers (PRAGMA data_version) does not move for a connection's own
    commits, so the decision-time reads must not share the writer's connection."""
    store = SqliteStore(tmp_path / "policyd.db")
    store.add_user("alice")
    store.add_app("app1", "App", redirect_uris=[], scopes=["DataRead"], confidential=False)
    store.add_data_source("ds-a")
    store.set_user_access("alice", "ds-a", Access.READ)
    store.add_grant("alice", "app1", "ds-a", Access.READ)
    facts = Facts(store)
    assert facts.view().grant("alice", "app1", "ds-a") is Access.READ
    facts.view().remember("key", "answer")
    assert facts.recall("key") == "answer"
    store.revoke_grant("alice", "app1", "ds-a")  # this thread's store connection
    assert facts.recall("key") is None
    assert facts.view().grant("alice", "app1", "ds-a") is None


def test_a_view_on_another_thread_sees_a_write_that_returned_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "policyd.db")
    store.add_user("alice")
    store.add_app("app1", "App", redirect_uris=[], scopes=["DataRead"], confidential=False)
    store.add_data_source("ds-a")
    store.set_user_access("alice", "ds-a", Access.READ)
    store.add_grant("alice", "app1", "ds-a", Access.READ)
    facts = Facts(store)
    seen: list[Access | None] = []
    go, done = threading.Event(), threading.Event()

    def decide() -> None:
        seen.append(facts.view().grant("alice", "app1", "ds-a"))
        facts.view().remember("key", "answer")
        done.set()
        go.wait(10)
        seen.append(facts.recall("key"))
        seen.append(facts.view().grant("alice", "app1", "ds-a"))

    worker = threading.Thread(target=decide)
    worker.start()
    assert done.wait(10)
    store.revoke_grant("alice", "app1", "ds-a")
    go.set()
    worker.join(10)
    assert seen == [Access.READ, None, None]
