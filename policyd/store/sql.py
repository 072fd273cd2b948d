"""What store code uses of a database connection, whichever the backend (base.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    """What Store code uses of a DB-API cursor (sqlite3's and psycopg's alike)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection as Store code uses it: `execute(sql with ? placeholders, args)`."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...
