"""No import circles: between modules of policyd and adapters, nor between their packages.

`make lint` checks the import directions (import-linter's contracts in pyproject.toml); this
checks what a layers contract cannot see: two modules of one package importing each other
(TYPE_CHECKING imports included). Uses grimp, import-linter's import graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

import grimp


def _graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("policyd", "adapters", cache_dir=None)
    ours = {m for m in graph.modules if m.split(".")[0] in ("policyd", "adapters")}
    return {m: graph.find_modules_directly_imported_by(m) & ours for m in ours}


def _circles(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _package(module: str, packages: Set[str]) -> str:
    """The package a module belongs to (a package's __init__ is the package itself)."""
    if module in packages or module.count(".") <= 1:
        return module
    return module.rsplit(".", 1)[0]


def test_no_module_imports_itself_through_others() -> None:
    assert _circles(_graph()) == []


def test_no_package_imports_itself_through_others() -> None:
    edges = _graph()
    packages = {m.rsplit(".", 1)[0] for m in edges if "." in m}
    between: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            pa, pb = _package(a, packages), _package(b, packages)
            # a package and the packages inside it (its __init__ importing its modules)
            if pa == pb or pb.startswith(pa + ".") or pa.startswith(pb + "."):
                continue
            between.setdefault(pa, set()).add(pb)
    assert _circles(between) == []


def test_the_checks_see_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
