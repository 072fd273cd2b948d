"""The reference hub: the data API of the default policy over demo data sources.

Routes are exactly those of policyd's built-in rules (docs/hub.md describes each). Every
handler takes the caller's identity and data sources from `scope["auth"]`, which the
PolicydMiddleware (or, behind Envoy, gateway.py) set; as a second line of defence a handler
refuses any data source that is not in the decision.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.asgi import AuthInfo, PolicydMiddleware
from adapters.asgi.middleware import ASGIApp, Message, Receive, Scope, Send
from adapters.asgi.stall import LoopStall, collector
from adapters.embedded import EmbeddedPolicyd
from examples.hub.catalogue import Catalogue, DataSource, Tag
from examples.hub.gateway import TrustedGatewayHeaders
from examples.hub.link import HubLink, LinkForward
from examples.hub.series import MAX_POINTS, Point, QueryError, Sample, Series
from examples.hub.settings import HubSettings
from examples.hub.storage import AlreadyRefunded, HubStore, InsufficientFunds, UnknownTransaction
from examples.hub.times import TimeError, format_time, parse_duration, parse_time

VERSION = "0.1.0"
MAX_TAGS = 100
MAX_TIMES = 1000
MAX_WRITES = 10_000
MAX_AMOUNT_CENTS = 1_000_000_00


class HubError(Exception):
    """An answer other than 200: status, a stable error code and a message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _bad(message: str) -> HubError:
    return HubError(400, "invalid_request", message)


def _point(ts: float, value: float | None) -> dict[str, Any]:
    return {"timestamp": format_time(ts), "value": value}


def _int_param(value: Any, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _bad(f"{name} must be an integer") from None
    if isinstance(value, bool | float) or not low <= number <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}")
    return number


@dataclass(frozen=True)
class Hub:
    settings: HubSettings
    catalogue: Catalogue
    store: HubStore

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def auth(request: Request) -> AuthInfo:
        auth = request.scope.get("auth")
        if not isinstance(auth, AuthInfo):
            raise HubError(401, "unauthenticated", "no authorization decision for this request")
        return auth

    def data_source(self, auth: AuthInfo, name: str) -> DataSource:
        """The data source, if the decision covers it and the hub has it."""
        if name not in auth.data_sources:
            raise HubError(403, "forbidden", f"data source {name[:80]!r} is not in the decision")
        found = self.catalogue.get(name)
        if found is None:
            raise HubError(404, "not_found", f"no data source {name[:80]!r} on this hub")
        return found

    @staticmethod
    def tag(ds: DataSource, name: Any) -> Tag:
        if not isinstance(name, str):
            raise _bad("tag names must be strings")
        found = ds.tags.get(name)
        if found is None:
            raise HubError(404, "not_found", f"no tag {name[:80]!r} in {ds.name}")
        return found

    @staticmethod
    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise _bad("body must be JSON") from None
        if not isinstance(doc, dict):
            raise _bad("body must be a JSON object")
        return doc

    def requested_tags(self, auth: AuthInfo, doc: dict[str, Any]) -> list[Tag]:
        """The tags of a {"tags": {"<data source>": ["<tag>", ...]}} body."""
        spec = doc.get("tags")
        if not isinstance(spec, dict) or not spec:
            raise _bad('body needs "tags": {"<data source>": ["<tag>", ...]}')
        tags: list[Tag] = []
        for ds_name, names in spec.items():
            ds = self.data_source(auth, ds_name)
            if not isinstance(names, list) or not names:
                raise _bad(f"tags of {ds_name[:80]!r} must be a non-empty list of tag names")
            tags.extend(self.tag(ds, name) for name in names)
        if len(tags) > MAX_TAGS:
            raise _bad(f"at most {MAX_TAGS} tags per request")
        return tags

    @staticmethod
    def time_range(doc: dict[str, Any], now: float) -> tuple[float, float]:
        start = parse_time(doc.get("start", "*-1h"), now, "start")
        end = parse_time(doc.get("end", "*"), now, "end")
        if end < start:
            raise _bad("end is before start")
        return start, end

    async def tag_query(
        self, request: Request, query: Callable[[Series, dict[str, Any]], Sequence[Point]]
    ) -> JSONResponse:
        """Run query for every requested tag; answer {ds: {tag: {units, values}}}."""
        auth = self.auth(request)
        doc = await self.body(request)
        tags = self.requested_tags(auth, doc)
        now = time.time()

        def run() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for tag in tags:
                points = query(Series(tag, self.store, now), doc)
                out.setdefault(tag.data_source, {})[tag.name] = {
                    "units": tag.units,
                    "values": [_point(t, v) for t, v in points],
                }
            return out

        return JSONResponse(await run_in_threadpool(run))

    # -- routes -------------------------------------------------------------------------

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {
                "name": "policyd reference hub",
                "version": VERSION,
                "gateway": self.settings.gateway,
                "time": format_time(round(time.time(), 3)),
            }
        )

    async def user_me(self, request: Request) -> Response:
        auth = self.auth(request)
        return JSONResponse(
            {
                "sub": auth.sub,
                "name": self.settings.users.get(auth.sub, auth.sub),
                "client_id": auth.client_id,
                "scopes": list(auth.scopes),
            }
        )

    async def datasources_list(self, request: Request) -> Response:
        granted = set(self.auth(request).data_sources)
        listed = [
            ds.describe() for ds in self.catalogue.data_sources.values() if ds.name in granted
        ]
        return JSONResponse({"data_sources": listed})

    async def datasources_get(self, request: Request) -> Response:
        ds = self.data_source(self.auth(request), request.path_params["dsn"])
        return JSONResponse(ds.describe())

    async def tags_search(self, request: Request) -> Response:
        ds = self.data_source(self.auth(request), request.path_params["dsn"])
        q = request.query_params
        pattern = q.get("name", "*").lower()
        page = _int_param(q.get("page"), "page", 1, 1, 1_000_000)
        size = _int_param(q.get("page_size"), "page_size", 100, 1, 1000)
        found = [t for t in ds.tags.values() if fnmatch.fnmatchcase(t.name.lower(), pattern)]
        return JSONResponse(
            {
                "data_source": ds.name,
                "total": len(found),
                "page": page,
                "page_size": size,
                "tags": [t.describe() for t in found[(page - 1) * size : page * size]],
            }
        )

    async def tags_get(self, request: Request) -> Response:
        ds = self.data_source(self.auth(request), request.path_params["dsn"])
        tag = self.tag(ds, request.path_params["tag"])
        return JSONResponse({"data_source": ds.name, **tag.describe()})

    async def snapshot(self, request: Request) -> Response:
        return await self.tag_query(request, lambda s, _doc: [s.snapshot()])

    async def raw(self, request: Request) -> Response:
        def query(s: Series, doc: dict[str, Any]) -> list[Sample]:
            start, end = self.time_range(doc, s.now)
            return s.raw(start, end, _int_param(doc.get("points"), "points", 1000, 1, MAX_POINTS))

        return await self.tag_query(request, query)

    async def plot(self, request: Request) -> Response:
        def query(s: Series, doc: dict[str, Any]) -> list[Sample]:
            start, end = self.time_range(doc, s.now)
            if end == start:
                raise _bad("end must be after start")
            return s.plot(start, end, _int_param(doc.get("intervals"), "intervals", 100, 1, 1000))

        return await self.tag_query(request, query)

    async def processed(self, request: Request) -> Response:
        def query(s: Series, doc: dict[str, Any]) -> list[Point]:
            start, end = self.time_range(doc, s.now)
            default = (end - start) / 100 or 1.0
            interval = parse_duration(doc.get("interval", default), "interval")
            function = doc.get("function", "interp")
            if not isinstance(function, str):
                raise _bad("function must be a string")
            return s.processed(start, end, interval, function)

        return await self.tag_query(request, query)

    async def values_at_times(self, request: Request) -> Response:
        def query(s: Series, doc: dict[str, Any]) -> list[Point]:
            times = doc.get("times")
            if not isinstance(times, list) or not 1 <= len(times) <= MAX_TIMES:
                raise _bad(f'body needs "times": a list of 1 to {MAX_TIMES} times')
            return s.at_times(parse_time(t, s.now, "times[]") for t in times)

        return await self.tag_query(request, query)

    async def write_snapshot(self, request: Request) -> Response:
        auth = self.auth(request)
        ds = self.data_source(auth, request.path_params["dsn"])
        doc = await self.body(request)
        now = round(time.time(), 3)
        at = parse_time(doc["timestamp"], now, "timestamp") if "timestamp" in doc else now
        values = doc.get("values")
        if not isinstance(values, dict) or not values:
            raise _bad('body needs "values": {"<tag>": <number>, ...}')
        rows = [(ds.name, self.tag(ds, name).name, at, _number(v)) for name, v in values.items()]
        written = await run_in_threadpool(self.store.write_values, rows)
        return JSONResponse(
            {"data_source": ds.name, "written": written, "timestamp": format_time(at)}
        )

    async def write_history(self, request: Request) -> Response:
        auth = self.auth(request)
        ds = self.data_source(auth, request.path_params["dsn"])
        doc = await self.body(request)
        now = time.time()
        values = doc.get("values")
        if not isinstance(values, dict) or not values:
            raise _bad('body needs "values": {"<tag>": [{"timestamp": ..., "value": ...}]}')
        rows: list[tuple[str, str, float, float]] = []
        for name, points in values.items():
            tag = self.tag(ds, name)
            if not isinstance(points, list) or not points:
                raise _bad(f"values of {name[:80]!r} must be a non-empty list")
            for p in points:
                if not isinstance(p, dict) or "timestamp" not in p or "value" not in p:
                    raise _bad('each value must be {"timestamp": ..., "value": <number>}')
                rows.append(
                    (ds.name, tag.name, parse_time(p["timestamp"], now), _number(p["value"]))
                )
        if len(rows) > MAX_WRITES:
            raise _bad(f"at most {MAX_WRITES} values per request")
        written = await run_in_threadpool(self.store.write_values, rows)
        return JSONResponse({"data_source": ds.name, "written": written})

    async def debit(self, request: Request) -> Response:
        auth = self.auth(request)
        doc = await self.body(request)
        cents = _cents(doc.get("amount"))
        description = doc.get("description", "")
        if not isinstance(description, str) or len(description) > 200:
            raise _bad("description must be a string of at most 200 characters")
        try:
            tx = await run_in_threadpool(
                self.store.debit, auth.sub, auth.client_id, cents, description
            )
        except InsufficientFunds:
            raise HubError(402, "insufficient_funds", "the account balance is too low") from None
        return JSONResponse(
            {"transaction_id": tx.id, "amount": cents / 100, "balance": tx.balance_cents / 100}
        )

    async def refund(self, request: Request) -> Response:
        auth = self.auth(request)
        doc = await self.body(request)
        debit_id = doc.get("transaction_id")
        if not isinstance(debit_id, str) or not debit_id:
            raise _bad('body needs "transaction_id" of a debit')
        try:
            tx = await run_in_threadpool(self.store.refund, auth.sub, auth.client_id, debit_id)
        except UnknownTransaction:
            raise HubError(404, "not_found", "no such debit for this user") from None
        except AlreadyRefunded:
            raise HubError(409, "already_refunded", "that debit was refunded already") from None
        return JSONResponse(
            {
                "transaction_id": tx.id,
                "refunded": tx.amount_cents / 100,
                "balance": tx.balance_cents / 100,
            }
        )

    def routes(self) -> list[Route]:
        return [
            Route("/api/info", self.info, methods=["GET"]),
            Route("/api/user/me", self.user_me, methods=["GET"]),
            Route("/api/data/datasources", self.datasources_list, methods=["GET"]),
            Route("/api/data/datasources/{dsn}", self.datasources_get, methods=["GET"]),
            Route("/api/data/tags/{dsn}", self.tags_search, methods=["GET"]),
            Route("/api/data/tags/{dsn}/{tag}", self.tags_get, methods=["GET"]),
            Route("/api/data/v2/snapshot", self.snapshot, methods=["POST"]),
            Route("/api/data/v2/raw", self.raw, methods=["POST"]),
            Route("/api/data/v2/plot", self.plot, methods=["POST"]),
            Route("/api/data/v2/processed", self.processed, methods=["POST"]),
            Route("/api/data/v2/values-at-times", self.values_at_times, methods=["POST"]),
            Route("/api/data/v2/snapshot/{dsn}", self.write_snapshot, methods=["PUT"]),
            Route("/api/data/v2/history/{dsn}", self.write_history, methods=["PUT"]),
            Route("/api/account/debit", self.debit, methods=["POST"]),
            Route("/api/account/refund", self.refund, methods=["POST"]),
        ]


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad("values must be finite numbers")
    return float(value)


def _cents(amount: Any) -> int:
    value = _number(amount)
    cents = round(value * 100)
    if abs(value * 100 - cents) > 1e-6 or not 0 < cents <= MAX_AMOUNT_CENTS:
        raise _bad(f"amount must be above 0, at most {MAX_AMOUNT_CENTS // 100}, in cents")
    return cents


async def _hub_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HubError):
        status, error, message = exc.status, exc.error, exc.message
    else:  # TimeError, QueryError: the request asked for something the hub will not do
        status, error, message = 400, "invalid_request", str(exc)
    return JSONResponse({"error": error, "message": message}, status_code=status)


class DecisionIdHeader:
    """Names the decision behind every answer of the app: `x-policyd-decision-id`, the
    id of its audit record (denials carry it in their body already)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = scope.get("auth") if scope["type"] == "http" else None
        if not isinstance(auth, AuthInfo):
            await self.app(scope, receive, send)
            return
        header = (b"x-policyd-decision-id", auth.decision_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_starlette(
    settings: HubSettings, probe: LoopStall | None = None, link: HubLink | None = None
) -> Starlette:
    """The hub's own app, with no protection: wrap it (create_app does). `probe`: the
    loop-stall probe, `link`: the link's listener, both run while the app runs (lifespan)."""
    hub = Hub(settings, Catalogue(settings.data_sources), HubStore(settings.data_dir / "hub.db"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if probe is not None:
            probe.start()
        if link is not None:
            await link.start()
        try:
            yield
        finally:
            if link is not None:
                await link.stop()
            if probe is not None:
                probe.stop()

    return Starlette(
        routes=hub.routes(),
        exception_handlers={HubError: _hub_error, TimeError: _hub_error, QueryError: _hub_error},
        lifespan=lifespan,
    )


def loop_probe(settings: HubSettings) -> LoopStall | None:
    """The loop-stall probe the settings ask for (POLICYD_HUB_LOOP_PROBE_MS), read on the
    metrics port when there is one (__main__.serve_metrics: the default registry)."""
    if not settings.loop_probe_ms:
        return None
    probe = LoopStall(settings.loop_probe_ms / 1000)
    if settings.metrics_address:
        from prometheus_client import REGISTRY

        REGISTRY.register(collector(probe))
    return probe


def create_app(
    settings: HubSettings | None = None,
    probe: LoopStall | None = None,
) -> ASGIApp:
    """The hub as it runs: behind the PolicydMiddleware (asking policyd, or deciding in
    this process), or trusting its gateway's headers."""
    settings = settings or HubSettings.from_env()
    probe = probe or loop_probe(settings)
    link = HubLink(settings) if settings.link_address else None
    app: ASGIApp = create_starlette(settings, probe, link)
    if link is not None:  # data sources the hub does not hold go down the link
        app = LinkForward(app, link.hub, frozenset(settings.data_sources), settings.max_body_bytes)
    app = DecisionIdHeader(app)
    if settings.gateway == "envoy":
        return TrustedGatewayHeaders(app)
    embedded = None
    if settings.mode == "embedded":
        embedded = EmbeddedPolicyd(
            settings.policyd_config or None, threads=settings.policyd_threads
        )
    return PolicydMiddleware(
        app,
        settings.policyd_address,
        timeout_seconds=settings.timeout_seconds,
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
        server_name=settings.server_name,
        max_body_bytes=settings.max_body_bytes,
        metrics=bool(settings.metrics_address),  # served by __main__.serve_metrics
        embedded=embedded,
    )
