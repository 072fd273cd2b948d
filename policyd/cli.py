"""The `policyd` command. Each subcommand opens the core and calls one method; no logic here.

Errors from the core become one line on stderr and a non-zero exit:
  0 success (for `check`: allow), 1 error, 2 bad usage, 3 `check` answered deny,
  4 the policy does not validate (`policy check/test/explain`), 5 policy tests failed.
Listing commands print an aligned table, or with --json one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import grpc
import jwt

from policyd import __version__
from policyd.config import Config, load_config
from policyd.errors import InvalidInput, NotFound, PolicydError
from policyd.model import Access, ActionTarget, CheckInput, Decision, HttpTarget
from policyd.reasons import Reason
from policyd.store import Store

EXIT_DENY = 3
MAX_TOKEN_TTL = 86400  # the longest `tokens issue --ttl`


class Context:
    """Lazily opened core objects for one command."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._store: Store | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    @property
    def store(self) -> Store:
        if self._store is None:
            from policyd.wiring import open_store

            self._store = open_store(self.config)
        return self._store


pass_ctx = click.make_pass_decorator(Context)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Print rows as JSON lines, or as an aligned table of the given columns."""
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _access(_ctx: click.Context, _param: click.Parameter, value: str) -> Access:
    try:
        return Access.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    help="TOML config file (default: $POLICYD_CONFIG, else ./policyd.toml if present).",
)
@click.version_option(__version__, prog_name="policyd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """policyd: authorization decisions for the data hub."""
    ctx.obj = Context(config_path)


# -- serve ------------------------------------------------------------------------------


@cli.command()
@click.option("--address", help="HOST:PORT to listen on (overrides server.address).")
@click.option("--workers", type=click.IntRange(1, 64), help="Processes sharing the port.")
@pass_ctx
def serve(obj: Context, address: str | None, workers: int | None) -> None:
    """Serve the Decision API over gRPC until SIGTERM or Ctrl-C."""
    from policyd.server import serve as run

    config = obj.config
    if address:
        config.server.address = address
    if workers:
        config.server.workers = workers
    config.validate()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(run(config, obj.config_path))


# -- apps -------------------------------------------------------------------------------


@cli.group()
def apps() -> None:
    """Registered apps (OAuth clients)."""


@apps.command("add")
@click.argument("client_id")
@click.option("--name", required=True, help="Name shown on the consent screen.")
@click.option("--redirect-uri", "redirect_uris", multiple=True, help="Repeat for each URI.")
@click.option("--scope", "scopes", multiple=True, required=True, help="Allowed scope; repeat.")
@click.option("--public", is_flag=True, help="A public app (no secret; PKCE only).")
@pass_ctx
def apps_add(
    obj: Context,
    client_id: str,
    name: str,
    redirect_uris: tuple[str, ...],
    scopes: tuple[str, ...],
    public: bool,
) -> None:
    """Register an app. A confidential app's secret is printed once and stored hashed."""
    from policyd.policy import load_policy

    known = load_policy(obj.config.policy.dir).scopes
    unknown = [s for s in scopes if s not in known]
    if unknown:
        raise InvalidInput(
            f"unknown scope(s): {', '.join(unknown)} (the policy defines {', '.join(known)})"
        )
    secret = obj.store.add_app(
        client_id,
        name,
        redirect_uris=list(redirect_uris),
        scopes=list(scopes),
        confidential=not public,
    )
    click.echo(f"registered app {client_id}")
    if secret:
        click.echo(f"client secret (shown once, store it now): {secret}")


@apps.command("list")
@json_option
@pass_ctx
def apps_list(obj: Context, as_json: bool) -> None:
    """List apps."""
    rows = [a.as_dict() for a in obj.store.list_apps()]
    emit(rows, ["client_id", "name", "confidential", "enabled", "allowed_scopes"], as_json)


@apps.command("show")
@click.argument("client_id")
@json_option
@pass_ctx
def apps_show(obj: Context, client_id: str, as_json: bool) -> None:
    """Show one app."""
    app = obj.store.get_app(client_id).as_dict()
    if as_json:
        click.echo(json.dumps(app, sort_keys=True))
        return
    for key, value in app.items():
        shown = _when(value) if key == "created_at" else _cell(value)
        click.echo(f"{key + ':':16}{shown}")


@apps.command("enable")
@click.argument("client_id")
@pass_ctx
def apps_enable(obj: Context, client_id: str) -> None:
    """Enable an app."""
    obj.store.set_app_enabled(client_id, True)
    click.echo(f"enabled app {client_id}")


@apps.command("disable")
@click.argument("client_id")
@pass_ctx
def apps_disable(obj: Context, client_id: str) -> None:
    """Disable an app: its next request is denied (APP_DISABLED)."""
    obj.store.set_app_enabled(client_id, False)
    click.echo(f"disabled app {client_id}")


@apps.command("rotate-secret")
@click.argument("client_id")
@pass_ctx
def apps_rotate_secret(obj: Context, client_id: str) -> None:
    """Replace a confidential app's secret; the old one stops working."""
    secret = obj.store.rotate_secret(client_id)
    click.echo(f"new client secret (shown once, store it now): {secret}")


# -- users ------------------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Users (resource owners)."""


password_stdin_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
password_prompt_option = click.option(
    "--password", "prompt_password", is_flag=True, help="Prompt for the password (not echoed)."
)


def _read_password(from_stdin: bool, prompt: bool) -> str | None:
    """The new password from stdin or a prompt; never from the command line."""
    if from_stdin and prompt:
        raise click.UsageError("give at most one of --password-stdin and --password")
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if prompt:
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    return None


@users.command("add")
@click.argument("user_id")
@click.option("--name", default="", help="Display name.")
@password_stdin_option
@password_prompt_option
@pass_ctx
def users_add(
    obj: Context, user_id: str, name: str, password_stdin: bool, prompt_password: bool
) -> None:
    """Add a user; with a password, they can sign in to the authorization server.

    The password is hashed with argon2id; it is read from stdin or a prompt, never taken
    as an argument (arguments show in the process list and the shell history).
    """
    from policyd.oauth.passwords import hash_password
    from policyd.oauth.storage import OAuthStorage

    password = _read_password(password_stdin, prompt_password)
    hashed = hash_password(password) if password is not None else None
    obj.store.add_user(user_id, name)
    if hashed is not None:
        OAuthStorage(obj.store).set_password_hash(user_id, hashed)
    click.echo(f"added user {user_id}" + (" with a password" if hashed else ""))


@users.command("set-password")
@click.argument("user_id")
@password_stdin_option
@pass_ctx
def users_set_password(obj: Context, user_id: str, password_stdin: bool) -> None:
    """Set (or replace) a user's sign-in password: from stdin, else a prompt."""
    from policyd.oauth.passwords import hash_password
    from policyd.oauth.storage import OAuthStorage

    password = _read_password(password_stdin, not password_stdin)
    assert password is not None
    if not OAuthStorage(obj.store).set_password_hash(user_id, hash_password(password)):
        raise NotFound(f"no user {user_id!r}")
    click.echo(f"set the password of {user_id}")


@users.command("list")
@json_option
@pass_ctx
def users_list(obj: Context, as_json: bool) -> None:
    """List users."""
    emit(obj.store.list_users(), ["user_id", "name"], as_json)


# -- data sources -----------------------------------------------------------------------


@cli.group()
def datasources() -> None:
    """Data sources and users' own access to them."""


@datasources.command("add")
@click.argument("name")
@click.option("--description", default="")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@pass_ctx
def datasources_add(obj: Context, name: str, description: str, labels: tuple[str, ...]) -> None:
    """Add a data source."""
    parsed: dict[str, str] = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label must be KEY=VALUE, not {label!r}")
        parsed[key] = value
    obj.store.add_data_source(name, description, parsed)
    click.echo(f"added data source {name}")


@datasources.command("list")
@json_option
@pass_ctx
def datasources_list(obj: Context, as_json: bool) -> None:
    """List data sources."""
    emit(obj.store.list_data_sources(), ["name", "description", "labels"], as_json)


@datasources.command("give-access")
@click.argument("user_id")
@click.argument("data_source")
@click.option("--role", default="read", callback=_access, help="read or write.")
@pass_ctx
def datasources_give_access(obj: Context, user_id: str, data_source: str, role: Access) -> None:
    """Give a user their own access to a data source."""
    obj.store.set_user_access(user_id, data_source, role)
    click.echo(f"user {user_id} has {role.label} access to {data_source}")


@datasources.command("remove-access")
@click.argument("user_id")
@click.argument("data_source")
@pass_ctx
def datasources_remove_access(obj: Context, user_id: str, data_source: str) -> None:
    """Take a user's own access away; apps acting for the user lose it too."""
    obj.store.remove_user_access(user_id, data_source)
    click.echo(f"removed access of {user_id} to {data_source}")


@datasources.command("access")
@click.option("--user", "user_id")
@json_option
@pass_ctx
def datasources_access(obj: Context, user_id: str | None, as_json: bool) -> None:
    """List users' own access to data sources."""
    emit(obj.store.list_user_access(user_id), ["user_id", "data_source", "role"], as_json)


# -- consents ---------------------------------------------------------------------------


@cli.group()
def consents() -> None:
    """Users' consents to apps (the scopes they approved)."""


@consents.command("add")
@click.argument("user_id")
@click.argument("client_id")
@click.option("--scope", "scopes", multiple=True, required=True, help="Repeatable.")
@pass_ctx
def consents_add(obj: Context, user_id: str, client_id: str, scopes: tuple[str, ...]) -> None:
    """Record a consent (normally written by the consent screen)."""
    obj.store.set_consent(user_id, client_id, list(scopes))
    click.echo(f"user {user_id} consented to {client_id}: {' '.join(scopes)}")


@consents.command("list")
@click.option("--user", "user_id")
@click.option("--app", "client_id")
@json_option
@pass_ctx
def consents_list(obj: Context, user_id: str | None, client_id: str | None, as_json: bool) -> None:
    """List consents."""
    emit(obj.store.list_consents(user_id, client_id), ["user_id", "client_id", "scopes"], as_json)


@consents.command("revoke")
@click.argument("user_id")
@click.argument("client_id")
@pass_ctx
def consents_revoke(obj: Context, user_id: str, client_id: str) -> None:
    """Revoke a consent, the pair's grants and refresh tokens (like Disconnect on the
    Connected apps page); the app's next request is denied."""
    from policyd.oauth.storage import OAuthStorage

    n = obj.store.revoke_consent(user_id, client_id)
    families = OAuthStorage(obj.store).revoke_pair(user_id, client_id)
    click.echo(
        f"revoked consent of {user_id} for {client_id}, {n} grant(s)"
        f" and {families} refresh-token famil{'y' if families == 1 else 'ies'}"
    )


# -- grants -----------------------------------------------------------------------------


@cli.group()
def grants() -> None:
    """Grants: a user's approval of an app on one data source."""


@grants.command("add")
@click.argument("user_id")
@click.argument("client_id")
@click.argument("data_source")
@click.option("--access", default="read", callback=_access, help="read or write.")
@pass_ctx
def grants_add(
    obj: Context, user_id: str, client_id: str, data_source: str, access: Access
) -> None:
    """Grant an app a user's data source (normally written by the consent screen)."""
    obj.store.add_grant(user_id, client_id, data_source, access)
    click.echo(f"granted {data_source} ({access.label}) to {client_id} for {user_id}")


@grants.command("list")
@click.option("--user", "user_id")
@click.option("--app", "client_id")
@click.option("--data-source")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked grants.")
@json_option
@pass_ctx
def grants_list(
    obj: Context,
    user_id: str | None,
    client_id: str | None,
    data_source: str | None,
    include_revoked: bool,
    as_json: bool,
) -> None:
    """List live grants (or all with --all)."""
    rows = [
        g.as_dict()
        for g in obj.store.list_grants(
            user_id, client_id, data_source, include_revoked=include_revoked
        )
    ]
    if not as_json:
        for row in rows:
            row["granted_at"] = _when(row["granted_at"])
            row["revoked_at"] = _when(row["revoked_at"])
    emit(
        rows, ["user_id", "client_id", "data_source", "access", "granted_at", "revoked_at"], as_json
    )


@grants.command("revoke")
@click.argument("user_id")
@click.argument("client_id")
@click.argument("data_source")
@pass_ctx
def grants_revoke(obj: Context, user_id: str, client_id: str, data_source: str) -> None:
    """Revoke a grant; the app's next request for the data source is denied."""
    obj.store.revoke_grant(user_id, client_id, data_source)
    click.echo(f"revoked {data_source} from {client_id} for {user_id}")


# -- keys -------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Token signing keys."""


def _keyring(obj: Context) -> Any:
    from policyd.wiring import keyring

    return keyring(obj.config, obj.store)


@keys.command("list")
@json_option
@pass_ctx
def keys_list(obj: Context, as_json: bool) -> None:
    """List signing keys and their states."""
    rows: list[dict[str, Any]] = [
        {
            "kid": k.kid,
            "alg": k.alg,
            "state": k.state,
            "created_at": k.created_at,
            "retired_at": k.retired_at,
        }
        for k in obj.store.list_signing_keys()
    ]
    if not as_json:
        for row in rows:
            row["created_at"] = _when(row["created_at"])
            row["retired_at"] = _when(row["retired_at"])
    emit(rows, ["kid", "alg", "state", "created_at", "retired_at"], as_json)


@keys.command("rotate")
@click.option(
    "--alg",
    type=click.Choice(["ES256", "RS256", "EdDSA"]),
    default=None,
    help="Algorithm of the new key (default: tokens.algorithm).",
)
@pass_ctx
def keys_rotate(obj: Context, alg: str | None) -> None:
    """Make a new signing key; the old one verifies until retired."""
    kid = _keyring(obj).rotate(alg or obj.config.tokens.algorithm)
    click.echo(f"new active key {kid}")


@keys.command("retire")
@click.argument("kid")
@pass_ctx
def keys_retire(obj: Context, kid: str) -> None:
    """Retire a key: tokens it signed are denied from the next request on."""
    _keyring(obj).retire(kid)
    click.echo(f"retired key {kid}")


@keys.command("jwks")
@pass_ctx
def keys_jwks(obj: Context) -> None:
    """Print the JSON Web Key Set of the keys that verify."""
    click.echo(json.dumps(_keyring(obj).jwks(), indent=2))


# -- tokens -----------------------------------------------------------------------------


@cli.group()
def tokens() -> None:
    """Access tokens (operator tools for demos and tests)."""


@tokens.command("issue")
@click.option("--user", "user_id", required=True)
@click.option("--app", "client_id", required=True)
@click.option("--scope", "scopes", multiple=True, required=True, help="Repeatable.")
@click.option("--ttl", type=click.IntRange(1, MAX_TOKEN_TTL), help="Lifetime in seconds.")
@pass_ctx
def tokens_issue(
    obj: Context, user_id: str, client_id: str, scopes: tuple[str, ...], ttl: int | None
) -> None:
    """Mint an access token for a user, app and scopes; prints the token only."""
    from policyd.tokens import issue_token
    from policyd.wiring import token_settings

    app = obj.store.get_app(client_id)
    extra = [s for s in scopes if s not in app.allowed_scopes]
    if extra:
        raise InvalidInput(f"app {client_id} is not registered for {', '.join(extra)}")
    token, _claims = issue_token(
        _keyring(obj),
        token_settings(obj.config),
        sub=user_id,
        client_id=client_id,
        scopes=list(scopes),
        ttl_seconds=ttl,
    )
    click.echo(token)


@tokens.command("revoke")
@click.argument("token", default="-")
@click.option("--jti", help="Revoke by token id instead of by token.")
@pass_ctx
def tokens_revoke(obj: Context, token: str, jti: str | None) -> None:
    """Revoke one access token (TOKEN, or - to read it from stdin) until it expires."""
    config = obj.config
    # The longest a token can live: `tokens issue --ttl` goes up to MAX_TOKEN_TTL, past the
    # configured ttl. A revocation that ends sooner is purged while the token still works.
    longest = max(config.tokens.ttl_seconds, MAX_TOKEN_TTL) + config.tokens.leeway_seconds
    if jti:
        obj.store.revoke_token(jti, time.time() + longest)
        click.echo(f"revoked token {jti}")
        return
    raw = read_token(token)
    try:
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidInput("not a JWT access token") from None
    if not isinstance(claims.get("jti"), str):
        raise InvalidInput("token has no jti claim")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) else time.time() + longest
    obj.store.revoke_token(claims["jti"], expires_at)
    click.echo(f"revoked token {claims['jti']}")


def request_target(
    method: str,
    path: str | None,
    query: str,
    body: str | None,
    action: str | None,
    data_sources: tuple[str, ...],
) -> HttpTarget | ActionTarget:
    """The target of a command-line decision: --path (and --body, @FILE or text) or --action."""
    if path:
        raw_body = b""
        if body is not None:
            raw_body = Path(body[1:]).read_bytes() if body.startswith("@") else os.fsencode(body)
        return HttpTarget(method.upper(), path, query.lstrip("?"), {}, raw_body)
    assert action is not None
    return ActionTarget(action, data_sources)


def read_token(token: str) -> str:
    if token == "-":
        if sys.stdin.isatty():
            raise InvalidInput("give the token as an argument or on stdin")
        return sys.stdin.read().strip()
    if token.startswith("@"):
        try:
            return Path(token[1:]).read_text().strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"token file {token[1:]} is not text") from None
    return token.strip()


# -- check ------------------------------------------------------------------------------


@cli.command()
@click.option("--token", default="", help="The access token, '-' for stdin, @FILE for a file.")
@click.option("--method", default="GET", show_default=True)
@click.option("--path", help="Request path, e.g. /api/data/tags/edge-historian.")
@click.option("--query", default="", help="Raw query string.")
@click.option("--body", default=None, help="JSON body; @FILE reads a file.")
@click.option("--action", help="An action name instead of --path.")
@click.option("--data-source", "data_sources", multiple=True, help="With --action; repeatable.")
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
    if bool(path) == bool(action):
        raise click.UsageError("give exactly one of --path and --action")
    if data_sources and not action:
        raise click.UsageError("--data-source goes with --action")
    raw_token = read_token(token) if token in ("-",) or token.startswith("@") else token
    target = request_target(method, path, query, body, action, data_sources)
    request = CheckInput(raw_token, target, request_id, "cli")
    if local:
        from policyd.wiring import build_decider

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
    from policyd.client import decision_stub, open_channel
    from policyd.gen.v1 import decision_pb2
    from policyd.model import Principal

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


# -- demo -------------------------------------------------------------------------------


@cli.group()
def demo() -> None:
    """The demo data used by `make run`."""


@demo.command("seed")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default="var/demo-alice.token",
    show_default=True,
    help="Where to write a fresh demo token for alice.",
)
@pass_ctx
def demo_seed(obj: Context, token_file: str) -> None:
    """Create the demo app, users, data sources and grants (idempotent); mint a token."""
    from policyd import demo as demo_data
    from policyd.tokens import issue_token
    from policyd.wiring import token_settings

    ring = _keyring(obj)
    for line in demo_data.seed(obj.store, ring, obj.config.tokens.algorithm):
        click.echo(f"created {line}")
    token, _ = issue_token(
        ring,
        token_settings(obj.config),
        sub="alice",
        client_id=demo_data.DEMO_APP,
        scopes=["UserInfo", "DataRead"],
    )
    path = Path(token_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    click.echo(f"wrote a 1-hour access token for alice (demo-app) to {path}")


# -- entry point ------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Never lets a traceback reach the user."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="policyd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("policyd: aborted", err=True)
        return 1
    except click.ClickException as exc:
        message = exc.format_message().splitlines()[0] if exc.format_message() else ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            command = exc.ctx.command_path
            click.echo(f"{command}: error: {message} (see '{command} --help')", err=True)
        else:
            click.echo(f"policyd: error: {message}", err=True)
        return int(exc.exit_code)
    except PolicydError as exc:
        click.echo(f"policyd: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OSError as exc:
        click.echo(
            f"policyd: error: {exc.strerror or exc}"
            + (f": {exc.filename}" if exc.filename else ""),
            err=True,
        )
        return 1
    except Exception as exc:  # a bug: still one line, never a traceback
        click.echo(f"policyd: internal error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


def _register_command_groups() -> None:
    """Command groups that live in their own modules."""
    from policyd.audit_cli import audit
    from policyd.policy_cli import policy

    cli.add_command(audit)
    cli.add_command(policy)


_register_command_groups()
