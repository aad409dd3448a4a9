"""Model registry: `build(name, num_classes=..., input_shape=..., **args)` returns an nn.Module.

Every model exposes the same surface: `features` (the trunk), `head` (the classifier),
`cam_layer` (the module Grad-CAM hooks; None for models without conv layers) and `blocks`
(ordered groups of modules, input side first, for staged unfreezing).
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dlkit.config import Recipe
from dlkit.errors import ConfigError, DlkitError, RunDirError, did_you_mean
from dlkit.registry import DATA_ARGS, Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@dataclass(frozen=True)
class Family:
    """What a registered model family can do before a model is built.

    `hub_default`: a Hugging Face family. `model.weights` names a hub checkpoint or a folder whose
    config, weights and tokenizer come with it (this checkpoint's tokenizer when no weights are given).
    `hub_images`: the family reads images, not text: no tokenizer; RGB images in [0, 1] (`scale`),
    which the model normalises itself with its checkpoint's mean and std.
    """

    hub_default: str | None = None
    hub_images: bool = False


FAMILIES: dict[str, Family] = {}


def register_model(name: str, family: Family | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under `name` with what its family can do (a plain family by default)."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.add(name, builder)
        FAMILIES[name] = family or Family()
        return builder

    return add


def family(name: str) -> Family:
    """The declared abilities of model `name` (an unknown name is a RegistryError)."""
    MODELS.get(name)
    return FAMILIES.get(name, Family())


def build(name: str, *, head: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with its builder's keyword arguments; `head` (the fields of
    a recipe's model.head) replaces its classifier with a new one (ImageNet-layout models only)."""
    builder = MODELS.get(name)
    check_args(name, {k: v for k, v in kwargs.items() if k not in DATA_ARGS})
    model = builder(**kwargs)
    if head is not None:
        from dlkit.models.torchvision_layout import TorchvisionLayout

        if not isinstance(model, TorchvisionLayout):
            with_heads = [n for n in MODELS.names() if _is_layout(n)]
            raise ConfigError(f"model.head needs a model with an ImageNet layout ({', '.join(with_heads)}); "
                              f"'{name}' builds its own head: set its arguments instead")
        model.replace_head(kwargs.get("num_classes", 1000), kwargs.get("input_shape", (3, 224, 224)), **head)
    return model


def _is_layout(name: str) -> bool:
    from dlkit.models.torchvision_layout import TorchvisionLayout

    builder = MODELS.get(name)
    annotation = inspect.signature(builder).return_annotation
    cls = getattr(sys.modules[builder.__module__], annotation, None) if isinstance(annotation, str) else annotation
    return isinstance(cls, type) and issubclass(cls, TorchvisionLayout)


def check_args(name: str, args: dict[str, Any]) -> None:
    """Refuse recipe arguments that the builder of `name` does not take."""
    allowed = model_args(name)
    for key in args:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            listing = ", ".join(allowed) or "none"
            raise ConfigError(f"unknown field 'model.{key}' for model '{name}'{hint}; allowed: {listing}")


def model_args(name: str) -> list[str]:
    """The recipe-settable arguments of model `name` (its builder's, less the data-given ones)."""
    params = inspect.signature(MODELS.get(name)).parameters
    return [p for p in params if p not in DATA_ARGS]


def with_model_defaults(recipe: Recipe) -> Recipe:
    """The recipe with the defaults its model family brings, as a new Recipe (the argument untouched):
    a Hugging Face family reads text with its checkpoint's tokenizer (`model.weights`, else the
    family's default checkpoint), or RGB images (normalised by the model); other pretrained weights
    bring ImageNet's preprocessing (mean/std on RGB) unless the recipe sets normalize / channels
    itself. Applying it twice changes nothing."""
    data, fam = recipe.data, family(recipe.model.name)
    default = fam.hub_default
    update: dict[str, Any] = {}
    if default is not None and fam.hub_images:
        if data.channels is None:
            update["channels"] = 3
    elif default is not None:
        if data.text.tokenizer is None:
            update["text"] = data.text.model_copy(update={"tokenizer": recipe.model.weights or default})
    elif recipe.model.weights is not None:
        if "normalize" not in data.model_fields_set:
            update["normalize"] = "imagenet"
        if data.channels is None:
            update["channels"] = 3
    if not update:
        return recipe
    return recipe.model_copy(update={"data": data.model_copy(update=update)})


def build_model(recipe: Recipe, num_outputs: int, input_shape: tuple[int, ...],
                data_args: dict[str, Any] | None = None) -> nn.Module:
    """The recipe's model, shaped for the data, with its new head if the recipe gives one.

    ImageNet-style weights are loaded afterwards (`load_pretrained`); a Hugging Face model loads
    its config and weights here, since its architecture comes with them.
    """
    head = recipe.model.head.model_dump() if recipe.model.head is not None else None
    hub = {"weights": recipe.model.weights} if family(recipe.model.name).hub_default else {}
    return build(recipe.model.name, head=head, num_classes=num_outputs, input_shape=tuple(input_shape),
                 **recipe.model.args(), **(data_args or {}), **hub)


def build_from_bundle(bundle: dict[str, Any], origin: str = "bundle.json") -> nn.Module:
    """The architecture a bundle describes, with fresh weights (a hand-edited spec that builds no
    model is one error line naming `origin`)."""
    spec = bundle["model"]
    args = dict(spec["args"])
    args["input_shape"] = tuple(args.get("input_shape") or bundle["input_shape"])
    try:
        return build(spec["name"], head=spec.get("head"), **args)
    except DlkitError as exc:
        raise RunDirError(f"{origin}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise RunDirError(f"{origin}: model '{spec['name']}' cannot be built from its arguments "
                          f"({' '.join(str(exc).split())}); it was edited or is corrupt, re-run the recipe") from None


from dlkit.models import (  # noqa: E402,F401  (registers the families)
    alexnet,
    cnn,
    distilbert,
    ensemble,
    hf_text,
    hf_vit,
    lenet,
    lstm,
    mlp,
    mobilenetv2,
    resnet,
    vgg,
    vit,
)
