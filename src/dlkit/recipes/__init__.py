"""The recipes that ship with dlkit (one YAML per experiment) and how a recipe is resolved."""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from dlkit.config import Recipe, apply_overrides, parse_recipe, set_epochs, set_path
from dlkit.errors import ConfigError
from dlkit.registry import Registry
from dlkit.yamlfile import read_yaml


@functools.cache
def recipe_registry() -> Registry[Path]:
    """Recipe name -> YAML path for every recipe in the package (file stem = name)."""
    registry: Registry[Path] = Registry("recipe")
    folder = resources.files(__name__)
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            registry.add(entry.name.removesuffix(".yaml"), Path(str(entry)))
    return registry


def recipe_source(name_or_path: str | Path, _chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The raw mapping of a packaged recipe name or a YAML path, with `extends: BASE` resolved."""
    raw, name = _read_source(name_or_path)
    base = raw.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"recipe '{name}': 'extends' must name a packaged recipe, got {base!r}")
        chain = (*_chain, _reference(name_or_path))
        if _reference(base) in chain:
            raise ConfigError(f"recipe '{name}': 'extends' loops back to '{base}'; break the cycle")
        parent, _ = recipe_source(base, chain)
        raw = merge(parent, raw)
        raw.pop("name", None)
    return raw, name


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it, mapping by mapping (lists and values replace)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _is_path(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text


def _reference(name_or_path: str | Path) -> str:
    """One spelling per recipe: the resolved path of a file, or the packaged name."""
    return str(Path(name_or_path).expanduser().resolve()) if _is_path(name_or_path) else str(name_or_path)


def _read_source(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    text = str(name_or_path)
    if _is_path(name_or_path):
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
    return _finish(raw, seed, fields, origin=f"recipe '{name}'")


def adhoc_recipe(model: str, data: str, overrides: list[str] | tuple[str, ...] = (), *, epochs: int = 10,
                 batch_size: int = 32, optimizer: str = "adam", lr: float = 1e-3, seed: int | None = None,
                 fields: dict[str, Any] | None = None) -> Recipe:
    """A recipe made from command-line options (`dlkit train`): a model on a data set or file."""
    from dlkit.data import DATASETS
    from dlkit.models import MODELS

    MODELS.get(model)  # fail early, with suggestions, on an unknown model
    path = Path(data).expanduser()
    if data in DATASETS:
        data_section: dict[str, Any] = {"name": data}
    elif path.is_file() and path.suffix.lower() == ".csv":
        data_section = {"name": "csv_table", "path": str(path)}
    elif path.is_dir() and "image_folder" in DATASETS:
        data_section = {"name": "image_folder", "path": str(path)}
    elif path.exists():
        raise ConfigError(f"--data {data}: expected a registered data set, a .csv file or an image folder")
    else:
        DATASETS.get(data)  # unknown name: the registry's error lists what exists
    raw: dict[str, Any] = {
        "name": f"{model}-{Path(data).stem if path.exists() else data}",
        "data": data_section,
        "model": {"name": model},
        "train": {"epochs": epochs, "batch_size": batch_size, "optimizer": {"name": optimizer, "lr": lr}},
    }
    raw = apply_overrides(raw, list(overrides))
    return _finish(raw, seed, fields, origin="dlkit train")


def _finish(raw: dict[str, Any], seed: int | None, fields: dict[str, Any] | None, origin: str) -> Recipe:
    """Apply `--seed` and the named CLI fields (None = not given), validate, and fill in what the
    model family brings (a hub model's tokenizer, pretrained weights' preprocessing)."""
    from dlkit.models import with_model_defaults

    if seed is not None:
        raw["seed"] = seed
    for dotted, value in (fields or {}).items():
        if value is not None:
            set_path(raw, dotted, value)
    return with_model_defaults(parse_recipe(raw, origin=origin))
