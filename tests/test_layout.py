"""The layout of meshrun's modules: no import cycles, deferred (in-function) imports included.

Every ``meshrun/*.py`` is parsed with ``ast``; every import of another meshrun module (``from . import x``,
``from .x import y``, ``import meshrun.x``, at module level, inside a function or under ``if TYPE_CHECKING:``)
is an edge: a type-only import still ties two modules together. A cycle fails the test and is printed, edge by
edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "meshrun"


def imports_of(path: Path, modules: set[str]) -> dict[str, int]:
    """The meshrun modules ``path`` imports, each with the line of its first import."""
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name in modules and name != path.stem:
            found.setdefault(name, line)

    class Visitor(ast.NodeVisitor):
        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "meshrun"):
                parts = (node.module or "").split(".")
                if node.level == 0:
                    parts = parts[1:]
                if parts and parts[0]:
                    add(parts[0], node.lineno)
                else:  # from . import _x  /  from meshrun import _x
                    for a in node.names:
                        add(a.name, node.lineno)

        def visit_Import(self, node: ast.Import) -> None:
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "meshrun" and len(parts) > 1:
                    add(parts[1], node.lineno)

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports_of(p, set(files)) for name, p in sorted(files.items())}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # a shortest closed path through the component's first module
        start, members = comp[0], set(comp)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or comp)
    return cycles


def test_the_graph_sees_every_kind_of_import(tmp_path):
    (tmp_path / "_a.py").write_text("from . import _b\n")
    (tmp_path / "_b.py").write_text("def f():\n    from ._c import x\n")
    (tmp_path / "_c.py").write_text("import meshrun._a\nfrom typing import TYPE_CHECKING\n"
                                    "if TYPE_CHECKING:\n    from ._d import y\n")
    (tmp_path / "_d.py").write_text("z = 1\n")
    mods = {"_a", "_b", "_c", "_d"}
    graph = {p.stem: imports_of(p, mods) for p in tmp_path.glob("*.py")}
    assert set(graph["_a"]) == {"_b"} and set(graph["_b"]) == {"_c"}
    assert set(graph["_c"]) == {"_a", "_d"}  # a type-only import is an edge too
    assert find_cycles(graph) == [["_a", "_b", "_c", "_a"]]


def test_no_import_cycles_among_meshrun_modules():
    graph = import_graph()
    assert len(graph) > 20 and "_attempts" in graph
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        steps = [f"{a} -> {b} (meshrun/{a}.py:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        lines.append("import cycle: " + "; ".join(steps))
    assert not cycles, "\n".join(lines)
