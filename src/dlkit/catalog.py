"""What dlkit has: recipes, models and data sets to list, and a recipe's model to describe.

Listing imports neither torch nor scikit-learn (seconds of a `dlkit list` otherwise): model and data
set names come from their registrations' source (`dlkit.registry.declared`); only `describe`, which
builds a model, imports the registries themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlkit.errors import ConfigError, did_you_mean
from dlkit.recipes import load_recipe, recipe_registry, recipe_source
from dlkit.registry import Declared, declared

if TYPE_CHECKING:
    from dlkit.models.summary import ModelSummary

KINDS = ("recipes", "models", "datasets")


def catalog_lines(what: str = "all") -> list[str]:
    """Lines listing recipes (with their seed claim), models (with arguments) and data sets."""
    if what not in (*KINDS, "all"):
        raise ConfigError(f"cannot list '{what}'{did_you_mean(what, KINDS)}; choose recipes, models, datasets or all")
    lines: list[str] = []
    if what in ("recipes", "all"):
        lines.append("recipes:")
        for name in recipe_registry().names():
            raw, _ = recipe_source(name)
            claims = raw.get("expect", {}).get("claims", {})
            claim = ", ".join(f"{k} {v}" for k, v in claims.items())
            source = raw.get("expect", {}).get("source") or "-"
            lines.append(f"  {name:<24} {source:<6} {claim:<36} {raw.get('description', '')}")
    if what in ("models", "all"):
        lines.append("models:")
        lines += [f"  {d.name:<24} args: {', '.join(d.args) or '-'}" for d in declared_models()]
    if what in ("datasets", "all"):
        lines.append("datasets:")
        lines += [f"  {d.name:<24} {d.description or ''}".rstrip() for d in declared_datasets()]
    return lines


def declared_models() -> tuple[Declared, ...]:
    """The registered models with their recipe arguments, read from the source (no torch import)."""
    return declared("dlkit.models", "register_model")


def declared_datasets() -> tuple[Declared, ...]:
    """The registered data sets with their descriptions, read from the source (no torch import)."""
    return declared("dlkit.data", "register_dataset")


@dataclass
class RecipeDescription:
    """A recipe's model table with the data shape it was built for."""

    recipe: str
    model: str
    input_shape: tuple[int, ...]
    num_outputs: int
    summary: ModelSummary

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "model": self.model, "input_shape": list(self.input_shape),
                "num_outputs": self.num_outputs, **self.summary.to_dict()}

    def to_text(self) -> str:
        head = f"recipe {self.recipe}: model {self.model}, input {tuple(self.input_shape)}, {self.num_outputs} outputs"
        return head + "\n" + self.summary.to_text()


def describe_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RecipeDescription:
    """Build a recipe's model from the data set's known shape (no data loaded) and tabulate it."""
    from dlkit.data import data_shape
    from dlkit.engine.freeze import set_trainable
    from dlkit.engine.loop import resolve_stages
    from dlkit.models import build_model
    from dlkit.models.summary import summarize

    recipe = load_recipe(name_or_path, overrides)
    shape = data_shape(recipe.data)
    model = build_model(recipe, shape.num_outputs, shape.input_shape)
    first = resolve_stages(recipe.train)[0]
    # trainable counts as the first stage trains
    set_trainable(model, first.freeze, first.unfreeze, "train.stages.0" if recipe.train.stages else "train")
    summary = summarize(model, shape.input_shape, dtype=model.input_dtype)
    return RecipeDescription(recipe.name, recipe.model.name, shape.input_shape, shape.num_outputs, summary)
