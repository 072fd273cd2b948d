"""The CPU list of `server.cpu_affinity` ("auto", "none", "1", "0,2", "0-3").

Parsed here, below the config that validates it and the serving code that pins by it
(policyd/serve/affinity.py).
"""

from __future__ import annotations

from policyd.core.errors import ConfigError

KEY = "server.cpu_affinity"
MAX_CPUS = 4096  # Linux's own default limit (CONFIG_NR_CPUS)


def parse(setting: str) -> list[int] | None:
    """The CPUs named by the setting (None: "none" or "auto"); ConfigError when malformed."""
    text = setting.strip().lower()
    if text in ("auto", "none"):
        return None
    cpus: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise ConfigError(
                f'{KEY} must be "auto", "none" or a CPU list such as "0,2" or "0-3",'
                f" not {setting!r}"
            ) from None
        if first < 0 or last < first or last >= MAX_CPUS:
            raise ConfigError(f"{KEY}: {part.strip()!r} is not a CPU or an ascending range")
        cpus.extend(range(first, last + 1))
    return list(dict.fromkeys(cpus))  # each once, in the order given
