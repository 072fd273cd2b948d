"""Decision ids: 26-character ULIDs, sortable by time (48-bit ms clock + 80 random bits)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


def new_id(now_ms: int | None = None) -> str:
    """Return a new ULID string; ids made in a later millisecond sort after earlier ones."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def id_time_ms(ulid: str) -> int:
    """The millisecond timestamp inside a ULID made by new_id."""
    value = 0
    for ch in ulid[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
