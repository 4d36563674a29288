"""The package's structure: no import circles, counting imports inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "geoindex"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (top level, functions, TYPE_CHECKING
    excepted: those never run). `from .x import name` counts as importing `x.name` when that is a module, and
    importing a module inside a package counts as importing the package."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            for target in targets:
                # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are imports too (the root package
                # excepted, which imports nothing until a name is first used).
                # A module's own packages are already running when it is imported: no edge to them for that.
                parts = target.split(".")
                implied = [".".join(parts[:depth]) for depth in range(2, len(parts))]
                for module in [m for m in implied if not name.startswith(m + ".")] + [target]:
                    if module in files and module != name:
                        graph[name].add(module)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each with one circle through it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def a_circle(graph, component) -> list[str]:
    """One concrete circle inside a strongly connected component, for the failure message."""
    members, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        nxt = next((w for w in sorted(graph[path[-1]]) if w in members and w not in seen), None)
        back = start in graph[path[-1]]
        if back and len(path) > 1:
            return path + [start]
        if nxt is None:
            # Dead end: fall back to a breadth-first search for the shortest way back to start.
            from collections import deque
            queue, parent = deque([start]), {start: None}
            while queue:
                v = queue.popleft()
                for w in sorted(graph[v]):
                    if w == start and v != start:
                        out = [v]
                        while parent[out[-1]] is not None:
                            out.append(parent[out[-1]])
                        return list(reversed(out)) + [start]
                    if w in members and w not in parent:
                        parent[w] = v
                        queue.append(w)
            return component
        path.append(nxt)
        seen.add(nxt)


def test_the_cycle_finder_sees_a_function_local_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert a_circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    assert "geoindex.backbones" in graph and graph["geoindex.cli"], "the import graph came out empty"
    cycles = find_cycles(graph)
    message = "\n".join(" -> ".join(a_circle(graph, c)) + f"   (all of: {', '.join(c)})" for c in cycles)
    assert not cycles, "import circles in geoindex/:\n" + message


def exception_classes() -> dict[str, list[str]]:
    """Module -> the exception classes it defines (a class whose base's name ends in Error, Exception or one of
    the package's own exceptions)."""
    found: dict[str, list[str]] = {}
    known = {"Exception", "GeoindexError", "RuntimeError", "ValueError"}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                if bases & known or any(b.endswith(("Error", "Exception")) for b in bases):
                    found.setdefault(module_name(path), []).append(node.name)
    return found


def test_every_exception_class_is_in_errors_py():
    """The library's exceptions are in geoindex.errors; the service keeps its HTTP answers and control-flow
    signals (status codes, a client gone, a full queue), which never reach a library user."""
    import geoindex.integrity
    import geoindex.locks
    from geoindex import errors

    elsewhere = {module: names for module, names in exception_classes().items()
                 if module != "geoindex.errors" and not module.startswith("geoindex.serve")}
    assert not elsewhere, f"exception classes outside geoindex/errors.py: {elsewhere}"
    assert "NotFittedError" in exception_classes()["geoindex.errors"]
    # Where they were first raised they can still be imported from.
    assert geoindex.locks.IndexBusy is errors.IndexBusy and geoindex.integrity.IndexCorrupt is errors.IndexCorrupt


def test_index_file_names_are_written_only_in_layout_py():
    """Every file name of an index is a constant of geoindex.layout; no other module spells one out."""
    from geoindex import layout

    names = {value for value in vars(layout).values() if isinstance(value, str) and "." in value}
    names |= {str(value) for value in vars(layout).values() if hasattr(value, "parts")}
    names.discard(layout.TUNED_WEIGHTS)  # "backbone.pt" is also the name of weight files outside any index
    allowed = {"geoindex.layout"}
    spelt = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelt.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not spelt, "index file names spelt outside geoindex/layout.py:\n" + "\n".join(spelt)
