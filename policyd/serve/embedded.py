"""policyd's engine inside another process (a Python hub): decisions without the gRPC hop.

`Embedded` is what `policyd serve` is to a serving process, minus the port: the same
engine, policy files, store and exact caches (wiring.build_decider, serving: on PostgreSQL
a replica with its lease, whose acknowledgement a revoking write waits for), the same
audit promise and the same hot reload. What it runs beside the host:

* **its own audit journal**: the host process appends each record to a journal file of
  its own in `<audit.path>.journal/` (journals are per process: audit/journal.py), before
  the answer, as a server process does;
* **an indexer child** (serve/indexer.IndexerProcess, `policyd audit index --follow`),
  restarted when it exits, stopped last at `stop()`: what `policyd serve` does for its
  workers. Every indexer indexes every journal of the folder, and several on one log are
  safe (docs/audit.md), so the journal of a host killed with -9 is indexed by any indexer
  still running on that folder (another host's, a server's), or by the next start;
* **the policy watcher thread** (policy/reload.Reloading), without SIGHUP: signals are
  the host's (uvicorn's); its status file is `policy-status-embedded-<pid>.json`.

Thread-safe: `answer` decides in any thread (a host's pool), `recalled` is the part that
reads no store row (a remembered allow: the caches' data_version check and one journal
copy), which an event loop may run inline (adapters/embedded/).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

from policyd.config import Config, load_config
from policyd.core import metrics, tracing
from policyd.core.model import CheckInput, Decision, http_memo_key
from policyd.core.policy import Policy
from policyd.decision.decider import Decider, Door
from policyd.decision.wiring import build_decider
from policyd.policy.reload import Reloading
from policyd.serve.indexer import IndexerProcess

log = logging.getLogger("policyd.embedded")

F = TypeVar("F")
R = TypeVar("R")

# The door's name in audit records and metrics (core/metrics.DOORS).
DOOR = "embedded"
# How often the upkeep thread looks after the indexer child.
UPKEEP_SECONDS = 0.5


class Embedded:
    """The engine, audit log, indexer child and policy watcher of one host process.

    `start()` and `stop()` block (indexing journals left by ended processes, starting
    the indexer, a first lease on PostgreSQL): a host calls them off its event loop."""

    def __init__(self, config: Config | str | Path | None = None) -> None:
        """`config`: a Config, or the path of policyd's TOML file (None: $POLICYD_CONFIG,
        else ./policyd.toml; environment overrides apply as for `policyd`)."""
        if isinstance(config, Config):
            self.config, self.config_path = config, None
        else:
            self.config = load_config(config)
            self.config_path = str(config) if config is not None else None
        self._decider: Decider | None = None
        self._indexer: IndexerProcess | None = None
        self._reloading: Reloading | None = None
        self._stopping = threading.Event()
        self._upkeep: threading.Thread | None = None

    @property
    def decider(self) -> Decider:
        if self._decider is None:
            raise RuntimeError("the embedded policyd is not started")
        return self._decider

    @property
    def sync_full(self) -> bool:
        """Whether a record's append waits for the disk (audit.sync = "full": an msync)."""
        return self.config.audit.enabled and self.config.audit.sync == "full"

    def start(self) -> None:
        if self._decider is not None:
            return
        self._stopping = threading.Event()  # (a new one: it may have been stopped before)
        config = self.config
        # Journals that ended processes left are indexed before the first answer, as
        # `policyd serve` does; then the indexer follows this process's journal and theirs.
        cpus = os.sched_getaffinity(0)
        self._indexer = IndexerProcess.start_for(config, self.config_path, cpus)
        decider: Decider | None = None
        try:
            decider = build_decider(config, serving=True)
            if decider.audit is not None:
                decider.audit.start()  # the indexer child indexes; watch that it keeps up
            self._reloading = Reloading(decider.engine, config, name=f"{DOOR}-{os.getpid()}")
            self._reloading.start()
        except BaseException:
            # Nothing of a failed start stays behind (a replica's lease would hold every
            # revoking write up to its lease; a retried start would add another).
            if self._reloading is not None:
                self._reloading.stop()
                self._reloading = None
            if decider is not None:
                _close(decider)
            if self._indexer is not None:
                self._indexer.stop()
            raise
        self._decider = decider
        self._upkeep = threading.Thread(target=self._keep, name="policyd-upkeep", daemon=True)
        self._upkeep.start()
        log.info(
            "policyd embedded in pid %d: policy %s, store %s",
            os.getpid(),
            decider.engine.policy.version,
            config.store.url or config.store.path,
        )

    def _keep(self) -> None:
        while not self._stopping.wait(UPKEEP_SECONDS):
            if self._indexer is not None:
                try:
                    self._indexer.keep_running()
                except Exception:  # tried again at the next tick (say, fork failed: EAGAIN)
                    log.exception("the audit indexer could not be restarted")

    def stop(self) -> None:
        """Stop watching, close the journal (unlocking it), then stop the indexer, whose
        last pass indexes it to its end."""
        self._stopping.set()
        if self._upkeep is not None:
            self._upkeep.join(timeout=5)
        if self._reloading is not None:
            self._reloading.stop()
        decider, self._decider = self._decider, None
        if decider is not None and decider.audit is not None:
            decider.audit.close()
        if self._indexer is not None:
            self._indexer.stop()
        metrics.flush()
        tracing.shutdown()
        if decider is not None:
            replica = getattr(decider.engine.facts, "replica", None)
            if replica is not None:  # its lease goes now, not at exit
                replica.stop()
            decider.engine.facts.store.close()

    # -- deciding ---------------------------------------------------------------------

    def key(self, check: CheckInput) -> tuple[Hashable, Policy]:
        """The request's key under the policy deciding now (read once, here)."""
        policy = self.decider.engine.policy
        return check.memo_key(policy.reads_headers), policy

    def key_http(
        self,
        token: str,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[Hashable, Policy]:
        """`key` of the HTTP request these make (at this door), without building it."""
        policy = self.decider.engine.policy
        key = http_memo_key(DOOR, token, method, path, query, headers, body, policy.reads_headers)
        return key, policy

    def recalled(
        self,
        door: Door[F, R],
        render: Callable[[Decision], R],
        request_id: str,
        key: Hashable,
        policy: Policy,
        started_ns: int,
        traceparent: str = "",
        batch: object = None,
    ) -> R | None:
        """A remembered allow's answer (recorded), or None: then `answer` in a thread.
        For the thread that never decides (the event loop): after a store commit it
        confirms its caches with one read of the generation row (Facts.recall)."""
        return self.decider.recalled(
            door,
            render,
            key,
            policy,
            request_id,
            started_ns,
            label=DOOR,
            traceparent=traceparent,
            confirm=True,
            batch=batch,
        )

    def answer(
        self,
        door: Door[F, R],
        render: Callable[[Decision], R],
        check: CheckInput,
        key: Hashable,
        policy: Policy,
        started_ns: int,
        traceparent: str = "",
    ) -> R:
        """Decide (or recall), record, answer: may read the store, so not on a loop."""
        return self.decider.answer(
            door,
            render,
            key,
            policy,
            check.request_id,
            lambda: check,
            started_ns,
            label=DOOR,
            traceparent=traceparent,
        )


def _close(decider: Decider) -> None:
    """Undo build_decider: the audit journal, the replica (PostgreSQL), the store."""
    if decider.audit is not None:
        decider.audit.close()
    replica = getattr(decider.engine.facts, "replica", None)
    if replica is not None:
        replica.stop()
    decider.engine.facts.store.close()
