"""The multilayer perceptron of S2.3 (mnist-mlp): flatten, dense layers, a linear output layer."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from dlkit.errors import ConfigError, did_you_mean
from dlkit.models import register_model
from dlkit.models.surface import Classifier


def activation_layer(name: str) -> nn.Module:
    """The activation module called `name`; an unknown name is a ConfigError."""
    layers = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if name not in layers:
        raise ConfigError(
            f"model.activation must be one of {', '.join(layers)}, got '{name}'{did_you_mean(name, layers)}"
        )
    return layers[name]()


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    hidden: Sequence[int] = (128, 64),
    dropout: float = 0.0,
    activation: str = "relu",
) -> Classifier:
    """Flatten, then Dense(h) + activation [+ dropout] per `hidden`, then Dense(classes).

    The default 784-128-64-10 has the 109,386 parameters S2.3 reports (its "3x128" text does not).
    """
    width = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for size in hidden:
        layers.append(nn.Sequential(nn.Linear(width, size), activation_layer(activation), nn.Dropout(dropout)))
        width = size
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))
