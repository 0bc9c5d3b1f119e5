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
