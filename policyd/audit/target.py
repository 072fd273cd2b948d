"""Which audit index: `IndexTarget` names the SQLite file or a PostgreSQL database (and this
replica's node) and opens it for writing (index.Index) or reading (reader.Reader). It is
what the server, the indexer process and the commands are given (serve/indexer.py makes
it from the configuration)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from policyd.audit.index import Index, SqliteIndex
from policyd.audit.reader import AuditReader, Reader
from policyd.audit.records import journal_dir
from policyd.core.urls import is_postgres, redact


@dataclass(frozen=True, slots=True)
class IndexTarget:
    """Which index: the SQLite file at `path` (url ""), or the PostgreSQL database at `url`
    with this replica's chain named `node`. Opens it for writing or reading."""

    path: Path
    url: str = ""
    node: str = ""
    sync: str = "normal"

    @property
    def postgres(self) -> bool:
        return is_postgres(self.url)

    @property
    def journals(self) -> Path:
        """The folder of this log's journals: beside the SQLite file; on PostgreSQL, a
        folder of this node's own in it, so that replicas sharing a host (and audit.path)
        each index exactly the journals they wrote, into their own chain."""
        folder = journal_dir(self.path)
        if self.postgres:
            return folder / re.sub(r"[^A-Za-z0-9._-]", "_", self.node or "node")
        return folder

    def writer(self) -> Index:
        """Open for indexing (PolicydError naming what is wrong when it cannot be)."""
        if self.postgres:
            from policyd.audit.pg import PgIndex  # psycopg only where it is used

            return PgIndex(self.url, self.node)
        return SqliteIndex(self.path, self.sync)

    def reader(self, key: bytes | None = None) -> Reader:
        """Open for reading; `key` is what verify needs."""
        if self.postgres:
            from policyd.audit.pg import PgIndex

            return PgIndex(self.url, self.node, key=key)
        return AuditReader(self.path, key)

    def describe(self) -> str:
        """For messages: the file, or the database URL without its password."""
        if self.postgres:
            return redact(self.url)
        return str(self.path)
