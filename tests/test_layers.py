"""The layers point one way: errors/config -> data -> models -> engine -> evaluate -> app. Every import
of a dlkit module, at the top of a file or inside a function, is read from the source and checked."""
from __future__ import annotations

import ast
from pathlib import Path

import dlkit

SRC = Path(dlkit.__file__).parent

# the lowest layer first; a module may import its own layer and those below it
LAYERS = [
    {"errors", "config", "yamlfile", "registry", "files", "hub", "synthetic", "rundir", "collective", "space"},
    {"data"},
    {"models"},
    {"engine", "scratch"},
    {"evaluate"},
    {"runner", "scratch_run", "recipes", "catalog", "predict", "explain", "demo", "cli", "__init__", "__main__",
     "serve", "launch", "ensemble", "tune", "track"},
]


def layer_of(module: str) -> int:
    """The layer of `dlkit.x.y...` (or of a file's module name), by its first part under dlkit."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(["dlkit", *parts])


def dlkit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import dlkit...` and `from dlkit... import` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("dlkit"):
            names = [f"{node.module}.{a.name}" if node.module == "dlkit" else node.module for a in node.names]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dlkit")]
    return found


def test_every_module_is_in_a_layer():
    for path in SRC.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        for line, other in dlkit_imports(path):
            if other in ("dlkit", "dlkit.__version__"):
                continue  # the version string
            if layer_of(other) > layer_of(me):
                upward.append(f"{path.relative_to(SRC)}:{line} imports {other}")
    assert upward == []


def test_the_two_engines_share_the_run_directory_without_a_cycle():
    runner = {m for _, m in dlkit_imports(SRC / "runner.py")}
    scratch = {m for _, m in dlkit_imports(SRC / "scratch_run.py")}
    assert "dlkit.runner" not in scratch
    assert "dlkit.rundir" in runner | {m for _, m in dlkit_imports(SRC / "engine" / "outcome.py")}
    assert "dlkit.engine.outcome" in runner and "dlkit.engine.outcome" in scratch
