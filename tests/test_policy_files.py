"""Policy files (policyd/core/policy.py): the format, and each validation problem with its place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policyd.core.model import Access
from policyd.core.policy import PolicyInvalid, Problem, fingerprint, load_policy, version_of
from policyd.core.routes import BUILTIN_RULES, DataSourceRef, split_path
from tests.helpers import ROOT

HEADER = """\
apiVersion: policyd/v1
scopes:
  - {name: DataRead, description: Read data, dataSources: true}
  - {name: DataWrite, description: Write data, dataSources: true}
  - {name: UserInfo, description: Who you are}
"""


def write(folder: Path, text: str, name: str = "policy.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(folder: Path) -> list[Problem]:
    with pytest.raises(PolicyInvalid) as info:
        load_policy(folder)
    return info.value.problems


def only_problem(folder: Path) -> Problem:
    problems = problems_of(folder)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# -- what loads ------------------------------------------------------------------------------


def test_default_policy_loads_with_every_builtin_rule_unchanged_plus_annotations() -> None:
    policy = load_policy(ROOT / "policies")
    rules = {r.id: r for r in policy.rules}
    for builtin in BUILTIN_RULES:
        rule = rules.pop(builtin.id)
        assert rule == builtin, builtin.id  # same methods, path, action, scopes, access, refs
    assert sorted(rules) == ["annotations-create", "annotations-delete", "annotations-list"]
    assert set(policy.scopes) == {"UserInfo", "DataRead", "DataWrite", "AccountDebit"}
    assert policy.scopes["DataRead"].data_sources and not policy.scopes["UserInfo"].data_sources
    assert policy.scopes["DataRead"].description
    assert policy.version.startswith("sha256:")
    assert policy.locations["tags-search"].startswith(f"{ROOT / 'policies' / 'hub.yaml'}:")


def test_snapshot_read_takes_its_data_sources_from_the_keys_of_the_tags_object() -> None:
    policy = load_policy(ROOT / "policies")
    match = policy.routes.match("POST", split_path("/api/data/v2/snapshot"))
    assert match is not None
    assert match.rule.data_sources == (DataSourceRef("body", "/tags", "keys"),)
    assert match.rule.access is Access.READ
    assert match.rule.scopes_all == {"DataRead"}


def test_write_routes_carry_the_safety_condition_and_reads_carry_none() -> None:
    policy = load_policy(ROOT / "policies")
    with_conditions = {r.id for r in policy.rules if r.conditions}
    assert with_conditions == {
        "values-write-snapshot",
        "values-write-history",
        "annotations-create",
        "annotations-delete",
    }


def test_every_field_of_the_format_is_read(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + """\
routes:
  - id: multi
    description: all the options at once
    methods: [GET, HEAD]
    path: /api/m/{dsn}
    action: m.read
    scopes: {allOf: [DataRead], anyOf: [UserInfo, DataWrite]}
    access: read
    dataSources:
      - {in: path, name: dsn}
      - {in: query, name: also}
      - {in: body, pointer: /sources, shape: items}
      - {in: body, pointer: /one}
  - id: listing
    methods: GET
    path: /api/list
    action: list
    scopes: [DataRead]
    access: write
    dataSources: granted
  - id: open
    methods: GET
    path: /
    action: root
    public: true
conditions:
  - id: only-alice
    description: a test
    effect: allow
    routes: [multi]
    when: principal.sub == "alice"
""",
    )
    policy = load_policy(tmp_path)
    rules = {r.id: r for r in policy.rules}
    multi = rules["multi"]
    assert multi.methods == {"GET", "HEAD"}
    assert multi.scopes_all == {"DataRead"} and multi.scopes_any == {"UserInfo", "DataWrite"}
    assert multi.data_sources == (
        DataSourceRef("path", "dsn"),
        DataSourceRef("query", "also"),
        DataSourceRef("body", "/sources", "items"),
        DataSourceRef("body", "/one", "value"),
    )
    assert [c.id for c in multi.conditions] == ["only-alice"]
    assert rules["listing"].lists_granted and rules["listing"].access is Access.WRITE
    assert rules["open"].public and policy.routes.match("GET", []) is not None


def test_rules_of_several_files_make_one_policy(tmp_path: Path) -> None:
    write(tmp_path, HEADER, "a.yaml")
    write(
        tmp_path,
        "apiVersion: policyd/v1\nroutes:\n"
        "  - {id: me, methods: GET, path: /me, action: me, scopes: [UserInfo]}\n",
        "b.yml",
    )
    write(tmp_path, "not: even a policy", "b_test.yaml")  # suites are not policy files
    policy = load_policy(tmp_path)
    assert [r.id for r in policy.rules] == ["me"]
    assert [Path(f).name for f in policy.files] == ["a.yaml", "b.yml"]


def test_version_is_a_hash_of_the_files_contents(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER)
    first = load_policy(tmp_path).version
    assert load_policy(tmp_path).version == first == fingerprint(tmp_path)
    path.write_text(HEADER + "# a comment is a change too\n")
    assert load_policy(tmp_path).version != first
    assert version_of([("x/a.yaml", b"1")]) == version_of([("y/a.yaml", b"1")])
    assert version_of([("a.yaml", b"1")]) != version_of([("b.yaml", b"1")])


# -- problems: file, line, column and what is wrong ---------------------------------------


def test_every_problem_is_reported_at_once_with_file_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + """\
routes:
  - id: r1
    methods: [GET]
    path: /api/x/{dsn}
    action: x.get
    scopes: [DataRed]
    access: read
    dataSources: [{in: path, name: dsn}]
  - id: r1
    methods: GET
    path: /api/y
    action: y
    color: blue
conditions:
  - id: c1
    effect: deny
    when: request.method ==
""",
    )
    got = [str(p) for p in problems_of(tmp_path)]
    assert got == [
        f"{path}:11:14: route r1: undefined scope 'DataRed' (defined: DataRead, DataWrite,"
        " UserInfo)",
        f"{path}:14:9: duplicate route id r1 (first defined at {path}:7:9)",
        f"{path}:18:5: route: unknown field 'color' (fields: id, methods, path, action,"
        " description, scopes, access, dataSources, public)",
        f"{path}:22:26: condition c1: syntax error: the expression ends too early",
    ]


@pytest.mark.parametrize(
    ("route", "column", "message"),
    [
        ("path: api/x", 11, "path template 'api/x' must start with '/'"),
        ("path: /api//x", 11, "has an empty segment"),
        ("path: /api/x/", 11, "has an empty segment"),
        ("path: /api/../x", 11, "has a dot segment"),
        ("path: /api/x{dsn}", 11, "a parameter must be a whole segment"),
        ("path: /api/{dsn}/{dsn}", 11, "names the parameter {dsn} twice"),
        ("path: /api/a%2Fb", 11, "is not allowed"),
        ("path: '/api/a b'", 11, "is not allowed"),
    ],
)
def test_bad_path_templates_are_refused(
    tmp_path: Path, route: str, column: int, message: str
) -> None:
    write(
        tmp_path,
        HEADER + f"routes:\n  - id: r\n    methods: GET\n    {route}\n    action: a\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.line, problem.column) == (9, column)
    assert message in problem.message


def test_two_rules_for_the_same_method_and_path_are_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + """\
routes:
  - {id: one, methods: [GET, PUT], path: "/x/{dsn}", action: one}
  - {id: two, methods: [PUT, POST], path: "/x/{name}", action: two}
  - {id: fine, methods: [DELETE], path: "/x/{dsn}", action: three}
""",
    )
    problems = problems_of(tmp_path)
    messages = [p.message for p in problems]
    assert any("rules one and two both match PUT /x/{name}" in m for m in messages), messages
    assert any("{name} of rule two is {dsn} in rule one" in m for m in messages), messages
    assert all(p.line == 8 for p in problems)


def test_overlapping_templates_where_neither_is_more_specific_are_ambiguous(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        HEADER
        + """\
routes:
  - {id: left, methods: GET, path: "/a/{x}/c", action: left}
  - {id: right, methods: GET, path: "/a/b/{x}", action: right}
""",
    )
    problem = only_problem(tmp_path)
    assert (problem.line, problem.column) == (8, 10)
    assert problem.message.startswith(
        "rules left (/a/{x}/c) and right (/a/b/{x}) both match GET /a/b/c"
        " and neither is more specific"
    )


def test_a_more_specific_template_is_not_ambiguous_and_wins(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + """\
routes:
  - {id: general, methods: GET, path: "/t/{dsn}/{tag}", action: general}
  - {id: special, methods: GET, path: "/t/{dsn}/latest", action: special}
  - {id: other-method, methods: POST, path: "/t/b/{tag}", action: post}
""",
    )
    routes = load_policy(tmp_path).routes
    special = routes.match("GET", ["t", "ds-a", "latest"])
    general = routes.match("GET", ["t", "ds-a", "t1"])
    assert special is not None and special.rule.id == "special"
    assert general is not None and general.rule.id == "general"


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("apiVersion: policyd/v2\n", 1, 13, "apiVersion must be policyd/v1, not 'policyd/v2'"),
        ("scopes: []\n", 1, 1, "policy file: missing field 'apiVersion'"),
        ("apiVersion: policyd/v1\nrules: []\n", 2, 1, "unknown field 'rules'"),
        ("apiVersion: policyd/v1\napiVersion: policyd/v1\n", 2, 1, "duplicate field"),
        ("apiVersion: policyd/v1\nroutes: {}\n", 2, 9, "routes must be a list"),
        ("- 1\n- 2\n", 1, 1, "policy file must be a mapping"),
        ("apiVersion: [policyd/v1\n", 2, 1, "not valid YAML"),
        ("", 1, 1, "the file is empty"),
        ("a: 1\n---\nb: 2\n", 2, 1, "not valid YAML: but found another document"),
    ],
)
def test_file_level_problems(
    tmp_path: Path, text: str, line: int, column: int, message: str
) -> None:
    write(tmp_path, text)
    problem = only_problem(tmp_path)
    assert (problem.line, problem.column) == (line, column), problem
    assert message in problem.message


def test_a_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "p.yaml").write_bytes(b"apiVersion: \xff\n")
    assert "not UTF-8" in only_problem(tmp_path).message


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("methods: [GET, FETCH]", "unknown method 'FETCH'"),
        ("methods: [GET, GET]", "method GET is listed twice"),
        ("methods: [get]", "unknown method 'get'"),
        ("methods: GET\n    public: yes please", "public must be true or false"),
        ("methods: GET\n    scopes: [Nope]", "undefined scope 'Nope'"),
        ("methods: GET\n    scopes: {oneOf: [DataRead]}", "unknown field 'oneOf'"),
        ("methods: GET\n    access: read", "access needs dataSources"),
        ("methods: GET\n    access: admin", "access must be one of read, write"),
        (
            "methods: GET\n    dataSources: [{in: path, name: dsn}]",
            "dataSources needs access",
        ),
        (
            "methods: GET\n    access: read\n    dataSources: [{in: path, name: nope}]",
            "has no parameter {nope}",
        ),
        (
            "methods: GET\n    access: read\n    dataSources: [{in: body, name: x}]",
            "'in: body' takes a pointer",
        ),
        (
            "methods: GET\n    access: read\n    dataSources: [{in: body, pointer: tags}]",
            "must be empty or start with '/'",
        ),
        (
            "methods: GET\n    access: read\n    dataSources: [{in: body, pointer: /a~2}]",
            "'~' in a JSON pointer",
        ),
        (
            "methods: GET\n    access: read\n    dataSources: [{in: header, name: x}]",
            "in must be one of path, query, body",
        ),
        (
            "methods: GET\n    access: read\n"
            "    dataSources: [{in: body, pointer: /t, shape: all}]",
            "shape must be one of keys, items, value",
        ),
        ("methods: GET\n    access: read\n    dataSources: everything", "must be one of granted"),
        (
            "methods: GET\n    public: true\n    scopes: [DataRead]",
            "a public route needs no token, so no scopes",
        ),
        (
            "methods: GET\n    scopes: [UserInfo]\n    access: read\n    dataSources: granted",
            "none of its scopes has dataSources: true",
        ),
    ],
)
def test_route_problems(tmp_path: Path, route: str, message: str) -> None:
    write(
        tmp_path,
        HEADER + f"routes:\n  - id: r\n    path: /api/{{dsn}}\n    action: a\n    {route}\n",
    )
    messages = [p.message for p in problems_of(tmp_path)]
    assert any(message in m for m in messages), messages


def test_a_route_may_not_take_the_built_in_connector_attach_action(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER + "routes:\n  - id: r\n    path: /api/x\n    action: connector.attach\n"
        "    methods: GET\n",
    )
    messages = [p.message for p in problems_of(tmp_path)]
    assert any("action connector.attach is built in" in m for m in messages), messages


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("{name: A}", "scope: missing field 'description'"),
        ("{name: A, description: x, dataSources: 1}", "dataSources must be true or false"),
        ("{name: 'has space', description: x}", "is not a valid name"),
        ("{name: A, description: ''}", "scope description must not be empty"),
        ("{name: DataRead, description: again}", "scope DataRead is already defined at"),
    ],
)
def test_scope_problems(tmp_path: Path, scope: str, message: str) -> None:
    write(tmp_path, HEADER + f"  - {scope}\n")
    problem = only_problem(tmp_path)
    assert message in problem.message
    assert problem.line == 6


@pytest.mark.parametrize(
    ("when", "column", "message"),
    [
        ("principal.sub ==", 15, "syntax error: the expression ends too early"),
        ("principal.sub == 'a' &&& true", 24, "syntax error at '& true'"),
        ("user.name == 'a'", 1, "undefined variable 'user'"),
        ("principal.sub.split(',')", 15, "unknown function 'split'"),
        ("'unterminated", 1, "syntax error"),
    ],
)
def test_cel_that_does_not_compile_is_reported_where_it_fails(
    tmp_path: Path, when: str, column: int, message: str
) -> None:
    write(
        tmp_path,
        HEADER
        + "routes:\n  - {id: r, methods: GET, path: /r, action: r, scopes: [UserInfo]}\n"
        + f'conditions:\n  - id: c\n    effect: deny\n    when: "{when}"\n',
    )
    problem = only_problem(tmp_path)
    assert message in problem.message
    # The expression starts in column 12 of its line, after `    when: "`.
    assert (problem.line, problem.column) == (11, 11 + column)


def test_cel_error_in_a_block_scalar_points_into_the_block(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + "routes:\n  - {id: r, methods: GET, path: /r, action: r, scopes: [UserInfo]}\n"
        + "conditions:\n  - id: c\n    effect: deny\n    when: |\n"
        + "      principal.sub == 'a' &&\n      nobody.knows\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.line, problem.column) == (13, 7)
    assert "undefined variable 'nobody'" in problem.message


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("routes: [ghost]", "condition c: no route 'ghost'"),
        ("routes: [open]", "route open is public"),
        ("routes: []", "routes is empty"),
    ],
)
def test_condition_selection_problems(tmp_path: Path, condition: str, message: str) -> None:
    write(
        tmp_path,
        HEADER
        + "routes:\n  - {id: r, methods: GET, path: /r, action: r, scopes: [UserInfo]}\n"
        + "  - {id: open, methods: GET, path: /open, action: o, public: true}\n"
        + f"conditions:\n  - id: c\n    effect: deny\n    when: 'true'\n    {condition}\n",
    )
    assert message in only_problem(tmp_path).message


def test_condition_on_data_sources_for_a_route_without_them_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + "routes:\n  - {id: me, methods: GET, path: /me, action: me, scopes: [UserInfo]}\n"
        + "conditions:\n  - id: c\n    effect: deny\n    routes: [me]\n"
        + "    when: data_source.name == 'x'\n",
    )
    problem = only_problem(tmp_path)
    assert problem.message == "condition c uses data_source, but route me names no data sources"
    assert (problem.line, problem.column) == (11, 14)


def test_duplicate_condition_ids_are_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        HEADER
        + "conditions:\n  - {id: c, effect: deny, when: 'false'}\n"
        + "  - {id: c, effect: allow, when: 'true'}\n",
    )
    assert "duplicate condition id c" in only_problem(tmp_path).message


def test_missing_or_empty_folder_is_refused(tmp_path: Path) -> None:
    assert "does not exist" in only_problem(tmp_path / "nope").message
    (tmp_path / "empty").mkdir()
    assert "has no policy files" in only_problem(tmp_path / "empty").message
    assert fingerprint(tmp_path / "nope") == ""
