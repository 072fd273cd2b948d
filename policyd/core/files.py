"""Files policyd makes itself: keys made on first use by whichever process is first, and
the empty, private files SQLite is then given to open."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def create_whole(path: Path, data: bytes) -> bool:
    """Make `path` (mode 0600) holding `data`; False when it exists already.

    Written under a temporary name, then linked into place: a process that finds the file
    (another one starting at the same moment) never reads it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def create_private(path: Path) -> None:
    """Make `path` an empty file of mode 0600 unless it exists (SQLite would make it 0644).

    O_EXCL: a file that exists is never opened here, not even to be closed at once. It may
    be a database another process (or this one) has open, and on POSIX closing any
    descriptor of a file drops every lock the process holds on it, SQLite's own included."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
