"""The house's rules, read off the code: one import name, rooms that import only downhill, no circle.

The contract (tasks/__init__.py): core < embed < ingest < index < queue < answer < service < ops.
A module of a room may import its own room and the rooms below it, never one above, nor the flows
or the testing package; and no module imports one that imports it back, inside a room or across
the package. Imports inside functions count (they were how import circles hid).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ROOMS = ["core", "embed", "ingest", "index", "queue", "answer", "service", "ops"]


def import_statements(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """Each import of a file at any depth of its code: (the module, the names taken from it), with
    relative imports made absolute against ``package``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def imported(path: Path) -> set[str]:
    """Every module a file of tasks/ imports, and every name it takes from one (as ``module.name``)."""
    package = "docsrag.tasks." + ".".join(path.relative_to(ROOT / "tasks").with_suffix("").parts[:-1])
    return {found for base, names in import_statements(path, package)
            for found in (base, *(f"{base}.{name}" for name in names))}


def room_modules() -> list[tuple[str, Path]]:
    return [(path.relative_to(ROOT / "tasks").parts[0], path) for path in sorted((ROOT / "tasks").glob("*/*.py"))]


def test_every_module_of_tasks_lives_in_a_room_of_the_contract():
    assert {path.name for path in (ROOT / "tasks").glob("*.py")} == {"__init__.py"}
    assert {room for room, _ in room_modules()} == set(ROOMS)


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_imports_only_itself_and_the_rooms_below(room):
    above = {f"docsrag.tasks.{other}" for other in ROOMS[ROOMS.index(room) + 1:]} | {"docsrag.flows", "docsrag.testing"}
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for here, path in room_modules() if here == room
             for name in imported(path) if any(name == top or name.startswith(top + ".") for top in above)}
    assert not wrong, sorted(wrong)


def test_nothing_imports_the_old_top_level_names():
    """`tasks` and `flows` are folders of the checkout, not import names: an invoke tasks.py or a
    Celery tasks/ package in the user's folder would shadow them."""
    wrong = []
    for folder in ("tasks", "flows", "docsrag", "tests", "bench", "infra"):
        for path in (ROOT / folder).rglob("*.py"):
            names = imported(path) if folder == "tasks" else _absolute_imports(path)
            wrong += [f"{path.relative_to(ROOT)}: {name}" for name in names
                      if name.split(".")[0] in ("tasks", "flows")]
    assert not wrong, wrong


def test_benchmarks_share_the_package_not_the_tests():
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / "bench").rglob("*.py")
             for name in _absolute_imports(path) if name.split(".")[0] == "tests"]
    assert not wrong, wrong


PACKAGE = {"docsrag.tasks": ROOT / "tasks", "docsrag.flows": ROOT / "flows", "docsrag": ROOT / "docsrag"}


def package_modules() -> dict[str, Path]:
    """Every module of the package by its import name; a package by its ``__init__.py``."""
    found = {}
    for prefix, folder in PACKAGE.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found.setdefault(".".join((prefix, *parts)), path)  # docsrag/ has no tasks/ nor flows/ of its own
    return found


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, at any depth of its code. ``from a import b``
    is an edge to ``a.b`` where that is a module, else to ``a`` (a name its ``__init__`` defines)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = {base for base, names in import_statements(path, package) if not names}
    targets |= {f"{base}.{n}" if f"{base}.{n}" in modules else base
                for base, names in import_statements(path, package) for n in names}
    return {_nearest_module(target, modules) for target in targets} - {"", name}


def _nearest_module(name: str, modules: dict[str, Path]) -> str:
    while name and name not in modules:  # `import a.b.c` where c is a name: a.b is the module
        name = name.rpartition(".")[0]
    return name


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for imported_module in graph[module]:
            if imported_module not in order:
                visit(imported_module)
                low[module] = min(low[module], low[imported_module])
            elif imported_module in stack:
                low[module] = min(low[module], order[imported_module])
        if low[module] == order[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return circles


def test_no_module_imports_one_that_imports_it_back():
    """A circle works only in the order Python happens to meet it; one hidden by a function-level
    import breaks the first time something imports the other end first."""
    modules = package_modules()
    assert len(modules) > 50 and "docsrag.tasks.embed.embedding" in modules
    graph = {name: module_imports(name, path, modules) for name, path in modules.items()}
    assert "docsrag.tasks.embed.e5" in graph["docsrag.tasks.embed.embedding"]
    assert not import_circles(graph), import_circles(graph)


def test_the_circle_check_sees_a_circle_closed_inside_a_function(tmp_path):
    modules = {"p": tmp_path / "p" / "__init__.py", "p.a": tmp_path / "p" / "a.py", "p.b": tmp_path / "p" / "b.py"}
    modules["p"].parent.mkdir()
    modules["p"].write_text("")
    modules["p.a"].write_text("from p import b\n")
    modules["p.b"].write_text("def late():\n    from . import a\n    return a\n")
    graph = {name: module_imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.a"}}
    assert import_circles(graph) == [["p.a", "p.b"]]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_records_serialise_under_one_name():
    """``to_dict``, as the flow summaries (tasks/core/summaries.py): ``as_dict`` had drifted in beside it."""
    wrong = [f"{path.relative_to(ROOT)}:{node.lineno}" for folder in ("tasks", "flows", "docsrag", "tests", "bench")
             for path in (ROOT / folder).rglob("*.py") for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if getattr(node, "name", None) == "as_dict" or getattr(node, "attr", None) == "as_dict"]
    assert not wrong, wrong
