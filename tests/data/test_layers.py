"""Layers point one way: the data modules import neither models nor scratch, and the low-level hub and
synthetic modules import nothing of dlkit above errors and config."""
from __future__ import annotations

import ast
from pathlib import Path

import dlkit

SRC = Path(dlkit.__file__).parent


def dlkit_imports(path: Path) -> set[str]:
    """Every dlkit module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] == "dlkit"}


def test_data_imports_no_model_and_no_scratch_module():
    for path in sorted((SRC / "data").glob("*.py")):
        above = {n for n in dlkit_imports(path) if n.startswith(("dlkit.models", "dlkit.scratch"))}
        assert not above, f"data/{path.name} imports {sorted(above)}"


def test_hub_and_synthetic_are_low_level():
    assert dlkit_imports(SRC / "hub.py") <= {"dlkit.errors", "dlkit.config"}
    assert dlkit_imports(SRC / "synthetic.py") == set()
    assert not (SRC / "models" / "hub.py").exists()
