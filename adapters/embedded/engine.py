"""EmbeddedPolicyd: policyd's decisions in the host's process, for asyncio hosts.

What runs where (docs/asgi.md, "Embedded mode"):

* on the event loop, inline: the request's key and a remembered allow (the exact caches'
  "has anything committed?" check, asked once per loop iteration: `_Batch`; no row read;
  and one copy into the audit journal's mapping: no system call), which is most requests
  of a busy hub;
* in a small thread pool (`threads`): everything else, which may read the store (a SQLite
  read, a PostgreSQL round trip) or wait for it, so that the loop never waits on the
  database; and, with `audit.sync = "full"`, every request (an msync is a disk write);
* in threads of policyd's own: the audit journal's watch, the policy watcher, a
  PostgreSQL replica's lease; in a child process: the audit indexer
  (policyd/serve/embedded.py).

Answers are what the remote middleware makes of policyd's: an `AuthInfo` for an allow,
else the `Denial` of policyd/doors/denials.py, with the same reason codes and decision ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from adapters.asgi.middleware import Answer, AuthInfo
from policyd.config import Config
from policyd.core.model import CheckInput, Decision, HttpTarget
from policyd.core.reasons import Reason
from policyd.decision.decider import Door
from policyd.doors.denials import for_reason
from policyd.serve.embedded import DOOR, Embedded

# The largest body whose request key a caller's `memo` keeps (check_http): a client that
# polls sends the same small body again and again (the middleware keeps up to
# ASKED_REQUESTS memos: at most 4 MiB of bodies).
MEMO_BODY_BYTES = 4096


def auth_of(decision: Decision, decision_id: str | None = None) -> AuthInfo:
    """The AuthInfo of an allow, as AuthInfo.from_response makes it of policyd's answer."""
    p = decision.principal
    return AuthInfo(
        sub=p.sub if p is not None else "",
        client_id=p.client_id if p is not None else "",
        scopes=tuple(p.scopes) if p is not None else (),
        data_sources=tuple(decision.data_sources),
        decision_id=decision.decision_id if decision_id is None else decision_id,
        rule_id=decision.rule_id,
        action=decision.action,
    )


def render(decision: Decision) -> Answer:
    """Any decision: an allow's AuthInfo, or the deny's answer (denials.py)."""
    if decision.allowed and decision.reason is Reason.ALLOWED:
        return auth_of(decision), None
    return None, for_reason(decision.reason, decision.message, decision.decision_id)


class _AuthDoor(Door[AuthInfo, Answer]):
    """A remembered allow's AuthInfo, made once; a repeat gets a copy with its own id."""

    def form(self, decision: Decision) -> AuthInfo | None:
        return auth_of(decision, "")

    def render_form(self, form: AuthInfo, decision_id: str) -> Answer:
        return (
            AuthInfo(
                form.sub,
                form.client_id,
                form.scopes,
                form.data_sources,
                decision_id,
                form.rule_id,
                form.action,
            ),
            None,
        )


class _Batch:
    """The requests one event-loop iteration decides inline: they share one store check
    (Facts.recall's `batch`; docs/asgi.md, "One store check per loop iteration").

    Only for callers that start each request as a task of its own, created after its bytes
    were read (an ASGI server calling the app: `check_http(per_iteration=True)`, as the
    middleware does). Why that is exact: such a task is queued on the loop after its
    request was read, and the check queues the batch's `end` when it is asked, so a
    request read after the check is queued after `end` and starts a batch of its own: every
    request of a batch had arrived before its check. Checked alone, as the argument does
    not hold for them: a second request of the same task without a pause (an in-process
    client), any request while the loop has a task factory (an eager one runs a task inside
    the callback that read its request) and loops other than asyncio's and uvloop's (whose
    ready queue is first in, first out). A write this process made since the check
    (sqlite.commits) makes the next recall ask again."""

    __slots__ = ("loop", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: int) -> None:
        self.loop = loop
        self.task = task  # id() of the task that last used it (holding no reference)


def _fifo(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop runs its ready callbacks first in, first out (asyncio's, uvloop's)."""
    return isinstance(loop, asyncio.BaseEventLoop) or type(loop).__module__.startswith("uvloop")


class EmbeddedPolicyd:
    """policyd deciding in this process: pass it to PolicydMiddleware(embedded=...), or
    call `check_http` from any asyncio framework (`check_http_sync` from a thread).

    `config`: policyd's TOML file (None: $POLICYD_CONFIG, else ./policyd.toml) or a
    Config. `threads`: the pool that decides what may read the store."""

    def __init__(self, config: Config | str | Path | None = None, *, threads: int = 4) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.embedded = Embedded(config)
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._door = _AuthDoor()
        self._starting: asyncio.Lock | None = None
        self._started = False
        # The audit append waits for the disk (msync): then nothing is decided inline.
        self._inline = not self.embedded.sync_full
        # Requests answered on the event loop (remembered allows) and in the pool: how
        # much of the load the fast path takes (counted by check_http, in the loop only).
        self.answered_inline = 0
        self.answered_in_pool = 0
        # The batch of the loop iteration deciding now (_Batch), if one has begun.
        self._batch: _Batch | None = None

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start it (blocking work in a thread: indexing left journals, the indexer child,
        a PostgreSQL lease). Idempotent; the first request starts it when no lifespan did."""
        if self._started:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._started:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="policyd")
            await asyncio.get_running_loop().run_in_executor(self._pool, self.embedded.start)
            self._started = True

    async def stop(self) -> None:
        """Stop it: the journal is closed and the indexer's last pass indexes it."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        self._started = False
        self._batch = None  # (it holds its loop)
        await asyncio.get_running_loop().run_in_executor(pool, self.embedded.stop)
        pool.shutdown(wait=True)

    def start_sync(self) -> None:
        """start() for a host without an event loop (then use check_http_sync)."""
        self.embedded.start()
        self._started = True

    def stop_sync(self) -> None:
        self._started = False
        self.embedded.stop()

    # -- deciding --------------------------------------------------------------------

    async def check_http(
        self,
        token: str,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        request_id: str = "",
        traceparent: str = "",
        memo: list[Any] | None = None,
        per_iteration: bool = False,
    ) -> Answer:
        """Decide an HTTP request: (AuthInfo, None) on allow, else (None, Denial).

        `path` as received (still percent-encoded), `query` the raw query string,
        `headers` those policyd may read (lower-case names), `body` the JSON body of a
        request whose route reads data sources from it.

        `memo`: a list the caller keeps with these token, method, path, query and headers
        (never changed) for as long as it sends them again: the request's key is kept in
        it with the policy it was made for and the body (up to MEMO_BODY_BYTES), and used
        again for the same body under the same policy.

        `per_iteration`: the caller runs each request in a task of its own, created after
        the request was read (an ASGI server does): then the remembered allows one loop
        iteration answers share one store check (_Batch; docs/asgi.md, "One store check per
        loop iteration"). Not for a task that reads requests in a loop (aiohttp's per
        connection), nor eager tasks."""
        started = time.perf_counter_ns()
        if not self._started:
            await self.start()
        embedded = self.embedded
        fields = headers if type(headers) is dict else dict(headers or {})
        # (policy, body, key), read and replaced whole: a memo shared by threads never
        # pairs one body with another's key.
        kept = memo[0] if memo else None
        if kept is not None and kept[0] is embedded.decider.engine.policy and kept[1] == body:
            policy, key = kept[0], kept[2]
        else:
            key, policy = embedded.key_http(token, method, path, query, fields, body)
            if memo is not None and len(body) <= MEMO_BODY_BYTES:
                memo[:] = [(policy, body, key)]
        door = self._door
        if self._inline:
            # A remembered allow is answered from its key: the request is built only to
            # be decided (in the pool).
            batch = self._batch_now() if per_iteration else None
            answer = embedded.recalled(
                door, render, request_id, key, policy, started, traceparent, batch
            )
            if answer is not None:
                self.answered_inline += 1
                return answer
        check = CheckInput(token, HttpTarget(method, path, query, fields, body), request_id, DOOR)
        self.answered_in_pool += 1
        return await asyncio.get_running_loop().run_in_executor(
            self._pool,
            partial(embedded.answer, door, render, check, key, policy, started, traceparent),
        )

    def _batch_now(self) -> _Batch | None:
        """The batch this request joins (_Batch), or None: it is checked alone."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            return None
        batch = self._batch  # one attribute: read whole, whichever loop's thread wrote it
        if batch is not None and batch.loop is loop:
            if batch.task == id(task):
                return None  # the same task again, without a pause: checked alone
            batch.task = id(task)
            return batch
        if loop.get_task_factory() is not None or not _fifo(loop):
            return None
        batch = self._batch = _Batch(loop, id(task))
        loop.call_soon(self._end_batch, batch)
        return batch

    def _end_batch(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None

    def check_http_sync(
        self,
        token: str,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        request_id: str = "",
        traceparent: str = "",
    ) -> Answer:
        """check_http in the calling thread (a sync framework's worker thread)."""
        started = time.perf_counter_ns()
        check = CheckInput(
            token, HttpTarget(method, path, query, dict(headers or {}), body), request_id, DOOR
        )
        key, policy = self.embedded.key(check)
        return self.embedded.answer(self._door, render, check, key, policy, started, traceparent)
