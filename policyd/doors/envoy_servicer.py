"""Envoy's ext_authz v3 door: `envoy.service.auth.v3.Authorization/Check`.

Three small steps, nothing else: Envoy's `attributes.request.http` becomes a CheckInput
(the bearer token from the `authorization` header, RFC 6750; the path split from its
query; the body when Envoy sends one), the Decider decides and records it (door "envoy"),
and the decision becomes a CheckResponse:

* allow: an OkHttpResponse that sets the identity headers the hub reads (`x-policyd-sub`,
  `-client-id`, `-scopes`, `-data-sources` (a JSON array), `-decision-id`, `-rule-id`,
  `-action`; see docs/hub.md) and removes every `x-policyd-*` and `x-auth-*` header the
  client sent, so none can be spoofed; optionally it also removes `authorization`.
* deny: a DeniedHttpResponse with the status, `WWW-Authenticate` challenge and JSON body of
  policyd/doors/denials.py, the same answers the ASGI door gives.

It runs on the same gRPC server as the Decision API (policyd.server adds it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from policyd.core import tracing
from policyd.core.ids import ID_LENGTH
from policyd.core.model import CheckInput, Decision, HttpTarget
from policyd.decision.decider import Decider, Door
from policyd.doors.denials import for_reason
from policyd.doors.headers import IDENTITY_PREFIXES, selected
from policyd.doors.rfc6750 import token_from

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def bearer_token(headers: Mapping[str, str]) -> str:
    """The RFC 6750 bearer token of the `authorization` header, or "" (any other scheme)."""
    return token_from(headers.get("authorization", ""))


def to_input(request: external_auth_pb2.CheckRequest) -> CheckInput:
    http = request.attributes.request.http
    headers = http.headers
    path, _, query = http.path.partition("?")
    body = http.raw_body or http.body.encode()
    return CheckInput(
        bearer_token(headers),
        HttpTarget(http.method, path, query, selected(headers), body),
        headers.get("x-request-id", "") or http.id,
        "envoy",
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def identity_headers(decision: Decision) -> list[tuple[str, str]]:
    """The headers an allowed request carries to the hub (docs/hub.md), for both doors."""
    p = decision.principal
    values = [
        ("x-policyd-decision-id", decision.decision_id),
        ("x-policyd-rule-id", decision.rule_id),
        ("x-policyd-action", decision.action),
        ("x-policyd-data-sources", json.dumps(list(decision.data_sources))),
    ]
    if p is not None:
        values += [
            ("x-policyd-sub", p.sub),
            ("x-policyd-client-id", p.client_id),
            ("x-policyd-scopes", " ".join(p.scopes)),
        ]
    return values


def allow(
    decision: Decision, sent: Mapping[str, str], remove_authorization: bool
) -> external_auth_pb2.CheckResponse:
    values = identity_headers(decision)
    # Filled in place: building each HeaderValueOption apart and copying it in costs about
    # three times as much (bench/envoy.py measures `allow`).
    response = external_auth_pb2.CheckResponse()
    response.status.code = code_pb2.OK
    ok = response.ok_response
    for key, value in values:
        option = ok.headers.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _OVERWRITE
    ours = {key for key, _ in values}
    ok.headers_to_remove.extend(
        name for name in sent if name.startswith(IDENTITY_PREFIXES) and name not in ours
    )
    if remove_authorization:
        ok.headers_to_remove.append("authorization")
    return response


def deny(decision: Decision) -> external_auth_pb2.CheckResponse:
    denial = for_reason(decision.reason, decision.message, decision.decision_id)
    headers = [_header(k.decode(), v.decode()) for k, v in denial.headers()]
    code = code_pb2.UNAUTHENTICATED if denial.status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=denial.reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=denial.status),
            headers=headers,
            body=denial.body().decode(),
        ),
    )


# Where a remembered allow's encoded answer is split for its decision id: as long as one,
# so the lengths in the encoding stay right, and no identity value holds it.
_ID_MARK = "\0" * ID_LENGTH


class _Remembered(Door[tuple[bytes, bytes], external_auth_pb2.CheckResponse | bytes]):
    """A remembered allow's CheckResponse, encoded once and split where its decision id
    goes (the value of `x-policyd-decision-id`)."""

    def __init__(self, remove_authorization: bool) -> None:
        super().__init__()
        self.remove_authorization = remove_authorization

    def form(self, decision: Decision) -> tuple[bytes, bytes] | None:
        marked = decision._replace(decision_id=_ID_MARK)
        try:
            data = allow(marked, {}, self.remove_authorization).SerializeToString()
        except Exception:
            return None  # each repeat rendered in full
        parts = data.split(_ID_MARK.encode())
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def render_form(
        self, form: tuple[bytes, bytes], decision_id: str
    ) -> external_auth_pb2.CheckResponse | bytes:
        return form[0] + decision_id.encode() + form[1]  # every id is ID_LENGTH long


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Check: a response message, or (a remembered allow) its encoded bytes, which
    policyd.doors.service.add_unary's serializer passes through."""

    def __init__(self, decider: Decider, *, remove_authorization: bool = False) -> None:
        self.decider = decider
        self.remove_authorization = remove_authorization
        self._door = _Remembered(remove_authorization)

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse | bytes:
        started = time.perf_counter_ns()
        check = to_input(request)
        sent = request.attributes.request.http.headers
        remove_authorization = self.remove_authorization

        def render(decision: Decision) -> external_auth_pb2.CheckResponse:
            if decision.allowed:
                return allow(decision, sent, remove_authorization)
            return deny(decision)

        # A client that sent identity headers of its own gets an answer naming them for
        # removal: not the remembered one.
        return self.decider.answer_input(
            self._door,
            render,
            check,
            started,
            remembered=not any(name.startswith(IDENTITY_PREFIXES) for name in sent),
            label="envoy",
            traceparent=_traceparent(context, sent) if tracing.current is not None else "",
        )


def _traceparent(context: grpc.ServicerContext, sent: Mapping[str, str]) -> str:
    """The trace context of a check: Envoy's own span's (gRPC metadata, when Envoy traces),
    else the one the client sent with the request (Envoy passes it on as a header)."""
    for key, value in context.invocation_metadata():
        if key == "traceparent":
            return str(value)
    return sent.get("traceparent", "")
