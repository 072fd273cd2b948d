"""The gRPC door of the Decision API: protobuf in, engine, protobuf out. Nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import grpc
from google.protobuf.message import Message

from policyd.core import tracing
from policyd.core.ids import ID_LENGTH
from policyd.core.metrics import door_label
from policyd.core.model import ActionTarget, CheckInput, Decision, HttpTarget, small_key
from policyd.core.policy import Policy
from policyd.core.reasons import Reason
from policyd.decision.decider import Decider, Door
from policyd.gen.v1 import decision_pb2, decision_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = decision_pb2.DESCRIPTOR.services_by_name["Decision"].full_name


def to_input(
    request: decision_pb2.CheckRequest,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> CheckInput:
    """The CheckInput of a request; `request_id` and `headers` when they have been taken
    out of it (DecisionServicer.Check)."""
    which = request.WhichOneof("target")
    target: HttpTarget | ActionTarget | None
    if which == "http":
        h = request.http
        if headers is None:
            headers = dict(h.headers) if h.headers else {}
        target = HttpTarget(h.method, h.path, h.query, headers, h.body)
    elif which == "action":
        a = request.action
        target = ActionTarget(a.action, tuple(a.data_sources))
    else:
        target = None
    if request_id is None:
        request_id = request.request_id
    return CheckInput(request.token, target, request_id, request.door or "grpc")


def to_response(decision: Decision) -> decision_pb2.CheckResponse:
    response = decision_pb2.CheckResponse(
        allowed=decision.allowed,
        reason=decision.reason.value,  # type: ignore[arg-type]
        message=decision.message,
        rule_id=decision.rule_id,
        action=decision.action,
        data_sources=decision.data_sources,
        decision_id=decision.decision_id,
        policy_version=decision.policy_version,
    )
    p = decision.principal
    if p is not None:
        response.principal.sub = p.sub
        response.principal.client_id = p.client_id
        response.principal.scopes.extend(p.scopes)
        response.principal.jti = p.jti
    return response


def _key(request: decision_pb2.CheckRequest, policy: Policy) -> Hashable:
    """What a request stands for (Engine.decide_keyed), its request id already cleared: its
    bytes with map entries in a fixed order (model.small_key), without the headers when no
    condition of the policy can read them."""
    if request.http.headers and not policy.reads_headers:
        copy = decision_pb2.CheckRequest()
        copy.CopyFrom(request)
        copy.http.ClearField("headers")
        request = copy
    data = request.SerializeToString(deterministic=True)
    return small_key(data, len(data), "grpc-blake2b", lambda: data)


# The encoding of CheckResponse.decision_id's tag (field number, wire type 2: a string) and
# length, before the id: ids.ID_LENGTH characters. One byte each, for field
# numbers below 16.
_ID_NUMBER = decision_pb2.CheckResponse.DESCRIPTOR.fields_by_name["decision_id"].number
if not 0 < _ID_NUMBER < 16:
    raise ImportError("CheckResponse.decision_id needs a field number below 16")
_ID_HEAD = bytes((_ID_NUMBER << 3 | 2, ID_LENGTH))


def render(decision: Decision) -> decision_pb2.CheckResponse:
    """The response to a decision; an INTERNAL_ERROR deny with its id when the decision
    cannot be put in one (text protobuf cannot encode): never an error."""
    try:
        return to_response(decision)
    except Exception:
        log.exception(
            "decision %s could not be encoded",
            decision.decision_id,
            extra={"decision_id": decision.decision_id},
        )
        return decision_pb2.CheckResponse(
            allowed=False,
            reason=Reason.INTERNAL_ERROR.value,  # type: ignore[arg-type]
            message="internal error",
            decision_id=decision.decision_id,
        )


class _Remembered(Door[bytes, decision_pb2.CheckResponse | bytes]):
    """A remembered allow's response without its decision id, encoded once, then the tag
    and length of a decision id: a field appended to a message's encoding sets it (and
    decision_id is unset in the remembered one)."""

    def form(self, decision: Decision) -> bytes | None:
        try:
            return to_response(decision).SerializeToString() + _ID_HEAD
        except Exception:
            return None  # each repeat rendered in full: an INTERNAL_ERROR deny (render)

    def render_form(self, form: bytes, decision_id: str) -> decision_pb2.CheckResponse | bytes:
        return form + decision_id.encode()


class DecisionServicer(decision_pb2_grpc.DecisionServicer):
    """Check: a response message, or (a remembered allow) its encoded bytes, which
    add_unary's serializer passes through."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._door = _Remembered()

    def Check(
        self, request: decision_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> decision_pb2.CheckResponse | bytes:
        started = time.perf_counter_ns()
        request_id = request.request_id
        request.request_id = ""  # not part of what the request stands for
        decider = self.decider
        policy = decider.engine.policy
        return decider.answer(
            self._door,
            render,
            _key(request, policy),
            policy,
            request_id,
            lambda: to_input(request, request_id),
            started,
            label=door_label(request.door),
            traceparent=_traceparent(context) if tracing.current is not None else "",
        )


def _traceparent(context: grpc.ServicerContext) -> str:
    """The W3C trace context a caller sent in the call's metadata ("" = none)."""
    for key, value in context.invocation_metadata():
        if key == "traceparent":
            return str(value)
    return ""


def _serialize(response: Message | bytes) -> bytes:
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


def add_unary(
    server: grpc.Server,
    service: str,
    method: str,
    handler: Callable[[Any, grpc.ServicerContext], Message | bytes],
    request_type: type[Message],
) -> None:
    """Serve one unary method with `handler` (as the generated add_*_to_server functions
    do), with a response serializer that passes responses already encoded through."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=request_type.FromString,
            response_serializer=_serialize,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
