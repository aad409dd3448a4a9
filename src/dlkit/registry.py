"""Named registries of models, data sets and recipes; a name can be registered only once. `declared`
reads the registrations from the source, for listings that must not import torch."""
from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from dlkit.errors import RegistryError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table that refuses duplicates and suggests close names for typos."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers `obj` under `name`."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; a name already taken is an error."""
        if name in self._items:
            raise RegistryError(f"{self.kind} '{name}' is already registered; pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Look `name` up; an unknown name is an error listing what exists."""
        try:
            return self._items[name]
        except KeyError:
            hint = did_you_mean(name, self._items)
            raise RegistryError(
                f"unknown {self.kind} '{name}'{hint}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


# builder arguments the runner fills in from the data, never from the recipe's model section
DATA_ARGS = ("num_classes", "input_shape")


@dataclass(frozen=True)
class Declared:
    """One `@decorator("name", ...)` registration as the source states it (read, not imported)."""

    name: str
    module: str
    args: tuple[str, ...]  # the registered function's parameters, less DATA_ARGS
    description: str | None = None


@functools.cache
def declared(package: str, decorator: str) -> tuple[Declared, ...]:
    """The registrations in `package`'s modules (e.g. "dlkit.models", "register_model"), read from their
    source with `ast`, so listing names costs no import of torch or scikit-learn. The registries stay
    the truth: tests/test_registry.py checks this index equals them."""
    folder = Path(__file__).parent.joinpath(*package.split(".")[1:])
    found: list[Declared] = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _string_constants(tree)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == decorator
                        and deco.args and isinstance(deco.args[0], ast.Constant)):
                    continue
                words = {k.arg: k.value for k in deco.keywords}
                text = _string(words.get("description"), constants)
                found.append(Declared(deco.args[0].value, f"{package}.{path.stem}", _params(node), text))
    return tuple(sorted(found, key=lambda d: d.name))


def _params(node: ast.FunctionDef | ast.ClassDef) -> tuple[str, ...]:
    if not isinstance(node, ast.FunctionDef):
        return ()
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return tuple(n for n in names if n not in DATA_ARGS)


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` assignments, for a description given by name."""
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            out[node.targets[0].id] = node.value.value
    return out


def _string(node: ast.expr | None, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None
