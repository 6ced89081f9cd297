"""No import cycle among weightlab's own modules (``weightlab/``, ``registry/``, ``kernels/``, ``alembic/``).

Every module is parsed with ``ast`` (nothing is imported), and every ``import``/``from ... import`` of a project
module is an edge, including those inside functions (lazy imports run too, just later). Not edges: imports under
``if TYPE_CHECKING:`` (never run), and the parent packages a dotted import runs first (a package's ``__init__``
that re-exports its submodules would otherwise form a cycle with each of them). A cycle is reported with the file
and line of each import in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name (pyproject's package-dir mapping)
PACKAGES = {"weightlab": "weightlab", "registry": "weightlab.registry", "kernels": "weightlab.kernels",
            "alembic": "weightlab.registry.migrations"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines of ``if TYPE_CHECKING:`` bodies."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(module: str, source: str, *, is_package: bool, known: set[str]) -> dict[str, int]:
    """The project modules ``module`` imports (``known``: every project module) -> line of the first such import."""

    def project(name: str) -> str | None:  # the longest prefix of ``name`` that is a project module
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    tree = ast.parse(source)
    skip = _type_checking_lines(tree)
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: ``from .x import y`` in package ``p`` is ``p.x``
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import name``: the submodule ``pkg.name`` if there is one, else ``pkg`` itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in filter(None, map(project, targets)):
            if target != module:
                found.setdefault(target, node.lineno)
    return found


def _graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    known = set(modules)
    return {module: _imports(module, path.read_text(), is_package=path.name == "__init__.py", known=known)
            for module, path in modules.items()}


def _components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each module in one reaches every other."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start = min(component)
    paths, seen = [[start]], {start}
    while True:
        path = paths.pop(0)
        nxt = [w for w in sorted(graph[path[-1]]) if w in component]
        if start in nxt:
            return path + [start]
        for w in nxt:
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])


def _describe(component: set[str], graph, modules) -> str:
    """A shortest cycle of the component, with the file and line of each import, then all its modules."""
    cycle = _cycle(graph, component)
    steps = [f"  {a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n".join([" -> ".join(cycle), *steps, f"  (all {len(component)} modules that import each other: "
                                                   f"{', '.join(sorted(component))})"])


def test_the_walker_sees_lazy_imports_and_skips_type_checking_ones():
    # The walker itself can fail: check it on a module written here, and the cycle finder on a known graph.
    source = """
from typing import TYPE_CHECKING
from p import a
from p.b import thing
from . import c
if TYPE_CHECKING:
    from p import d
def f():
    import p.e.deep
"""
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e", "p.m"}
    assert _imports("p.m", source, is_package=False, known=known) == {"p.a": 3, "p.b": 4, "p.c": 5, "p.e": 9}
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "b": 3}, "d": {"a": 4}}
    assert _components(graph) == [{"a", "b", "c"}] and _cycle(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert _components({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    modules = _modules()
    graph = _graph(modules)
    components = _components(graph)
    report = "\n\n".join(_describe(c, graph, modules) for c in components)
    print(report)
    assert not components, f"{len(components)} group(s) of weightlab modules import each other:\n\n{report}"
