"""Cerbos for the peer benchmark (bench/peer.py): the pinned server binary, its policy
and configuration, its server process, and its CheckResources call on the wire.

The binary comes from the npm registry's `@cerbos/cerbos-linux-x64` package, which ships
Cerbos's real server: the version and the tarball's sha512 are pinned here; the tarball is
downloaded with urllib, checked, and the binary extracted to var/bench/cerbos-<version>/,
which later runs reuse. `python -m bench.cerbos` does only that, and says why it cannot.

The request (cerbos.request.v1.CheckResourcesRequest) is encoded and the answer decoded by
hand from the field numbers of Cerbos's public protos (cerbos/request/v1/request.proto,
cerbos/engine/v1/engine.proto, cerbos/response/v1/response.proto): a few fields, where
generated stubs would need Cerbos's protos and their dependencies (googleapis, buf's
validate, openapiv2) in the repo. tests/test_bench_peer.py reads the encoding back with
protobuf's own parser.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import platform
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import struct_pb2

from bench.check import server_cpu
from bench.loadgen import call_once
from bench.procs import ROOT, ServerProcess, server_process

VERSION = "0.55.0"
PACKAGE = "@cerbos/cerbos-linux-x64"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/cerbos-linux-x64-{VERSION}.tgz"
# The registry's dist.integrity of that version (sha512, base64): checked before extracting.
SHA512 = "eLZUycJfaQWK0XTRgH/Oz2E3XiNCUavDd1LhzFxhUpZ3s5CuQqmqG327ta0On8YOTxuZO/19cG4kvfC22r03/Q=="
MEMBER = "package/cerbos-linux-x64"  # the binary inside the tarball
CACHE = ROOT / "var" / "bench" / f"cerbos-{VERSION}"
DOWNLOAD_TIMEOUT = 120.0

METHOD = "/cerbos.svc.v1.CerbosService/CheckResources"
RESOURCE_KIND = "datasource"
ACTION = "read"
ROLE = "user"

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


def verify_integrity(data: bytes, sha512_b64: str = SHA512) -> None:
    """Raise Unavailable unless `data` has the pinned sha512 (npm's dist.integrity)."""
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != sha512_b64:
        raise Unavailable(f"{PACKAGE}@{VERSION}: sha512 {got} is not the pinned one")


def extract_binary(tarball: bytes, dest: Path) -> Path:
    """Write the tarball's Cerbos binary to `dest` (executable), atomically."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        try:
            member = tar.getmember(MEMBER)
        except KeyError:
            raise Unavailable(f"the tarball has no {MEMBER}") from None
        source = tar.extractfile(member) if member.isfile() else None
        if source is None:
            raise Unavailable(f"{MEMBER} is not a file in the tarball")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        partial.write_bytes(source.read())
    partial.chmod(0o755)
    partial.replace(dest)
    return dest


def binary_path(cache: Path = CACHE) -> Path:
    """The pinned Cerbos binary: from the cache, else downloaded, checked and extracted."""
    binary = cache / "cerbos"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise Unavailable(f"{PACKAGE} is for linux-x64, not {platform.platform()}")
    try:
        with urllib.request.urlopen(TARBALL, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"cannot download {TARBALL}: {exc}") from exc
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


# -- configuration and process --------------------------------------------------------


def config(
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
def server(
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


def decide(address: str, request: bytes) -> dict[str, dict[str, str]]:
    """One CheckResources call: {resource id: {action: effect}}."""
    return effects(call_once(address, METHOD, request))


def _main() -> int:  # `python -m bench.cerbos`: only fetch the binary (or say why not)
    try:
        print(binary_path())
    except Unavailable as exc:
        print(f"peer: skipped: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
