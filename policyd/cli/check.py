"""`policyd check`: ask for one decision (of the server, or --local in this process)."""

from __future__ import annotations

import json
import sys

import click
import grpc

from policyd.cli.client import decision_stub, open_channel
from policyd.cli.context import Context, json_option, pass_ctx
from policyd.cli.options import (
    read_token,
    request_target,
    request_target_options,
    require_one_target,
)
from policyd.config import Config
from policyd.core.errors import PolicydError
from policyd.core.model import ActionTarget, CheckInput, Decision, HttpTarget, Principal
from policyd.core.reasons import Reason
from policyd.decision.wiring import build_decider
from policyd.gen.v1 import decision_pb2

EXIT_DENY = 3


@click.command()
@click.option("--token", default="", help="The access token, '-' for stdin, @FILE for a file.")
@request_target_options
@click.option("--request-id", default="")
@click.option("--local", is_flag=True, help="Decide in this process instead of asking the server.")
@click.option("--server", "address", help="HOST:PORT of the server (default: client.address).")
@json_option
@pass_ctx
def check(
    obj: Context,
    token: str,
    method: str,
    path: str | None,
    query: str,
    body: str | None,
    action: str | None,
    data_sources: tuple[str, ...],
    request_id: str,
    local: bool,
    address: str | None,
    as_json: bool,
) -> None:
    """Ask for one decision and print it. Exit 0 on allow, 3 on deny."""
    require_one_target(path, action)
    if data_sources and not action:
        raise click.UsageError("--data-source goes with --action")
    raw_token = read_token(token) if token in ("-",) or token.startswith("@") else token
    target = request_target(method, path, query, body, action, data_sources)
    request = CheckInput(raw_token, target, request_id, "cli")
    if local:
        decider = build_decider(obj.config, obj.store)
        try:
            decision = decider.check(request)
        finally:
            if decider.audit is not None:
                decider.audit.close()  # its journal indexed and removed
    else:
        decision = _remote_check(obj.config, address or obj.config.client_address, request)
    _print_decision(decision, as_json)
    if not decision.allowed:
        sys.exit(EXIT_DENY)


def _remote_check(config: Config, address: str, request: CheckInput) -> Decision:
    message = decision_pb2.CheckRequest(
        token=request.token, request_id=request.request_id, door=request.door
    )
    target = request.target
    if isinstance(target, HttpTarget):
        message.http.method = target.method
        message.http.path = target.path
        message.http.query = target.query
        message.http.body = target.body
    elif isinstance(target, ActionTarget):
        message.action.action = target.action
        message.action.data_sources.extend(target.data_sources)
    with open_channel(address, config.client) as channel:
        try:
            r = decision_stub(channel).Check(message, timeout=config.client.timeout_seconds)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code else "UNKNOWN"
            raise PolicydError(f"cannot reach policyd at {address}: {name}") from None
    principal = None
    if r.HasField("principal"):
        p = r.principal
        principal = Principal(p.sub, p.client_id, tuple(p.scopes), p.jti)
    return Decision(
        r.allowed,
        Reason(r.reason),
        r.message,
        r.decision_id,
        principal,
        r.rule_id,
        r.action,
        tuple(r.data_sources),
        r.policy_version,
    )


def _print_decision(d: Decision, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "allowed": d.allowed,
                    "reason": d.reason.name,
                    "message": d.message,
                    "decision_id": d.decision_id,
                    "rule_id": d.rule_id,
                    "action": d.action,
                    "data_sources": list(d.data_sources),
                    "policy_version": d.policy_version,
                    "principal": None
                    if d.principal is None
                    else {
                        "sub": d.principal.sub,
                        "client_id": d.principal.client_id,
                        "scopes": list(d.principal.scopes),
                        "jti": d.principal.jti,
                    },
                },
                sort_keys=True,
            )
        )
        return
    verdict = "allow" if d.allowed else "deny"
    click.echo(f"{verdict} {d.reason.name}: {d.message}")
    details = [
        ("rule", d.rule_id),
        ("action", d.action),
        ("data sources", ", ".join(d.data_sources)),
    ]
    if d.principal is not None:
        details += [
            ("user", d.principal.sub),
            ("app", d.principal.client_id),
            ("scopes", " ".join(d.principal.scopes)),
        ]
    details += [("policy", d.policy_version), ("decision", d.decision_id)]
    for label, value in details:
        if value:
            click.echo(f"  {label + ':':14}{value}")
