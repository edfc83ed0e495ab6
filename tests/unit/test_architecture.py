"""The layers hold (agent/diversityd/DESIGN.md): import-linter's contracts, no import cycle
anywhere (TYPE_CHECKING imports count), and no room grown too big again (issue 9)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "agent" / "diversityd"
DAEMON_MODULE_LINES = 420  # "no module over about 400 lines" in the daemon
DAEMON_CLASS_LINES = 320  # "no class over about 300" in the daemon
ANY_CLASS_LINES = 420  # "nowhere in the package a class over about 400"


def test_import_contracts_are_kept() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def find_cycle(graph: grimp.ImportGraph, modules: set[str]) -> list[str] | None:
    """One cycle among `modules` (depth-first, iterative), or None."""
    colour: dict[str, int] = {}  # 1: on the path, 2: done
    for root in sorted(modules):
        if colour.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [
            (root, sorted(graph.find_modules_directly_imported_by(root) & modules))
        ]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            if not children:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            child = children.pop()
            if colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            if not colour.get(child):
                colour[child] = 1
                path.append(child)
                stack.append(
                    (child, sorted(graph.find_modules_directly_imported_by(child) & modules))
                )
    return None


def test_no_import_cycles_not_even_under_type_checking() -> None:
    graph = grimp.build_graph("diversityd", "diversityd_lab", exclude_type_checking_imports=False)
    modules = set(graph.modules)
    cycle = find_cycle(graph, modules)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    assert find_cycle(graph, {"a.x", "a.y", "a.z"}) is None
    graph.add_import(importer="a.z", imported="a.x")
    cycle = find_cycle(graph, {"a.x", "a.y", "a.z"})
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a.x", "a.y", "a.z"}


def class_sizes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]


def test_no_room_grows_too_big() -> None:
    too_big: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        in_daemon = relative.parts[0] == "daemon"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if in_daemon and lines > DAEMON_MODULE_LINES:
            too_big.append(f"{relative}: {lines} lines")
        limit = DAEMON_CLASS_LINES if in_daemon else ANY_CLASS_LINES
        too_big += [
            f"{relative}: class {name}, {size} lines"
            for name, size in class_sizes(path)
            if size > limit
        ]
    assert not too_big, too_big
