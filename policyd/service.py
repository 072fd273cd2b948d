"""The gRPC door of the Decision API: protobuf in, engine, protobuf out. Nothing else."""

from __future__ import annotations

import hashlib
import logging
import time

import grpc

from policyd.decider import Decider
from policyd.gen.v1 import decision_pb2, decision_pb2_grpc
from policyd.model import ActionTarget, CheckInput, Decision, HttpTarget
from policyd.policy import Policy
from policyd.reasons import Reason

log = logging.getLogger(__name__)

_GRPC = "grpc-response"  # Remembered.extras key of the response, decision id unset

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


class DecisionServicer(decision_pb2_grpc.DecisionServicer):
    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def Check(
        self, request: decision_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> decision_pb2.CheckResponse:
        started = time.perf_counter_ns()
        request_id = request.request_id
        headers: dict[str, str] | None = None  # set when taken out of the request

        def key(policy: Policy) -> bytes:
            # The request stands for itself (Engine.decide_keyed): its bytes without the
            # request id, map entries in a fixed order, and without the headers when no
            # condition of the policy can read them.
            nonlocal headers
            request.request_id = ""
            if not policy.reads_headers and request.http.headers:
                headers = dict(request.http.headers)
                request.http.ClearField("headers")
            # A digest: a remembered decision's key is 32 bytes, whatever the body's size.
            return hashlib.blake2b(
                request.SerializeToString(deterministic=True), digest_size=32
            ).digest()

        decision, entry = self.decider.check_keyed(
            key, request_id, lambda: to_input(request, request_id, headers), started
        )
        try:
            if entry is None:
                return to_response(decision)
            prototype = entry.extras.get(_GRPC)
            if prototype is None:
                prototype = entry.extras[_GRPC] = to_response(entry.decision)
            response = decision_pb2.CheckResponse()
            response.CopyFrom(prototype)
            response.decision_id = decision.decision_id
            return response
        except Exception:  # e.g. text protobuf cannot encode: still a deny, never an error
            log.exception("decision %s could not be encoded", decision.decision_id)
            return decision_pb2.CheckResponse(
                allowed=False,
                reason=Reason.INTERNAL_ERROR.value,  # type: ignore[arg-type]
                message="internal error",
                decision_id=decision.decision_id,
            )
