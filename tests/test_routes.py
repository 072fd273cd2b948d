"""Unit tests of policyd/core/routes.py: path splitting, the route trie, data-source extraction."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Literal

import pytest

from policyd.core.model import Access
from policyd.core.reasons import Reason
from policyd.core.routes import (
    BUILTIN_RULES,
    DataSourceRef,
    RequestProblem,
    RouteRule,
    RouteTable,
    extract_data_sources,
    parse_body,
    resolve_pointer,
    split_path,
)

GET = frozenset({"GET"})
POST = frozenset({"POST"})
LIMIT = 1 << 20


def rule(
    rule_id: str,
    path: str,
    methods: frozenset[str] = GET,
    *refs: DataSourceRef,
    action: str = "",
) -> RouteRule:
    return RouteRule(
        rule_id,
        methods,
        path,
        action or rule_id,
        access=Access.READ if refs else None,
        data_sources=refs,
    )


def problem_of(excinfo: pytest.ExceptionInfo[RequestProblem]) -> Reason:
    return excinfo.value.reason


# -- split_path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "segments"),
    [
        ("/", []),
        ("/api/data/tags/ds-a", ["api", "data", "tags", "ds-a"]),
        ("/a%20b", ["a b"]),
        ("/ds%2Da", ["ds-a"]),
        ("/caf%C3%A9", ["caf\u00e9"]),
        ("/caf\u00e9", ["caf\u00e9"]),
        ("/%252F", ["%2F"]),
        ("/a.b/..c/...", ["a.b", "..c", "..."]),
    ],
)
def test_split_path_decodes_each_segment_once(raw: str, segments: list[str]) -> None:
    assert split_path(raw) == segments


@pytest.mark.parametrize(
    "raw",
    [
        "/a%2Fb",  # encoded slash
        "/a%2fb",
        "/a%5Cb",  # encoded backslash
        "/a\\b",  # raw backslash
        "/%2e%2e/x",  # encoded dot-dot
        "/%2E/x",
        "/.%2e/x",
        "/a/./b",
        "/a/../b",
        "/a/..",
        "/.",
        "//a",
        "/a//b",
        "/a/",
        "/%zz",
        "/%2",
        "/a%",
        "/%u002e",
        "/%00",
        "/a%0Ab",
        "/%7f",
        "/a\tb",
        "/a b",
        "/%FF",  # not UTF-8
        "/%C3%28",
        "/a?b",
        "/a#b",
    ],
)
def test_split_path_refuses_ambiguous_paths(raw: str) -> None:
    with pytest.raises(RequestProblem) as excinfo:
        split_path(raw)
    assert problem_of(excinfo) == Reason.PATH_AMBIGUOUS


@pytest.mark.parametrize("raw", ["", "api/user/me", "*", "%2Fapi"])
def test_split_path_refuses_a_path_not_starting_with_slash_as_request_invalid(raw: str) -> None:
    with pytest.raises(RequestProblem) as excinfo:
        split_path(raw)
    assert problem_of(excinfo) == Reason.REQUEST_INVALID


# -- the trie ------------------------------------------------------------------------------


def test_literal_segment_beats_parameter() -> None:
    table = RouteTable([rule("param", "/t/{dsn}"), rule("literal", "/t/special")])
    literal = table.match("GET", ["t", "special"])
    assert literal is not None
    assert literal.rule.id == "literal"
    assert literal.params == {}
    param = table.match("GET", ["t", "other"])
    assert param is not None
    assert param.rule.id == "param"
    assert param.params == {"dsn": "other"}


def test_match_backtracks_from_a_dead_end_literal_to_the_parameter() -> None:
    table = RouteTable([rule("deep", "/a/b/d"), rule("param", "/a/{x}/c")])
    match = table.match("GET", ["a", "b", "c"])
    assert match is not None
    assert match.rule.id == "param"
    assert match.params == {"x": "b"}


def test_match_collects_every_parameter() -> None:
    table = RouteTable([rule("two", "/tags/{dsn}/{tag}")])
    match = table.match("GET", ["tags", "ds-a", "t1"])
    assert match is not None
    assert match.params == {"dsn": "ds-a", "tag": "t1"}


def test_match_selects_the_rule_by_method() -> None:
    table = RouteTable([rule("read", "/x", GET), rule("write", "/x", POST)])
    get = table.match("GET", ["x"])
    post = table.match("POST", ["x"])
    assert get is not None and get.rule.id == "read"
    assert post is not None and post.rule.id == "write"
    assert table.match("DELETE", ["x"]) is None


@pytest.mark.parametrize(
    "segments",
    [["y"], ["x", "extra"], [], ["t"], ["X"]],
)
def test_match_returns_none_when_no_rule_fits(segments: list[str]) -> None:
    table = RouteTable([rule("x", "/x"), rule("t", "/t/{dsn}")])
    assert table.match("GET", segments) is None


def test_root_rule_matches_the_empty_path() -> None:
    table = RouteTable([rule("root", "/"), rule("x", "/x")])
    match = table.match("GET", [])
    assert match is not None
    assert match.rule.id == "root"


def test_literal_route_of_another_method_does_not_hide_a_parameter_route() -> None:
    table = RouteTable([rule("get-b", "/a/b", GET), rule("post-any", "/a/{x}", POST)])
    match = table.match("POST", ["a", "b"])
    assert match is not None
    assert match.rule.id == "post-any"


def test_route_table_rejects_two_rules_for_the_same_method_and_path() -> None:
    with pytest.raises(ValueError, match="overlap"):
        RouteTable([rule("one", "/x/{dsn}"), rule("two", "/x/{dsn}", frozenset({"GET", "PUT"}))])


def test_route_table_rejects_two_parameter_names_at_the_same_place() -> None:
    with pytest.raises(ValueError, match="conflicts"):
        RouteTable([rule("one", "/x/{dsn}"), rule("two", "/x/{name}/y")])


def test_route_table_accepts_one_path_with_distinct_methods() -> None:
    table = RouteTable([rule("get", "/x/{dsn}", GET), rule("post", "/x/{dsn}", POST)])
    assert len(table.rules) == 2


def test_builtin_rules_build_a_table_with_every_action_indexed() -> None:
    table = RouteTable(BUILTIN_RULES)
    for r in BUILTIN_RULES:
        found = table.by_action(r.action)
        assert found is not None
        assert found.action == r.action
    assert table.by_action("no.such.action") is None
    assert table.version.startswith("builtin-")


def test_by_action_returns_the_first_rule_of_an_action() -> None:
    table = RouteTable([rule("first", "/a", action="act"), rule("second", "/b", action="act")])
    found = table.by_action("act")
    assert found is not None
    assert found.id == "first"


def test_route_table_version_depends_on_the_rules() -> None:
    one = RouteTable([rule("x", "/x")])
    same = RouteTable([rule("x", "/x")])
    other = RouteTable([rule("x", "/y")])
    assert one.version == same.version
    assert one.version != other.version


_VERSION_OF_A_MULTI_METHOD_RULE = """
from policyd.core.routes import RouteRule, RouteTable
rule = RouteRule(
    "r", frozenset({"GET", "HEAD", "POST"}), "/x", "x", frozenset({"A", "B", "C"})
)
print(RouteTable([rule]).version)
"""


def test_route_table_version_is_the_same_in_every_process() -> None:
    versions = set()
    for seed in ("0", "1"):
        result = subprocess.run(
            [sys.executable, "-c", _VERSION_OF_A_MULTI_METHOD_RULE],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        versions.add(result.stdout.strip())
    assert len(versions) == 1, versions


# -- extract_data_sources ------------------------------------------------------------------


def test_extract_from_a_path_parameter() -> None:
    r = rule("p", "/t/{dsn}", GET, DataSourceRef("path", "dsn"))
    assert extract_data_sources(r, {"dsn": "ds-a"}, "", b"", LIMIT) == ("ds-a",)


def test_extract_from_repeated_query_parameters_in_order() -> None:
    r = rule("q", "/q", GET, DataSourceRef("query", "ds"))
    got = extract_data_sources(r, {}, "ds=ds-b&other=x&ds=ds-a&ds=ds-b", b"", LIMIT)
    assert got == ("ds-b", "ds-a")


def test_extract_decodes_query_values() -> None:
    r = rule("q", "/q", GET, DataSourceRef("query", "ds"))
    assert extract_data_sources(r, {}, "ds=a%2Fb", b"", LIMIT) == ("a/b",)


def test_extract_refuses_a_missing_query_parameter() -> None:
    r = rule("q", "/q", GET, DataSourceRef("query", "ds"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "other=ds-a", b"", LIMIT)
    assert problem_of(excinfo) == Reason.REQUEST_INVALID


def test_extract_refuses_an_empty_data_source_name() -> None:
    r = rule("q", "/q", GET, DataSourceRef("query", "ds"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "ds=ds-a&ds=", b"", LIMIT)
    assert problem_of(excinfo) == Reason.REQUEST_INVALID


def test_extract_body_object_keys() -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/tags", "keys"))
    body = b'{"tags": {"ds-a": ["t1"], "ds-b": ["t2"]}, "start": "now"}'
    assert extract_data_sources(r, {}, "", body, LIMIT) == ("ds-a", "ds-b")


def test_extract_body_array_items() -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/sources", "items"))
    body = b'{"sources": ["ds-c", "ds-a"]}'
    assert extract_data_sources(r, {}, "", body, LIMIT) == ("ds-c", "ds-a")


def test_extract_body_single_string_value() -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/query/source", "value"))
    body = b'{"query": {"source": "ds-b"}}'
    assert extract_data_sources(r, {}, "", body, LIMIT) == ("ds-b",)


def test_extract_dedups_across_refs_keeping_first_seen_order() -> None:
    r = rule(
        "mix",
        "/m/{dsn}",
        POST,
        DataSourceRef("path", "dsn"),
        DataSourceRef("query", "ds"),
        DataSourceRef("body", "/list", "items"),
    )
    got = extract_data_sources(
        r, {"dsn": "ds-b"}, "ds=ds-c&ds=ds-b", b'{"list": ["ds-a", "ds-c", "ds-a"]}', LIMIT
    )
    assert got == ("ds-b", "ds-c", "ds-a")


@pytest.mark.parametrize(
    ("shape", "body"),
    [
        ("keys", b'{"x": ["ds-a"]}'),
        ("keys", b'{"x": "ds-a"}'),
        ("items", b'{"x": {"ds-a": 1}}'),
        ("items", b'{"x": ["ds-a", 7]}'),
        ("items", b'{"x": "ds-a"}'),
        ("value", b'{"x": ["ds-a"]}'),
        ("value", b'{"x": 7}'),
        ("value", b'{"x": null}'),
    ],
)
def test_extract_refuses_a_body_value_of_the_wrong_shape(
    shape: Literal["keys", "items", "value"], body: bytes
) -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/x", shape))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "", body, LIMIT)
    assert problem_of(excinfo) == Reason.BODY_INVALID


def test_extract_refuses_an_empty_body_key_as_request_invalid() -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/tags", "keys"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "", b'{"tags": {"": [], "ds-a": []}}', LIMIT)
    assert problem_of(excinfo) == Reason.REQUEST_INVALID


@pytest.mark.parametrize(
    "body",
    [
        b'{"tags": {"ds-a": [], "ds-a": []}}',
        b'{"tags": {"ds-c": []}, "tags": {"ds-a": []}}',
        b'{"tags": {"ds-a": {"k": 1, "k": 2}}}',
        b'{"tags": {"ds-a": []}, "other": 1, "other": 2}',
    ],
)
def test_extract_refuses_duplicate_keys_anywhere_in_the_body(body: bytes) -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/tags", "keys"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "", body, LIMIT)
    assert problem_of(excinfo) == Reason.BODY_INVALID


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"tags": ', b"\xff\xfe", b"[" * 100_000, b'{"other": {}}'],
)
def test_extract_refuses_a_body_that_is_not_json_or_lacks_the_pointer(body: bytes) -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/tags", "keys"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "", body, LIMIT)
    assert problem_of(excinfo) == Reason.BODY_INVALID


def test_body_at_the_limit_is_parsed_and_one_byte_over_is_too_large() -> None:
    body = b'{"tags": {"ds-a": []}}'
    assert parse_body(body, len(body)) == {"tags": {"ds-a": []}}
    with pytest.raises(RequestProblem) as excinfo:
        parse_body(body, len(body) - 1)
    assert problem_of(excinfo) == Reason.BODY_TOO_LARGE


def test_extract_reports_a_too_large_body_before_parsing_it() -> None:
    r = rule("b", "/b", POST, DataSourceRef("body", "/tags", "keys"))
    with pytest.raises(RequestProblem) as excinfo:
        extract_data_sources(r, {}, "", b"not json at all", 4)
    assert problem_of(excinfo) == Reason.BODY_TOO_LARGE


def test_extract_does_not_read_the_body_for_path_only_rules() -> None:
    r = rule("p", "/t/{dsn}", GET, DataSourceRef("path", "dsn"))
    assert extract_data_sources(r, {"dsn": "ds-a"}, "", b"not json", 1) == ("ds-a",)


# -- resolve_pointer -----------------------------------------------------------------------

DOC = {
    "a/b": 1,
    "m~n": 2,
    "~1": 3,
    "list": ["zero", "one"],
    "nested": {"deep": {"x": "y"}},
}


@pytest.mark.parametrize(
    ("pointer", "value"),
    [
        ("", DOC),
        ("/a~1b", 1),
        ("/m~0n", 2),
        ("/~01", 3),  # ~0 then 1: the key "~1", not "/"
        ("/list/0", "zero"),
        ("/list/1", "one"),
        ("/nested/deep/x", "y"),
    ],
)
def test_resolve_pointer_follows_rfc_6901(pointer: str, value: object) -> None:
    assert resolve_pointer(DOC, pointer) == value


@pytest.mark.parametrize(
    "pointer", ["/missing", "/list/2", "/list/-1", "/list/x", "/nested/deep/x/y", "/a/b"]
)
def test_resolve_pointer_refuses_what_is_not_there(pointer: str) -> None:
    with pytest.raises(RequestProblem) as excinfo:
        resolve_pointer(DOC, pointer)
    assert problem_of(excinfo) == Reason.BODY_INVALID


def test_resolve_pointer_slash_names_the_empty_key() -> None:
    assert resolve_pointer({"": "empty-key", "a": 1}, "/") == "empty-key"


def test_resolve_pointer_refuses_a_non_ascii_digit_index() -> None:
    with pytest.raises(RequestProblem):
        resolve_pointer(["zero", "one", "two"], "/\u00b2")
