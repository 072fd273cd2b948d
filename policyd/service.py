"""The gRPC door of the Decision API: protobuf in, engine, protobuf out. Nothing else."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Hashable

import grpc

from policyd.decider import Decider
from policyd.engine import Remembered
from policyd.gen.v1 import decision_pb2, decision_pb2_grpc
from policyd.model import ActionTarget, CheckInput, Decision, HttpTarget
from policyd.policy import Policy
from policyd.reasons import Reason

log = logging.getLogger(__name__)

# Remembered.extras key of the encoded response (decision id unset) and the id's tag and length
_GRPC = "grpc-response"
# Requests up to this size are their own remembered-decision key; larger ones, a digest.
MAX_RAW_KEY = 1024

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
    bytes with map entries in a fixed order, without the headers when no condition of the
    policy can read them. Up to MAX_RAW_KEY bytes they are the key itself (a dict compares
    keys whole); a larger request is keyed by a digest, so a remembered decision's key
    stays small whatever the body's size."""
    if request.http.headers and not policy.reads_headers:
        copy = decision_pb2.CheckRequest()
        copy.CopyFrom(request)
        copy.http.ClearField("headers")
        request = copy
    data = request.SerializeToString(deterministic=True)
    if len(data) <= MAX_RAW_KEY:
        return data
    return ("grpc-blake2b", hashlib.blake2b(data, digest_size=32).digest())


# The encoding of CheckResponse.decision_id's tag (field number, wire type 2: a string) and
# length, before the id: a UUID of 36 characters (ids.new_id). One byte each, for field
# numbers below 16.
_ID_NUMBER = decision_pb2.CheckResponse.DESCRIPTOR.fields_by_name["decision_id"].number
if not 0 < _ID_NUMBER < 16:
    raise ImportError("CheckResponse.decision_id needs a field number below 16")
ID_LENGTH = 36
_ID_HEAD = bytes((_ID_NUMBER << 3 | 2, ID_LENGTH))


class DecisionServicer(decision_pb2_grpc.DecisionServicer):
    """Check: a response message, or (a remembered allow) its encoded bytes, which
    add_to_server's serializer passes through."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def Check(
        self, request: decision_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> decision_pb2.CheckResponse | bytes:
        started = time.perf_counter_ns()
        request_id = request.request_id
        request.request_id = ""  # not part of what the request stands for

        decider = self.decider
        policy = decider.engine.policy
        hit = decider.recall(_key(request, policy), policy, request_id, started)
        decision: Decision | None = None
        entry: Remembered | None = None
        if hit is None:  # not remembered: decide
            decision, _ = decider.check_keyed(
                lambda policy: _key(request, policy),
                request_id,
                lambda: to_input(request, request_id),
                started,
            )
        elif isinstance(hit, Decision):  # remembered, but its record could not be written
            decision = hit
        else:
            decision_id, entry = hit
        if decision is not None:
            decision_id = decision.decision_id
        try:
            if entry is None:
                assert decision is not None
                return to_response(decision)
            # The remembered response without its decision id, encoded once, then the tag
            # and length of a decision id: a field appended to a message's encoding sets
            # it (and decision_id is unset in the remembered one).
            head: bytes | None = entry.extras.get(_GRPC)
            if head is None:
                head = entry.extras[_GRPC] = (
                    to_response(entry.decision).SerializeToString() + _ID_HEAD
                )
            return head + decision_id.encode()
        except Exception:  # e.g. text protobuf cannot encode: still a deny, never an error
            log.exception("decision %s could not be encoded", decision_id)
            return decision_pb2.CheckResponse(
                allowed=False,
                reason=Reason.INTERNAL_ERROR.value,  # type: ignore[arg-type]
                message="internal error",
                decision_id=decision_id,
            )


def _serialize(response: decision_pb2.CheckResponse | bytes) -> bytes:
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


Check = Callable[
    [decision_pb2.CheckRequest, grpc.ServicerContext], decision_pb2.CheckResponse | bytes
]


def add_to_server(check: Check, server: grpc.Server) -> None:
    """Serve the Decision API's Check with `check` (as the generated
    add_DecisionServicer_to_server does, with a response serializer that passes responses
    already encoded through)."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=decision_pb2.CheckRequest.FromString,
            response_serializer=_serialize,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
