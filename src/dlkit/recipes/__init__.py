"""The recipes that ship with dlkit (one YAML per experiment) and how a recipe is resolved."""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from dlkit.config import Recipe, apply_overrides, parse_recipe, read_yaml, set_epochs, set_path
from dlkit.errors import ConfigError
from dlkit.registry import Registry


@functools.cache
def recipe_registry() -> Registry[Path]:
    """Recipe name -> YAML path for every recipe in the package (file stem = name)."""
    registry: Registry[Path] = Registry("recipe")
    folder = resources.files(__name__)
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            registry.add(entry.name.removesuffix(".yaml"), Path(str(entry)))
    return registry


def recipe_source(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw YAML mapping of a packaged recipe name or a path to a YAML file, and its name."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file {path} not found; give a packaged recipe name (dlkit list recipes) or a YAML path")
        return read_yaml(path), path.stem
    return read_yaml(recipe_registry().get(text)), text


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                epochs: int | None = None, seed: int | None = None,
                fields: dict[str, Any] | None = None) -> Recipe:
    """Resolve a recipe: read it, apply `--set` overrides, `--epochs`, `--seed` and named fields.

    `fields` maps dotted field names to values, e.g. {"data.path": "~/pets", "train.device": "cpu"};
    None values are skipped so CLI options left unset change nothing.
    """
    raw, name = recipe_source(name_or_path)
    raw.setdefault("name", name)
    raw = apply_overrides(raw, list(overrides))
    if epochs is not None:
        if epochs < 0:
            raise ConfigError(f"--epochs must be 0 or more, got {epochs}")
        set_epochs(raw, epochs)
    if seed is not None:
        raw["seed"] = seed
    for dotted, value in (fields or {}).items():
        if value is not None:
            set_path(raw, dotted, value)
    return parse_recipe(raw, origin=f"recipe '{name}'")
