"""SIGTERM, SIGINT and SIGHUP for the server, its supervisor and the audit indexer child.

A Python signal handler runs in the main thread between two bytecodes, possibly in the
middle of threading code that holds a lock; a handler that then calls Event.set()
deadlocks on that lock (seen: Ctrl-C's SIGINT and a SIGTERM arriving together). So the
handlers only append to lists, and the main thread polls them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType


class Signals:
    """Stop and reload signals, recorded without taking any lock."""

    POLL_SECONDS = 0.1

    def __init__(self) -> None:
        self.stops: list[int] = []
        self.hups: list[int] = []

    def install(self, *, interrupt: bool = True, hup: bool = True) -> None:
        """SIGTERM stops; SIGINT too unless `interrupt` is false (then it is ignored);
        SIGHUP is recorded for `wait` when `hup` (else left as it is)."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop if interrupt else signal.SIG_IGN)
        if hup:
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stops.append(signum)

    def _on_hup(self, signum: int, _frame: FrameType | None) -> None:
        self.hups.append(signum)

    def wait(self, on_hup: Callable[[], None], on_tick: Callable[[], bool] | None = None) -> int:
        """Until a stop signal (its number) or on_tick() is true (0); runs on_hup for SIGHUP."""
        while True:
            while self.hups:
                self.hups.pop()
                on_hup()
            if self.stops:
                return self.stops[0]
            if on_tick is not None and on_tick():
                return 0
            time.sleep(self.POLL_SECONDS)

    def as_stop(self) -> StopOnSignal:
        """These signals as what Indexer.run stops on (journal.Stop)."""
        return StopOnSignal(self)


class StopOnSignal:
    """journal.Stop over Signals: set once a stop signal came."""

    def __init__(self, signals: Signals) -> None:
        self.signals = signals

    def is_set(self) -> bool:
        return bool(self.signals.stops)

    def wait(self, timeout: float) -> bool:
        if not self.signals.stops:
            time.sleep(timeout)
        return self.is_set()
