"""House rules that a reader relies on: no module reaches into another's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _own(module: str | None) -> bool:
    return bool(module) and (module == "bksdm" or module.startswith(("bksdm.", "tests")))


def test_no_module_imports_another_modules_underscore_names():
    found = []
    for path in sorted([*ROOT.glob("src/bksdm/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        modules = set()  # names bound to our modules (import bksdm.x as M, from bksdm.evaluate import metrics as M)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _own(node.module):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if _own(a.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def _package_imports() -> dict[str, set[str]]:
    """bksdm's rooms (subpackages and top-level modules) -> the rooms they import, function-level imports too."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.glob("src/bksdm/**/*.py")):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts  # ("bksdm", "mini", "world")
        room = parts[1] if len(parts) > 2 else parts[1]
        if room == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("bksdm."):
                    target = name.split(".")[1]
                    if target != room:
                        graph.setdefault(room, set()).add(target)
    return graph


def test_library_rooms_import_no_recipe_and_form_no_cycle():
    graph = _package_imports()
    upward = {room: deps & {"recipes", "cli"} for room, deps in graph.items() if room not in ("recipes", "cli")}
    assert not any(upward.values()), {r: d for r, d in upward.items() if d}
    seen, cycle = {}, []

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == "open":
            cycle.append(path[path.index(node):] + [node])
            return
        if seen.get(node) == "done":
            return
        seen[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        seen[node] = "done"

    for room in sorted(graph):
        visit(room, [])
    assert not cycle, cycle


def test_declarative_tables_agree():
    """The torch-free names the bounds check (config) and the tables that map them (models) list the same names."""
    from bksdm.config import BOUNDS, PRECISIONS
    from bksdm.models import DTYPES

    assert set(DTYPES) == set(PRECISIONS) == set(BOUNDS["dtype"]["choices"])
