"""Asking policyd whether a connector may serve data sources over the link.

Every question is the same Decision API call: `Check(token=<the connector's access
token>, action=ActionRequest("connector.attach", data_sources), door="link")`, asked when
a connector attaches, before every forwarded request (for that request's data source) and
every `recheck_seconds` while a link lives. policyd audits each decision. Any error,
timeout or unexpected answer is a deny (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import grpc
import grpc.aio

from adapters.asgi.channel import ChannelSettings, open_channel
from policyd.gen.v1 import decision_pb2

log = logging.getLogger("adapters.link")

ACTION = "connector.attach"
DOOR = "link"
CHECK_METHOD = "/policyd.v1.Decision/Check"
# The reason of a deny that policyd did not give: it could not be asked.
UNAVAILABLE = "POLICYD_UNAVAILABLE"
_Check = grpc.aio.UnaryUnaryMultiCallable[decision_pb2.CheckRequest, decision_pb2.CheckResponse]


@dataclass(frozen=True, slots=True)
class Verdict:
    """policyd's answer about one connector and some data sources."""

    allowed: bool
    # A reason name (policyd's Reason enum), or UNAVAILABLE.
    reason: str
    # The connector (the token's client_id) once the token verified.
    connector_id: str = ""
    message: str = ""


class Authorizer(Protocol):
    """Decides whether the holder of `token` may serve `data_sources` over the link."""

    async def check(
        self, token: str, data_sources: Sequence[str], request_id: str = ""
    ) -> Verdict: ...

    async def close(self) -> None: ...


class GrpcAuthorizer:
    """The real Authorizer: policyd's Decision API over a grpc.aio channel (plaintext, TLS
    or mutual TLS, adapters/asgi/channel.py), each call with a deadline."""

    def __init__(self, settings: ChannelSettings, timeout_seconds: float = 1.0) -> None:
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be above 0, not {timeout_seconds}")
        settings.validate()
        self.settings = settings
        self.timeout_seconds = timeout_seconds
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check: _Check | None = None

    def _callable(self) -> _Check:
        loop = asyncio.get_running_loop()
        if self._check is None or self._loop is not loop:
            self._channel = open_channel(self.settings)
            self._loop = loop
            self._check = cast(
                _Check,
                self._channel.unary_unary(
                    CHECK_METHOD,
                    request_serializer=decision_pb2.CheckRequest.SerializeToString,
                    response_deserializer=decision_pb2.CheckResponse.FromString,
                ),
            )
        return self._check

    async def check(self, token: str, data_sources: Sequence[str], request_id: str = "") -> Verdict:
        request = decision_pb2.CheckRequest(
            token=token,
            request_id=request_id,
            action=decision_pb2.ActionRequest(action=ACTION, data_sources=list(data_sources)),
            door=DOOR,
        )
        try:
            response = await self._callable()(request, timeout=self.timeout_seconds)
        except Exception as exc:  # deadline, transport, anything: deny
            log.warning("link: cannot ask policyd (%s): deny", type(exc).__name__)
            return Verdict(False, UNAVAILABLE, message="policyd could not be asked")
        try:
            reason = decision_pb2.Reason.Name(response.reason)
        except ValueError:  # a code newer than these stubs: still a decision
            reason = f"REASON_{response.reason}"
        if response.allowed and not response.principal.client_id:
            return Verdict(False, UNAVAILABLE, message="policyd allowed no connector")
        return Verdict(
            bool(response.allowed), reason, response.principal.client_id, response.message
        )

    async def close(self) -> None:
        channel, self._channel, self._check, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close(None)
