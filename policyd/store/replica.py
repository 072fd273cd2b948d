"""A replica's half of exact revocation on PostgreSQL: its lease, and what it has applied.

Every process that answers decisions from caches on the PostgreSQL store runs one
`Replica` thread, on a connection of its own that LISTENs on `policyd_generation`:

- **Register**: a row in `policyd_replicas` (`<node>/<pid>`), then a renewal.
- **Renew**, every quarter of `store.lease_seconds`: in one transaction that holds the
  writers' advisory lock shared (so no write commits halfway through it), read the
  generation, drop every cache older than it (`on_generation`), and set the lease to run
  out `lease_seconds` from the database's clock together with `acked_generation` = that
  generation. Only after the commit is the replica's own deadline moved, to
  `lease_seconds` minus a margin after the moment it *started* the renewal: the replica
  always gives its lease up before the database does.
- **Apply**: each notification carries a new generation; the caches older than it are
  dropped, then `acked_generation` is raised to it.

A decision uses caches only while `fresh()`: the thread holds a working listening
connection and the deadline has not passed. A replica that cannot renew (the database is
down, the connection broke, the process was stopped) lets its deadline pass and answers
STORE_UNAVAILABLE until a renewal catches it up again; nothing is assumed about what it
missed while deaf, since a renewal reads the generation afresh after LISTEN is back.

The writer's half is PostgresStore.await_replicas: a write that moved the generation returns
once every replica whose lease is live has acknowledged it. A replica that acknowledged has
no older cache; one whose lease ran out on the database's clock ran out earlier on its own.
So no replica allows, after the revoking write returned, what the write revoked.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg

from policyd.core.urls import problem as url_problem
from policyd.core.urls import redact
from policyd.store.pg_migrations import CHANNEL, WRITE_LOCK
from policyd.store.postgres import CONNECT_TIMEOUT_SECONDS

log = logging.getLogger("policyd.store")

# The handler sees every notification (those that arrive during a query too); notifies()
# only serves as the wait, and what it yields is handled again, harmlessly (a maximum).
warnings.filterwarnings(
    "ignore",
    message=r"using 'notifies\(\)' together with notifies handlers",
    category=RuntimeWarning,
)

# The replica gives its lease up this much before the database would (clock-rate drift
# between the hosts, and the time from its renewal's start to the database's clock read).
LEASE_MARGIN_SECONDS = 0.1


def clock() -> float:
    """Seconds that keep counting while the process is stopped (SIGSTOP) or the host
    suspended: the lease's clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Replica:
    """One serving process's lease and listening connection (a daemon thread)."""

    # The replicas of this process that have started and not stopped.
    running: ClassVar[set[Replica]] = set()

    def __init__(
        self,
        url: str,
        node: str,
        lease_seconds: float,
        on_generation: Callable[[int], None],
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.node = node
        self.replica_id = f"{node}/{os.getpid()}"
        # Its listening connection, as pg_stat_activity shows it (PostgreSQL keeps 63 bytes).
        self.application_name = f"policyd-replica {self.replica_id}"[:63]
        self.lease_seconds = lease_seconds
        self.renew_every = lease_seconds / 4
        self._on_generation = on_generation
        # The moment (clock()) until which the caches may answer; 0 = they may not.
        self._until = 0.0
        self.applied = -1  # the newest generation applied
        self._pending = -1  # the newest generation notified, not yet applied
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policyd-replica", daemon=True)
        self.problem = ""  # why the replica is not fresh, for the log and status

    def start(self) -> None:
        Replica.running.add(self)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the first renewal succeeded (True) or `timeout` passed."""
        return self._ready.wait(timeout)

    def fresh(self) -> bool:
        """May decisions answer from this process's caches now?"""
        return clock() < self._until

    def stop(self) -> None:
        """Stop, and give the lease back so that no writer waits for this process."""
        if self._stop.is_set():
            return
        self._stop.set()
        Replica.running.discard(self)
        self._until = 0.0
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease_seconds + CONNECT_TIMEOUT_SECONDS)
        try:
            with psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
            ) as conn:
                conn.execute(
                    "DELETE FROM policyd_replicas WHERE replica_id = %s", (self.replica_id,)
                )
        except psycopg.Error as exc:
            log.warning("replica %s: could not give its lease back: %s", self.replica_id, exc)

    def connect(self) -> psycopg.Connection[Any]:
        """The replica's own connection (for the thread: LISTEN, renewals, acks)."""
        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=self.application_name,
            # A database that stops answering without closing the connection is found
            # out, not waited on forever (the lease lapses meanwhile anyway).
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            options=(
                f"-c statement_timeout={int(self.lease_seconds * 1000)}"
                # Stopped inside a renewal, it would hold the writers' lock (shared) and
                # hold every write up: the server ends its session instead.
                f" -c idle_in_transaction_session_timeout={int(self.renew_every * 1000)}"
            ),
        )

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.05
        while not self._stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self.connect()
                conn.add_notify_handler(self._notified)
                conn.execute(f"LISTEN {CHANNEL}")
                self._register(conn)
                self._renew(conn)
                if self.problem:
                    log.warning("replica %s: caught up with the store again", self.replica_id)
                    self.problem = ""
                self._ready.set()
                pause = 0.05
                self._serve(conn)
            except Exception as exc:  # psycopg's errors, and never let the thread die
                self._until = 0.0  # deaf: no answer from the caches until caught up
                problem = url_problem(self.url, exc)
                if problem != self.problem:
                    log.error(
                        "replica %s: lost the store %s (%s): answering STORE_UNAVAILABLE"
                        " until it is back",
                        self.replica_id,
                        self.where,
                        problem,
                    )
                self.problem = problem
            finally:
                if conn is not None:
                    conn.close()
            self._stop.wait(pause)
            pause = min(pause * 2, 1.0)

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        next_renewal = clock() + self.renew_every
        while not self._stop.is_set():
            wait = next_renewal - clock()
            if wait > 0 and self._pending <= self.applied:
                # Returns on a notification (handled by _notified) or the timeout.
                for _ in conn.notifies(timeout=min(wait, 0.25), stop_after=1):
                    break
            if self._pending > self.applied:
                self._apply(conn, self._pending)
            if clock() >= next_renewal:
                next_renewal = clock() + self.renew_every
                self._renew(conn)

    def _notified(self, notify: psycopg.Notify) -> None:
        try:
            generation = int(notify.payload)
        except ValueError:
            return
        if generation > self._pending:
            self._pending = generation

    def _register(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "INSERT INTO policyd_replicas (replica_id, node, host, pid, lease_expires_at,"
            " acked_generation) VALUES (%s, %s, %s, %s, clock_timestamp(), -1)"
            " ON CONFLICT (replica_id) DO NOTHING",
            (self.replica_id, self.node, socket.gethostname(), os.getpid()),
        )
        # Rows of processes long gone (their leases ran out an hour ago).
        conn.execute(
            "DELETE FROM policyd_replicas"
            " WHERE lease_expires_at < clock_timestamp() - interval '1 hour'"
        )

    def _renew(self, conn: psycopg.Connection[Any]) -> None:
        started = clock()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WRITE_LOCK,))
            row = conn.execute("SELECT value FROM generation WHERE id = 1").fetchone()
            if row is None:
                raise psycopg.DataError("the store has no generation row")
            generation = int(row[0])
            self._apply_locally(generation)
            cur = conn.execute(
                "UPDATE policyd_replicas SET renewed_at = clock_timestamp(),"
                " lease_expires_at = clock_timestamp() + make_interval(secs => %s),"
                " acked_generation = GREATEST(acked_generation, %s) WHERE replica_id = %s",
                (self.lease_seconds, generation, self.replica_id),
            )
            if cur.rowcount == 0:  # removed meanwhile (policyd cluster forget): back in
                conn.execute(
                    "INSERT INTO policyd_replicas (replica_id, node, host, pid,"
                    " lease_expires_at, acked_generation) VALUES (%s, %s, %s, %s,"
                    " clock_timestamp() + make_interval(secs => %s), %s)",
                    (
                        self.replica_id,
                        self.node,
                        socket.gethostname(),
                        os.getpid(),
                        self.lease_seconds,
                        generation,
                    ),
                )
        self._until = started + self.lease_seconds - LEASE_MARGIN_SECONDS

    def _apply(self, conn: psycopg.Connection[Any], generation: int) -> None:
        self._apply_locally(generation)
        conn.execute(
            "UPDATE policyd_replicas SET acked_generation = GREATEST(acked_generation, %s)"
            " WHERE replica_id = %s",
            (generation, self.replica_id),
        )

    def _apply_locally(self, generation: int) -> None:
        if generation > self.applied:
            self._on_generation(generation)
            self.applied = generation
