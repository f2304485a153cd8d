"""jaxpref's import graph, read from the source (every import, function-local ones included): no cycles,
the kernels at the bottom, no CLI importing another CLI (docs/design.md "Module map")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxpref"
CLIS = {"jaxpref.train", "jaxpref.preprocess", "jaxpref.teacher"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxpref modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 80 and graph["jaxpref.train"]  # the source was read
    # A package's __init__ importing its own submodules (and they importing siblings through it) is
    # Python's usual layout, not a cycle between modules: drop a package's edges to itself.
    flat = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert cycles(flat) == []


def test_kernels_are_at_the_bottom_and_clis_are_thin():
    graph = import_graph()
    for module, deps in graph.items():
        outside = {d for d in deps if not d.startswith(("jaxpref.losses", "jaxpref.pallas"))}
        if module.startswith("jaxpref.losses"):
            assert not outside, (module, outside)  # losses import only pallas (and themselves)
        if module.startswith("jaxpref.pallas"):
            assert outside <= {"jaxpref.platform"} and not any(d.startswith("jaxpref.losses") for d in deps), module
    assert _reach(graph, "jaxpref.platform") <= {"jaxpref.errors"}
    for cli in CLIS:
        assert not (_reach(graph, cli) & (CLIS - {cli})), f"{cli} imports another CLI"


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    """The reader is not blind: a cycle made of a function-local import is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    assert "jaxpref.pallas.linear_lse.api" in import_graph()["jaxpref.pallas.linear_lse"]  # relative import
    assert "jaxpref.reference_pass" in import_graph()["jaxpref.assembly"]  # imported inside a function
