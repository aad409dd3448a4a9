"""Model registry: `build(name, num_classes=..., input_shape=..., **args)` returns an nn.Module.

Every model exposes the same surface: `features` (the trunk), `head` (the classifier),
`cam_layer` (the module Grad-CAM hooks; None for models without conv layers) and `blocks`
(ordered groups of modules, input side first, for staged unfreezing).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from dlkit.errors import ConfigError, did_you_mean
from dlkit.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# builder arguments the runner fills in from the data, never from the recipe's model section
DATA_ARGS = ("num_classes", "input_shape")


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with its builder's keyword arguments."""
    builder = MODELS.get(name)
    check_args(name, {k: v for k, v in kwargs.items() if k not in DATA_ARGS})
    return builder(**kwargs)


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


from dlkit.models import alexnet, cnn, lenet, lstm, mlp, mobilenetv2, resnet, vgg  # noqa: E402,F401  (registers the families)
