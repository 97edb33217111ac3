"""House rules for the source tree: imports run one way, modules stay small.

Every module of ``batch_job/`` and ``submitter/`` is parsed with :mod:`ast` (nothing is imported,
so this runs without torch or boto3) and every import counts: top level, inside functions and
under ``if TYPE_CHECKING:`` (a circle that only type checkers see is still a circle a reader has
to untangle, and turns into a real one the day the import moves out of the guard). Relative
imports are resolved, and ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. Importing ``pkg.sub`` is an edge to ``pkg.sub`` only, not to ``pkg``'s
``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("batch_job", "submitter")
MAX_LINES = 600


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of :data:`PACKAGES`."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``(imported module, names taken from it)`` for every import statement of ``path``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, tuple(alias.name for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (only edges inside :data:`PACKAGES`)."""
    modules = _module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        for target, names in _imported_names(module, path):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:
                graph[module].update(submodules)
            if target in modules and (not names or len(submodules) < len(names)):
                graph[module].add(target)  # ``import pkg.mod`` or names defined in ``pkg``
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per strongly connected component that has a cycle.

    Breaking the reported cycle may leave others in the same component: the failure message lists
    the component's members too, and the test is simply run again."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph[start]:
            continue
        cycles.append(_path_back(graph, start, component))
    return sorted(cycles)


def tangled_components(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each module on a cycle -> every module it shares a cycle with (itself included)."""
    reach = {node: _reachable(graph, node) for node in graph}
    return {node: {other for other in reach[node] if node in reach[other]} for node in graph if node in reach[node]}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def _path_back(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
    """Shortest path ``start -> ... -> start`` inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path back was found")  # pragma: no cover


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    tangled = tangled_components(graph)
    assert not cycles, "import cycles (TYPE_CHECKING and function-level imports count):\n" + "\n".join(
        f"  {' -> '.join(cycle)}\n    (all modules on cycles with it: {', '.join(sorted(tangled[cycle[0]]))})"
        for cycle in cycles
    )


def test_no_module_over_the_line_limit() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in _module_files().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch) -> None:
    """The parser itself: relative, ``from pkg import module``, function-level, TYPE_CHECKING."""
    pkg = tmp_path / "batch_job"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "submitter").mkdir()
    files = {
        "batch_job/__init__.py": "",
        "batch_job/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from batch_job.sub import b\n",
        "batch_job/sub/__init__.py": "from . import b\n",
        "batch_job/sub/b.py": "def f():\n    from ..c import thing\n",
        "batch_job/c.py": "import batch_job.a\nfrom batch_job.sub import helper\n",
        "submitter/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["batch_job.a"] == {"batch_job.sub.b"}
    assert graph["batch_job.sub"] == {"batch_job.sub.b"}
    assert graph["batch_job.sub.b"] == {"batch_job.c"}
    assert graph["batch_job.c"] == {"batch_job.a", "batch_job.sub"}
    assert find_cycles(graph) == [["batch_job.a", "batch_job.sub.b", "batch_job.c", "batch_job.a"]]
