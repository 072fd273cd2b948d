"""The peer benchmark's own parts (bench/peer.py, bench/cerbos.py): the hand-written
encoding of Cerbos's CheckResources, read back by protobuf's own parser; the decoding of
its answers; the pinned binary's checks and the skip without it; and, where the binary is
already cached, a real Cerbos round trip. Nothing here downloads anything."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from bench import cerbos, peer
from bench.check import DATA_SOURCE, USER
from bench.loadgen import call_once
from bench.procs import free_port

F = descriptor_pb2.FieldDescriptorProto


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int,
    type_name: str = "",
    repeated: bool = False,
) -> None:
    field = message.field.add(name=name, number=number, type=kind)
    if type_name:  # set only for message fields: an empty one still counts as set
        field.type_name = type_name
    field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL


def _map(message: descriptor_pb2.DescriptorProto, name: str, number: int, value: F) -> None:
    """A map<string, ...> field: a repeated nested *Entry message (key 1, value 2)."""
    entry = message.nested_type.add(name=name.capitalize() + "Entry")
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    entry.field.append(value)
    entry.field[-1].name, entry.field[-1].number = "value", 2
    _field(message, name, number, F.TYPE_MESSAGE, f".t.{message.name}.{entry.name}", True)


def _cerbos_messages() -> dict[str, Any]:
    """The few messages of Cerbos's public protos the bench uses, with their field numbers
    as cerbos/{request,response,engine}/v1/*.proto declare them, built at run time."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="cerbos_subset.proto",
        package="t",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    value = F(type=F.TYPE_MESSAGE, type_name=".google.protobuf.Value", label=F.LABEL_OPTIONAL)
    principal = file.message_type.add(name="Principal")
    _field(principal, "id", 1, F.TYPE_STRING)
    _field(principal, "policy_version", 2, F.TYPE_STRING)
    _field(principal, "roles", 3, F.TYPE_STRING, repeated=True)
    _map(principal, "attr", 4, value)
    resource = file.message_type.add(name="Resource")
    _field(resource, "kind", 1, F.TYPE_STRING)
    _field(resource, "policy_version", 2, F.TYPE_STRING)
    _field(resource, "id", 3, F.TYPE_STRING)
    entry = file.message_type.add(name="ResourceEntry")
    _field(entry, "actions", 1, F.TYPE_STRING, repeated=True)
    _field(entry, "resource", 2, F.TYPE_MESSAGE, ".t.Resource")
    request = file.message_type.add(name="CheckResourcesRequest")
    _field(request, "request_id", 1, F.TYPE_STRING)
    _field(request, "include_meta", 2, F.TYPE_BOOL)
    _field(request, "principal", 3, F.TYPE_MESSAGE, ".t.Principal")
    _field(request, "resources", 4, F.TYPE_MESSAGE, ".t.ResourceEntry", repeated=True)
    result_resource = file.message_type.add(name="ResultResource")
    _field(result_resource, "id", 1, F.TYPE_STRING)
    _field(result_resource, "kind", 2, F.TYPE_STRING)
    result = file.message_type.add(name="ResultEntry")
    _field(result, "resource", 1, F.TYPE_MESSAGE, ".t.ResultResource")
    _map(result, "actions", 2, F(type=F.TYPE_INT32, label=F.LABEL_OPTIONAL))
    response = file.message_type.add(name="CheckResourcesResponse")
    _field(response, "request_id", 1, F.TYPE_STRING)
    _field(response, "results", 2, F.TYPE_MESSAGE, ".t.ResultEntry", repeated=True)
    _field(response, "cerbos_call_id", 3, F.TYPE_STRING)
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"t.{name}"))
        for name in ("CheckResourcesRequest", "CheckResourcesResponse")
    }


def test_the_check_resources_request_parses_with_protobufs_own_parser() -> None:
    messages = _cerbos_messages()
    granted = [f"ds{n:03d}" for n in range(100)]
    raw = peer.cerbos_request(granted)
    parsed = messages["CheckResourcesRequest"].FromString(raw)
    assert parsed.request_id == "bench"
    assert parsed.principal.id == USER
    assert list(parsed.principal.roles) == [cerbos.ROLE]
    attr = parsed.principal.attr
    assert [v.string_value for v in attr["scopes"].list_value.values] == ["UserInfo", "DataRead"]
    assert [v.string_value for v in attr["granted"].list_value.values] == granted
    (entry,) = parsed.resources
    assert list(entry.actions) == [cerbos.ACTION]
    assert (entry.resource.kind, entry.resource.id) == (cerbos.RESOURCE_KIND, DATA_SOURCE)
    # and nothing else: protobuf's encoding of the parsed message is the same size
    assert len(parsed.SerializeToString()) == len(raw)


def test_effects_reads_each_resources_actions() -> None:
    response = _cerbos_messages()["CheckResourcesResponse"](
        request_id="bench", cerbos_call_id="01ABC"
    )
    allowed = response.results.add()
    allowed.resource.id, allowed.resource.kind = "ds007", "datasource"
    allowed.actions["read"] = 1
    denied = response.results.add()
    denied.resource.id = "ds-x"
    denied.actions["read"] = 2
    denied.actions["write"] = 3
    assert cerbos.effects(response.SerializeToString()) == {
        "ds007": {"read": "EFFECT_ALLOW"},
        "ds-x": {"read": "EFFECT_DENY", "write": "EFFECT_NO_MATCH"},
    }


def _tarball(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_tarball_is_checked_against_the_pinned_sha512() -> None:
    data = _tarball({cerbos.MEMBER: b"#!/bin/sh\n"})
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    cerbos.verify_integrity(data, digest)
    with pytest.raises(cerbos.Unavailable, match="not the pinned one"):
        cerbos.verify_integrity(data + b"x", digest)
    with pytest.raises(cerbos.Unavailable):
        cerbos.verify_integrity(data)  # not the real package


def test_the_binary_is_extracted_executable_and_reused(tmp_path: Path) -> None:
    binary = cerbos.extract_binary(
        _tarball({"package/package.json": b"{}", cerbos.MEMBER: b"ELF"}),
        tmp_path / "cerbos",
    )
    assert binary.read_bytes() == b"ELF"
    assert binary.stat().st_mode & 0o111
    assert cerbos.binary_path(tmp_path) == binary  # cached: no download


def test_without_the_network_the_fetch_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> object:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(cerbos.Unavailable, match=r"cannot download .*no route to host"):
        cerbos.binary_path(tmp_path)


def test_a_run_without_cerbos_is_skipped_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> Path:
        raise cerbos.Unavailable("no network")

    monkeypatch.setattr(cerbos, "binary_path", unavailable)
    summary = peer.run(tmp_path, grants=1, callers=[1], rounds=1, warmup=0.1, duration=0.1)
    assert summary == {"skipped": "no network"}
    assert peer.report(summary) == "peer: skipped: no network"


CACHED = cerbos.CACHE / "cerbos"


@pytest.mark.slow
@pytest.mark.skipif(
    not CACHED.is_file(),
    reason=f"no cached Cerbos binary at {CACHED} (`python -m bench.cerbos` fetches it)",
)
@pytest.mark.parametrize("audit", [None, "file"])
def test_cerbos_allows_a_granted_data_source_and_denies_another(
    tmp_path: Path, audit: str | None
) -> None:
    port = free_port()
    config = cerbos.config(
        tmp_path, "cerbos", port, free_port(), cerbos.write_policies(tmp_path), audit
    )
    granted = [f"ds{n:03d}" for n in range(100)]
    with cerbos.server(CACHED, config, "cerbos", port, tmp_path) as server:
        peer.check_cerbos(server.address, granted)  # raises unless allow and deny
        without_scope = cerbos.check_resources_request(
            USER,
            [cerbos.ROLE],
            {"scopes": ["UserInfo"], "granted": granted},
            cerbos.RESOURCE_KIND,
            DATA_SOURCE,
            cerbos.ACTION,
        )
        answer = cerbos.effects(call_once(server.address, cerbos.METHOD, without_scope))
    assert answer == {DATA_SOURCE: {cerbos.ACTION: "EFFECT_DENY"}}
    if audit == "file":
        assert '"log.kind":"decision"' in (tmp_path / "cerbos-records.log").read_text()


def test_a_tarball_without_the_binary_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    data = _tarball({"package/package.json": b"{}"})
    with pytest.raises(cerbos.Unavailable, match="the tarball has no"):
        cerbos.extract_binary(data, tmp_path / "cerbos")
    assert not (tmp_path / "cerbos").exists()
