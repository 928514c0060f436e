"""The host's modules import each other in layers, never in a circle.

Why: a cycle means no module in it can be read, tested or moved alone, and a
function-level import that dodges one only hides it. So every import counts
here, at module level or inside a function; only `if TYPE_CHECKING:` imports
(which never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanoclaw", "workers")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` loads: itself, or its nearest package that exists."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                # `from pkg import sub` loads pkg.sub when that is a module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                dep = _resolve(t, modules)
                if dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Iterative DFS, colours white/grey/black."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        its = [iter(sorted(graph[start]))]
        state[start] = 1
        while its:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(sorted(graph[nxt])))
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every component of more than one module (Tarjan, iterative enough for ~80 nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "nanoclaw.db.store" in graph["nanoclaw.approvals.requests"]
    assert "nanoclaw.delivery.delivery" in graph["workers.delivery"]
    assert "nanoclaw.util" in graph["nanoclaw.agents.mounts"]  # a function-level import counts


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        comps = "\n".join("  " + ", ".join(c) for c in strongly_connected(graph))
        print("cycle:", " -> ".join(cycle))
        print("components:\n" + comps)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\ncomponents:\n" + comps


def layer_of(mod: str) -> int | None:
    """Index in `nanoclaw.LAYERS` of a nanoclaw module; None outside the package."""
    from nanoclaw import LAYERS

    parts = mod.split(".")
    if parts[0] != "nanoclaw":
        return None
    folder = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    assert folder in LAYERS, f"{mod}: folder {folder!r} is not in nanoclaw.LAYERS"
    return LAYERS.index(folder)


def layer_breaks(graph: dict[str, set[str]]) -> list[str]:
    from nanoclaw import LAYERS

    out = []
    for mod, deps in graph.items():
        here = layer_of(mod)
        if here is None or mod == "nanoclaw.__main__":  # the entry point: `python -m nanoclaw`
            continue
        for dep in deps:
            there = layer_of(dep)
            if there is None:
                out.append(f"{mod} imports {dep}, outside the package")
            elif there > here:
                out.append(f"{mod} ({LAYERS[here] or 'core'}) imports {dep}"
                           f" ({LAYERS[there] or 'core'}), a folder listed below it")
    return sorted(out)


def test_a_folder_imports_only_the_folders_above_it():
    assert layer_breaks(import_graph()) == []


def test_the_layer_rule_catches_an_import_upward():
    graph = import_graph()
    graph["nanoclaw.db.store"] = graph["nanoclaw.db.store"] | {"nanoclaw.routing.router"}
    graph["nanoclaw.util"] = graph["nanoclaw.util"] | {"workers"}
    breaks = layer_breaks(graph)
    assert any(b.startswith("nanoclaw.db.store (db) imports nanoclaw.routing.router") for b in breaks)
    assert "nanoclaw.util imports workers, outside the package" in breaks
