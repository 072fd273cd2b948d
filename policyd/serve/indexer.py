"""The audit indexer process beside `policyd serve` (`policyd audit index --follow`).

The server starts it, restarts it when it exits and stops it after the servers, so that its
last pass indexes everything they wrote (IndexerProcess). It learns from one environment
variable, INDEXER_ENV = "PID:CPUS", which server started it (it stops once that is no longer
its parent, even if it was gone before the indexer got to look) and the CPUs to run on: those
no serving process is pinned to (affinity.spare). This module is the one place that writes
(IndexerProcess.start) and reads (follow) that variable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

from policyd.audit.journal import Indexer
from policyd.audit.records import load_key
from policyd.config import Config
from policyd.core import metrics
from policyd.core.errors import ConfigError, PolicydError
from policyd.decision.wiring import index_target
from policyd.serve.signals import Signals

# The server's logger: operators filter on it, and these are the server's messages.
log = logging.getLogger("policyd.server")

INDEXER_ENV = "POLICYD_AUDIT_INDEXER"


def open_indexer(config: Config) -> Indexer:
    """The indexer of this replica's journals (PolicydError, one line, if it cannot open)."""
    a = config.audit
    target = index_target(config)
    key = load_key(a.key_file, create=True)
    try:
        return Indexer(a.path, key, a.sync, index=target.writer(), journals=target.journals)
    except sqlite3.Error as exc:
        raise ConfigError(f"audit.path: cannot open {a.path}: {exc}") from None


def follow(indexer: Indexer, config: Config) -> None:
    """Index until SIGTERM (or, started by a server, until that server is gone), applying
    the retention settings (audit.max_age_days, audit.max_bytes)."""
    a = config.audit
    signals = Signals()
    serving = os.environ.get(INDEXER_ENV)
    # Started by `policyd serve`, it stops when the server says so (SIGTERM) or is gone:
    # a Ctrl-C on the server's terminal is the server's to handle.
    signals.install(interrupt=not serving, hup=False)
    if serving:  # counts into the server's metrics folder, when it serves /metrics
        metrics.enable_inherited()
    indexer.run(
        signals.as_stop(),
        retention=(a.max_age_days * 86400 or None, a.max_bytes or None),
        retention_every=a.retention_interval_seconds,
        parent=_join(serving) if serving else None,
    )


def _join(value: str) -> int | None:
    """Run on the CPUs of "PID:CPUS"; the server's pid (None when unreadable)."""
    pid, _, cpus = value.partition(":")
    parent = None
    try:
        parent = int(pid)
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"policyd: warning: {INDEXER_ENV}={value!r}: {exc}\n")
        sys.stderr.flush()
    return parent


class IndexerProcess:
    """`policyd audit index --follow` beside the serving process(es): it moves the audit
    records from their journals into the audit file (audit/journal.py). Restarted if it exits;
    stopped after the servers, so that its last pass indexes everything they wrote."""

    RESTART_SECONDS = 1.0

    def __init__(self, command: list[str], cpus: set[int], node: str = "") -> None:
        self.command = command
        # The server's replica name (it may come from its --address, which the indexer's
        # command line does not carry): the indexer files the records under it.
        self.node = node
        self.process: subprocess.Popen[bytes] | None = None
        self.next_start = 0.0
        # Where the indexer runs, whenever it is (re)started: the CPUs no serving process
        # is pinned to (affinity.spare), so that it never takes a serving core.
        self.cpus = set(cpus)

    @classmethod
    def start_for(
        cls, config: Config, config_path: str | None, cpus: set[int]
    ) -> IndexerProcess | None:
        """Index what journals of ended servers left (before serving), then start one."""
        if not config.audit.enabled:
            return None
        indexer = open_indexer(config)
        try:
            found = indexer.run_once()
        except indexer.errors as exc:
            raise PolicydError(f"cannot index the audit journals: {exc}") from None
        finally:
            indexer.close()
        if found:
            log.warning("indexed %d audit records left in journals by an ended server", found)
        command = [sys.executable, "-m", "policyd"]
        if config_path:
            command += ["--config", config_path]
        process = cls([*command, "audit", "index", "--follow"], cpus, config.node)
        process.start()
        return process

    def start(self) -> None:
        # Its own session: a Ctrl-C or a service manager's signal to the server's process
        # group must not stop it before the server has drained (stop() stops it after).
        cpus = ",".join(map(str, sorted(self.cpus)))
        env = dict(os.environ, **{INDEXER_ENV: f"{os.getpid()}:{cpus}"})  # read by follow()
        if self.node:
            env["POLICYD_CLUSTER_NODE"] = self.node
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        with contextlib.suppress(OSError, ValueError):  # it also does so itself, once started
            os.sched_setaffinity(self.process.pid, self.cpus)
        self.next_start = time.monotonic() + self.RESTART_SECONDS

    def keep_running(self) -> None:
        """(On each Signals tick.) Restart the indexer if it exited."""
        process = self.process
        if (
            process is not None
            and process.poll() is not None
            and time.monotonic() >= self.next_start
        ):
            log.error("the audit indexer exited (%s); restarting it", process.returncode)
            metrics.process_exited(process.pid)  # its backlog and lag gauges go with it
            self.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the audit indexer did not stop in %g s; killing it", timeout)
            self.process.kill()
            self.process.wait()
