"""Model registry: `build(name, num_classes=..., input_shape=..., **args)` returns an nn.Module.

Every model exposes the same surface: `features` (the trunk), `head` (the classifier),
`cam_layer` (the module Grad-CAM hooks; None for models without conv layers) and `blocks`
(ordered groups of modules, input side first, for staged unfreezing).
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from dlkit.errors import ConfigError, did_you_mean
from dlkit.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# builder arguments the runner fills in from the data, never from the recipe's model section
DATA_ARGS = ("num_classes", "input_shape")


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


from dlkit.models import alexnet, cnn, distilbert, lenet, lstm, mlp, mobilenetv2, resnet, vgg  # noqa: E402,F401  (registers the families)
