"""Times and intervals in hub requests.

A time is an ISO 8601 string (`2026-01-01T00:00:00Z`; without a zone it is UTC), a number
of seconds since the Unix epoch, `*` (now), or now plus or minus a duration (`*-1h`,
`*-90s`, `*+5m`). A duration is a positive number of seconds or a number with one unit:
`ms`, `s`, `m`, `h`, `d` (`10s`, `1.5h`). Times go out as ISO 8601 UTC with a `Z`.
"""

from __future__ import annotations

import datetime
import math
import re

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*")
_RELATIVE = re.compile(r"\s*\*\s*(?:([+-])(.+))?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Years 1970..9999: anything else is a typo, and datetime cannot format it anyway.
_LATEST = 253402300799.0


class TimeError(ValueError):
    """A time or duration in a request that cannot be read."""


def parse_duration(value: object, what: str = "duration") -> float:
    """Seconds, from a positive number or a string like `10s`."""
    if isinstance(value, bool):
        raise TimeError(f"{what} must be a number of seconds or a string like '10s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise TimeError(f"{what} {value[:40]!r} is not a duration like '10s', '5m', '1h'")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise TimeError(f"{what} must be a number of seconds or a string like '10s'")
    if not (math.isfinite(seconds) and seconds > 0):
        raise TimeError(f"{what} must be above 0")
    return seconds


def parse_time(value: object, now: float, what: str = "time") -> float:
    """Seconds since the epoch, from any of the accepted forms."""
    if isinstance(value, bool):
        raise TimeError(f"{what} must be an ISO 8601 string, a number or '*'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value, now, what)
    else:
        raise TimeError(f"{what} must be an ISO 8601 string, a number or '*'")
    if not (math.isfinite(seconds) and 0 <= seconds <= _LATEST):
        raise TimeError(f"{what} is out of range")
    return seconds


def _parse_text(value: str, now: float, what: str) -> float:
    m = _RELATIVE.fullmatch(value)
    if m:
        if m.group(1) is None:
            return now
        offset = parse_duration(m.group(2), what)
        return now + offset if m.group(1) == "+" else now - offset
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise TimeError(f"{what} {value[:40]!r} is not ISO 8601, a number or '*-1h'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def format_time(seconds: float) -> str:
    """ISO 8601 UTC with a Z; milliseconds only when the time has them."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")
