"""Small files that must appear whole: keys made on first use by whichever process is first."""

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
