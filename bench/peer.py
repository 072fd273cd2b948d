"""A peer: policyd against the Cerbos PDP, deciding the same request on the same CPU.

Cerbos (https://cerbos.dev, Go) is fetched in the set-up: the `@cerbos/cerbos-linux-x64`
package of the npm registry ships its real server binary. The version and the tarball's
sha512 are pinned here (CERBOS_VERSION, CERBOS_SHA512); the tarball is downloaded with
urllib, checked and the binary extracted to var/bench/cerbos-<version>/, which later runs
reuse. Where it cannot be had (no network, a wrong checksum, not linux-x64) the benchmark is
skipped with one line and the others run.

The question is the same as policyd's Check: may user u000000, through a token with the
scopes UserInfo and DataRead, read data source ds007? Cerbos decides it with a resource
policy (kind `datasource`, action `read`, role `user`) whose CEL condition reads attributes
the caller sends: `"DataRead" in P.attr.scopes && R.id in P.attr.granted`. So the caller
sends the token's scopes and the user's granted data sources with every request (the list
read here from the check benchmark's store, as policyd sees it: 100 data sources), and
Cerbos looks nothing up. policyd gets the token and the path: it verifies the token (cached
after the first call), then reads the live grant, consent, app and revocation in its store,
and with its audit log on writes a durable record before answering.

Servers, one process each, all pinned to the same CPU (bench/check.py's server_cpu), the
load generator on the others; one load generator drives them in alternating windows at 1
and 16 callers, as in the check benchmark:

* `policyd`: `policyd serve`, default configuration (audit log on), Decision API Check;
* `policyd-noaudit`: the same with `audit.enabled = false`;
* `policyd-envoy`: another `policyd serve` (audit on, its own audit log), asked on its
  Envoy ext_authz v3 door (`envoy.service.auth.v3.Authorization/Check`);
* `cerbos`: `cerbos server`, audit off (its default), CheckResources over gRPC;
* `cerbos-audit`: the same with its audit log on (access and decision logs, the `file`
  backend: newline-delimited JSON to a file);
* `cerbos-audit-local`: the same with the `local` backend (an embedded Badger database that
  `cerbosctl audit` can query, batched and flushed every second).

Cerbos is configured as its docs advise for production: log level warn, the disk store
with `watchForChanges: false`, telemetry off, the default request limits; metrics off, as
policyd's are by default. The requests travel as raw bytes (bench/loadgen.py); Cerbos's
CheckResourcesRequest is encoded here by hand from the field numbers of its public protos
(cerbos/request/v1/request.proto, cerbos/engine/v1/engine.proto), and its answers are
decoded the same way: the set-up fails unless Cerbos allows the bench request and denies a
data source that is not in the granted list.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import platform
import sqlite3
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2

from bench.check import (
    APP,
    DATA_SOURCE,
    METHOD,
    PATH,
    SCOPES,
    USER,
    _fetch_response,
    _policyd,
    _ports,
    bulk_insert,
    check_request,
    client_cpus,
    make_home,
    server_cpu,
)
from bench.loadgen import LoadSpec, Target, run_in_process
from bench.observe import _variant
from bench.procs import ROOT, ServerProcess, server_process
from bench.report import load_table, summarize
from policyd.config import load_config
from policyd.decision.tokens import issue_token
from policyd.decision.wiring import token_settings
from policyd.gen.v1 import decision_pb2
from policyd.store.keys import KeyRing
from policyd.store.sqlite import SqliteStore

CERBOS_VERSION = "0.55.0"
CERBOS_PACKAGE = "@cerbos/cerbos-linux-x64"
CERBOS_TARBALL = (
    f"https://registry.npmjs.org/{CERBOS_PACKAGE}/-/cerbos-linux-x64-{CERBOS_VERSION}.tgz"
)
# The registry's dist.integrity of that version (sha512, base64): checked before extracting.
CERBOS_SHA512 = (
    "eLZUycJfaQWK0XTRgH/Oz2E3XiNCUavDd1LhzFxhUpZ3s5CuQqmqG327ta0On8YOTxuZO/19cG4kvfC22r03/Q=="
)
CERBOS_MEMBER = "package/cerbos-linux-x64"  # the binary inside the tarball
CERBOS_CACHE = ROOT / "var" / "bench" / f"cerbos-{CERBOS_VERSION}"
DOWNLOAD_TIMEOUT = 120.0

CERBOS_METHOD = "/cerbos.svc.v1.CerbosService/CheckResources"
ENVOY_METHOD = "/envoy.service.auth.v3.Authorization/Check"
RESOURCE_KIND = "datasource"
ACTION = "read"
ROLE = "user"
NOT_GRANTED = "ds-not-granted"

NAMES = [
    "policyd",
    "policyd-noaudit",
    "policyd-envoy",
    "cerbos",
    "cerbos-audit",
    "cerbos-audit-local",
]
# The goal's pairs: policyd's server CPU per decision at most Cerbos's, audit off vs off
# and on vs on (the Decision API and the Envoy door, each against Cerbos's file backend).
GOAL_PAIRS = [
    ("policyd-noaudit", "cerbos"),
    ("policyd", "cerbos-audit"),
    ("policyd-envoy", "cerbos-audit"),
]
RATIOS = [*GOAL_PAIRS, ("policyd", "cerbos-audit-local")]

POLICY = f"""\
# The bench's one policy: read a data source when the token has DataRead and the user
# granted the data source (both sent by the caller as principal attributes).
apiVersion: api.cerbos.dev/v1
resourcePolicy:
  version: default
  resource: {RESOURCE_KIND}
  rules:
    - actions: ["{ACTION}"]
      effect: EFFECT_ALLOW
      roles: ["{ROLE}"]
      condition:
        match:
          expr: '"DataRead" in request.principal.attr.scopes
            && request.resource.id in request.principal.attr.granted'
"""


class Unavailable(Exception):
    """Cerbos cannot be had here; the message says why (the benchmark is skipped)."""


# -- fetching Cerbos --------------------------------------------------------------------------


def verify_integrity(data: bytes, sha512_b64: str = CERBOS_SHA512) -> None:
    """Raise Unavailable unless `data` has the pinned sha512 (npm's dist.integrity)."""
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != sha512_b64:
        raise Unavailable(f"{CERBOS_PACKAGE}@{CERBOS_VERSION}: sha512 {got} is not the pinned one")


def extract_binary(tarball: bytes, dest: Path) -> Path:
    """Write the tarball's Cerbos binary to `dest` (executable), atomically."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.getmember(CERBOS_MEMBER)
        source = tar.extractfile(member) if member.isfile() else None
        if source is None:
            raise Unavailable(f"{CERBOS_MEMBER} is not a file in the tarball")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        partial.write_bytes(source.read())
    partial.chmod(0o755)
    partial.replace(dest)
    return dest


def cerbos_binary(cache: Path = CERBOS_CACHE) -> Path:
    """The pinned Cerbos binary: from the cache, else downloaded, checked and extracted."""
    binary = cache / "cerbos"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise Unavailable(f"{CERBOS_PACKAGE} is for linux-x64, not {platform.platform()}")
    try:
        with urllib.request.urlopen(CERBOS_TARBALL, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"cannot download {CERBOS_TARBALL}: {exc}") from exc
    verify_integrity(data)
    return extract_binary(data, binary)


# -- Cerbos's CheckResources, encoded and decoded by hand ----------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, messages, map entries."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _str(number: int, value: str) -> bytes:
    return _bytes_field(number, value.encode())


def _attr(number: int, attributes: dict[str, list[str]]) -> bytes:
    """A map<string, google.protobuf.Value> field of lists of strings (key 1, value 2)."""
    out = b""
    for key, values in attributes.items():
        value = struct_pb2.Value()
        value.list_value.values.extend(struct_pb2.Value(string_value=v) for v in values)
        out += _bytes_field(number, _str(1, key) + _bytes_field(2, value.SerializeToString()))
    return out


def check_resources_request(
    principal_id: str,
    roles: list[str],
    attributes: dict[str, list[str]],
    kind: str,
    resource_id: str,
    action: str,
    request_id: str = "bench",
) -> bytes:
    """cerbos.request.v1.CheckResourcesRequest: request_id = 1, principal = 3 (a
    cerbos.engine.v1.Principal: id = 1, roles = 3, attr = 4), resources = 4 (a ResourceEntry:
    actions = 1, resource = 2, a cerbos.engine.v1.Resource: kind = 1, id = 3)."""
    principal = _str(1, principal_id) + b"".join(_str(3, r) for r in roles) + _attr(4, attributes)
    resource = _str(1, kind) + _str(3, resource_id)
    entry = _str(1, action) + _bytes_field(2, resource)
    return _str(1, request_id) + _bytes_field(3, principal) + _bytes_field(4, entry)


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for
    length-delimited fields; fixed-size fields are skipped."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            length = varint()
            yield number, data[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


EFFECTS = {0: "EFFECT_UNSPECIFIED", 1: "EFFECT_ALLOW", 2: "EFFECT_DENY", 3: "EFFECT_NO_MATCH"}


def effects(response: bytes) -> dict[str, dict[str, str]]:
    """cerbos.response.v1.CheckResourcesResponse -> {resource id: {action: effect}}:
    results = 2, each a ResultEntry with resource = 1 (id = 1) and actions = 2, a
    map<string, cerbos.effect.v1.Effect> (key 1, value 2)."""
    out: dict[str, dict[str, str]] = {}
    for number, result in _fields(response):
        if number != 2 or not isinstance(result, bytes):
            continue
        resource_id, actions = "", {}
        for field, value in _fields(result):
            if field == 1 and isinstance(value, bytes):
                resource_id = next(
                    (v.decode() for f, v in _fields(value) if f == 1 and isinstance(v, bytes)),
                    "",
                )
            elif field == 2 and isinstance(value, bytes):
                entry = dict(_fields(value))
                key, effect = entry.get(1, b""), entry.get(2, 0)
                assert isinstance(key, bytes) and isinstance(effect, int)
                actions[key.decode()] = EFFECTS.get(effect, str(effect))
        out[resource_id] = actions
    return out


# -- the requests -----------------------------------------------------------------------------


def granted_data_sources(db_path: Path, user: str = USER, app: str = APP) -> list[str]:
    """The data sources the user granted to the app, as policyd's store holds them."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT data_source FROM grants WHERE user_id = ? AND client_id = ?"
            " AND revoked_at IS NULL ORDER BY data_source",
            (user, app),
        ).fetchall()
    finally:
        conn.close()
    return [str(r[0]) for r in rows]


def cerbos_request(granted: list[str], resource_id: str = DATA_SOURCE) -> bytes:
    return check_resources_request(
        USER,
        [ROLE],
        {"scopes": list(SCOPES), "granted": granted},
        RESOURCE_KIND,
        resource_id,
        ACTION,
    )


def envoy_request(token: str) -> external_auth_pb2.CheckRequest:
    """What Envoy's ext_authz filter sends for `GET PATH` with the token."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", PATH, "hub.bench", "http"
    http.protocol = "HTTP/1.1"
    http.headers.update({"authorization": f"Bearer {token}", ":authority": "hub.bench"})
    return request


# -- Cerbos's configuration and process --------------------------------------------------------


def cerbos_config(
    root: Path, name: str, grpc_port: int, http_port: int, policies: Path, audit: str | None
) -> Path:
    """A Cerbos config file: the disk store, telemetry and metrics off, and the audit log
    off (`audit` None) or on with the `file` or `local` backend, logging every access and
    decision (its docs' production example), into `root`."""
    if audit == "file":
        audit_block = (
            "audit:\n  enabled: true\n  accessLogsEnabled: true\n  decisionLogsEnabled: true\n"
            f"  backend: file\n  file:\n    path: {root / f'{name}-records.log'}\n"
        )
    elif audit == "local":
        audit_block = (
            "audit:\n  enabled: true\n  accessLogsEnabled: true\n  decisionLogsEnabled: true\n"
            f"  backend: local\n  local:\n    storagePath: {root / f'{name}-records'}\n"
        )
    else:
        audit_block = "audit:\n  enabled: false\n"
    path = root / f"{name}.yaml"
    path.write_text(
        "server:\n"
        f'  grpcListenAddr: "127.0.0.1:{grpc_port}"\n'
        f'  httpListenAddr: "127.0.0.1:{http_port}"\n'
        "  metricsEnabled: false\n"
        "  requestLimits:\n    maxActionsPerResource: 50\n    maxResourcesPerRequest: 50\n"
        "storage:\n  driver: disk\n"
        f"  disk:\n    directory: {policies}\n    watchForChanges: false\n"
        "telemetry:\n  disabled: true\n" + audit_block
    )
    return path


def write_policies(root: Path) -> Path:
    folder = root / "cerbos-policies"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{RESOURCE_KIND}.yaml").write_text(POLICY)
    return folder


@contextlib.contextmanager
def cerbos_server(
    binary: Path, config: Path, name: str, grpc_port: int, log_dir: Path
) -> Iterator[ServerProcess]:
    """`cerbos server` on the server CPU (its Go runtime then uses one P: GOMAXPROCS follows
    the affinity mask), log level warn."""
    args = ["server", f"--config={config}", "--log-level=warn"]
    cpu = server_cpu()
    with server_process(
        name, args, grpc_port, log_dir, cwd=config.parent, program=str(binary), cpu=cpu
    ) as server:
        pinned = {cpu} if cpu is not None else os.sched_getaffinity(0)
        threads = list(Path(f"/proc/{server.pid}/task").iterdir())
        if any(os.sched_getaffinity(int(t.name)) != pinned for t in threads):
            raise RuntimeError(f"{name}: not every thread is on CPU {cpu}")
        yield server


def call(address: str, method: str, request: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        reply: bytes = channel.unary_unary(method, None, None)(request, timeout=10)
    return reply


def check_cerbos(address: str, granted: list[str]) -> None:
    """Fail unless Cerbos allows the bench request and denies a data source not granted."""
    allowed = effects(call(address, CERBOS_METHOD, cerbos_request(granted)))
    denied = effects(call(address, CERBOS_METHOD, cerbos_request(granted, NOT_GRANTED)))
    if allowed != {DATA_SOURCE: {ACTION: "EFFECT_ALLOW"}}:
        raise RuntimeError(f"Cerbos did not allow the bench request: {allowed}")
    if denied != {NOT_GRANTED: {ACTION: "EFFECT_DENY"}}:
        raise RuntimeError(f"Cerbos did not deny a data source not granted: {denied}")


# -- the run ----------------------------------------------------------------------------------


def run(
    log_dir: Path,
    *,
    grants: int,
    callers: list[int],
    rounds: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    try:
        binary = cerbos_binary()
    except Unavailable as exc:
        return {"skipped": str(exc)}
    with tempfile.TemporaryDirectory(prefix="policyd-bench-peer-") as tmp:
        root = Path(tmp)
        audited, unaudited = make_home(root)
        config = load_config(audited, env={})
        store = SqliteStore(config.store.path)
        keyring = KeyRing(store, config.tokens.key_dir)
        counts = bulk_insert(Path(config.store.path), grants)
        keyring.ensure_active()
        token, _ = issue_token(
            keyring, token_settings(config), sub=USER, client_id=APP, scopes=SCOPES
        )
        store.close()
        granted = granted_data_sources(Path(config.store.path))
        if DATA_SOURCE not in granted:
            raise RuntimeError(f"{USER} has not granted {DATA_SOURCE} to {APP} in the store")
        decision = check_request(token).SerializeToString()
        envoy = envoy_request(token).SerializeToString()
        cerbos = cerbos_request(granted)
        envoy_config = _variant(audited, "envoy", "")  # its own audit log
        policies = write_policies(root)
        ports = _ports(9)
        cerbos_configs = {
            name: cerbos_config(root, name, ports[3 + 2 * i], ports[4 + 2 * i], policies, audit)
            for i, (name, audit) in enumerate(
                (("cerbos", None), ("cerbos-audit", "file"), ("cerbos-audit-local", "local"))
            )
        }
        requests = {
            "policyd": (METHOD, decision),
            "policyd-noaudit": (METHOD, decision),
            "policyd-envoy": (ENVOY_METHOD, envoy),
            **{name: (CERBOS_METHOD, cerbos) for name in cerbos_configs},
        }
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(_policyd(name, path, port, log_dir))
                for name, path, port in (
                    ("policyd", audited, ports[0]),
                    ("policyd-noaudit", unaudited, ports[1]),
                    ("policyd-envoy", envoy_config, ports[2]),
                )
            ]
            servers += [
                stack.enter_context(cerbos_server(binary, path, name, ports[3 + 2 * i], log_dir))
                for i, (name, path) in enumerate(cerbos_configs.items())
            ]
            for server in servers[:2]:
                _fetch_response(server.address, check_request(token))
            _check_envoy_allows(call(servers[2].address, ENVOY_METHOD, envoy))
            for server in servers[3:]:
                check_cerbos(server.address, granted)
            spec = LoadSpec(
                targets=[
                    Target(s.name, s.address, s.pid, *_hex(requests[s.name])) for s in servers
                ],
                callers=callers,
                rounds=rounds,
                warmup=warmup,
                duration=duration,
                cpus=client_cpus(),
            )
            result = run_in_process(spec)
            audit_sizes = _audit_sizes(root)
        cerbos_yaml = cerbos_configs["cerbos-audit"].read_text()
    for name, reply in result.responses.items():
        _check_reply(name, bytes.fromhex(reply))
    summary = summarize(result, NAMES, RATIOS)
    summary.update(
        cerbos=f"{CERBOS_PACKAGE}@{CERBOS_VERSION}",
        store=counts,
        granted=len(granted),
        request=f"GET {PATH} as {USER} via {APP}",
        request_bytes={name: len(body) for name, (_, body) in requests.items()},
        audit_bytes=audit_sizes,
        cerbos_config=cerbos_yaml,
    )
    return summary


def _hex(method_and_body: tuple[str, bytes]) -> tuple[str, str]:
    method, body = method_and_body
    return method, body.hex()


def _check_envoy_allows(reply: bytes) -> None:
    response = external_auth_pb2.CheckResponse.FromString(reply)
    if response.status.code != 0 or not response.HasField("ok_response"):
        raise RuntimeError(f"policyd's Envoy door did not allow the bench request: {response}")


def _check_reply(name: str, reply: bytes) -> None:
    """Every server answered the load generator's first call with an allow."""
    if name.startswith("cerbos"):
        if effects(reply) != {DATA_SOURCE: {ACTION: "EFFECT_ALLOW"}}:
            raise RuntimeError(f"{name} did not answer allow: {effects(reply)}")
    elif name == "policyd-envoy":
        _check_envoy_allows(reply)
    elif not decision_pb2.CheckResponse.FromString(reply).allowed:
        raise RuntimeError(f"{name} did not answer allow")


def _audit_sizes(root: Path) -> dict[str, int]:
    """Bytes of disk each audit log takes at the end, so a side that logged nothing shows
    (allocated blocks: Badger's value log is a sparse file of 1 GB from the start)."""
    sizes: dict[str, int] = {}
    for path in sorted(root.iterdir()):
        if "audit" in path.name and not path.name.endswith((".toml", ".yaml", ".key")):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sizes[path.name] = sum(p.stat().st_blocks * 512 for p in files)
    return sizes


def report(summary: dict[str, Any]) -> str:
    if "skipped" in summary:
        return f"peer: skipped: {summary['skipped']}"
    sizes = summary["request_bytes"]
    lines = [
        f"Peer: policyd against {summary['cerbos']} (CheckResources), {summary['request']};"
        f" store: {summary['store']['grants']:,} grants; Cerbos is sent the user's"
        f" {summary['granted']} granted data sources; request bytes: policyd {sizes['policyd']},"
        f" Envoy door {sizes['policyd-envoy']}, Cerbos {sizes['cerbos']}",
        load_table(summary, NAMES),
    ]
    for callers, entry in summary["by_callers"].items():
        for a, b in RATIOS:
            r = entry["ratios"][f"{a}/{b}"]
            goal = ""
            if (a, b) in GOAL_PAIRS:
                met = r["server_cpu_per_call"] <= 1.0
                goal = f" ({'meets' if met else 'MISSES'} the goal <= 1)"
            lines.append(
                f"{callers:>2} callers: server CPU per decision, {a}/{b} ="
                f" {r['server_cpu_per_call']:.2f}{goal}; calls/s {r['throughput']:.2f}"
            )
    lines.append(
        "audit logs at the end (bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in summary["audit_bytes"].items())
    )
    return "\n".join(lines)


def _main() -> int:  # `python -m bench.peer`: only fetch the binary (or say why not)
    try:
        print(cerbos_binary())
    except Unavailable as exc:
        print(f"peer: skipped: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
