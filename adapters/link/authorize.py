"""Asking policyd whether a connector may serve data sources over the link.

Every question is the same Decision API call: `Check(token=<the connector's access
token>, action=ActionRequest("connector.attach", data_sources), door="link")`, asked when
a connector attaches, before every forwarded request (for that request's data source) and
every `recheck_seconds` while a link lives. policyd audits each decision. Any error,
timeout or unexpected answer is a deny (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
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
        # One channel per event loop (a grpc.aio channel belongs to the loop it was made
        # in): a closed loop's is closed when another loop asks, all by close().
        self._channels: dict[asyncio.AbstractEventLoop, tuple[grpc.aio.Channel, _Check]] = {}

    async def _callable(self) -> _Check:
        loop = asyncio.get_running_loop()
        found = self._channels.get(loop)
        if found is None:
            await self._close_orphans()
            found = self._channels.get(loop)  # another caller may have opened it meanwhile
        if found is None:
            channel = open_channel(self.settings)
            check = cast(
                _Check,
                channel.unary_unary(
                    CHECK_METHOD,
                    request_serializer=decision_pb2.CheckRequest.SerializeToString,
                    response_deserializer=decision_pb2.CheckResponse.FromString,
                ),
            )
            found = self._channels[loop] = (channel, check)
        return found[1]

    async def _close_orphans(self) -> None:
        """Close the channels of loops that are closed (used once, from a loop since gone):
        without a grace period closing one awaits nothing of its own loop."""
        for loop in [loop for loop in self._channels if loop.is_closed()]:
            channel, _ = self._channels.pop(loop)
            with contextlib.suppress(Exception):  # its sockets go with it all the same
                await channel.close(None)

    async def check(self, token: str, data_sources: Sequence[str], request_id: str = "") -> Verdict:
        request = decision_pb2.CheckRequest(
            token=token,
            request_id=request_id,
            action=decision_pb2.ActionRequest(action=ACTION, data_sources=list(data_sources)),
            door=DOOR,
        )
        try:
            response = await (await self._callable())(request, timeout=self.timeout_seconds)
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
        """Close every channel: this loop's and closed loops' here, another running loop's
        in that loop."""
        await self._close_orphans()
        here = asyncio.get_running_loop()
        channels, self._channels = self._channels, {}
        for loop, (channel, _) in channels.items():
            if loop is here:
                await channel.close(None)
            else:  # in its own loop; waited for briefly, a stopping loop may never run it
                done = asyncio.run_coroutine_threadsafe(channel.close(None), loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(done), 1.0)
