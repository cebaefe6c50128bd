"""The house's rules, read off the code: one import name, and rooms that import only downhill.

The contract (tasks/__init__.py): core < embed < ingest < index < queue < answer < service < ops.
A module of a room may import its own room and the rooms below it, never one above, nor the flows
or the testing package; imports inside functions count (they were how import circles hid).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ROOMS = ["core", "embed", "ingest", "index", "queue", "answer", "service", "ops"]


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (relative imports made absolute)."""
    package = "docsrag.tasks." + ".".join(path.relative_to(ROOT / "tasks").with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


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


def _absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found
