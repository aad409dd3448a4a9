"""dlkit's model surface on top of models that keep torchvision's parameter names.

A torchvision ImageNet checkpoint loads into these models with `strict=True`, so their top-level
modules keep torchvision's names (`features`/`avgpool`/`classifier`, `conv1`/.../`fc`). dlkit's
surface (`features`, `head`, `cam_layer`, `blocks`) is therefore made of *views*: Sequentials over
modules the model already registers, kept out of `_modules` so that no weight is listed twice in
`state_dict` (safetensors refuses shared tensors) and `forward(x) == head(features(x))` still holds.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from dlkit.errors import ConfigError
from dlkit.models.surface import ModelSurface


class TorchvisionLayout(ModelSurface):
    """Base of the torchvision-layout models: `head`, `cam_layer`, `blocks`, `reset_classifier`.

    A subclass sets `head_names` (its top-level modules after the trunk, e.g. avgpool, flatten,
    classifier), `cam_path`, `last_linear` (the path of the final Linear) and `trunk_blocks()`;
    it registers `features` itself or defines it as a property over `view(...)`.
    """

    head_names: tuple[str, ...] = ("avgpool", "flatten", "classifier")
    cam_path = "features"
    last_linear = "classifier.6"
    linear_std: float | None = None  # N(0, std) for Linear layers where torchvision does that

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images: trunk, pooling, flatten, classifier."""
        return self.classifier(self.flatten(self.avgpool(self.features(x))))

    def init_weights(self, nonlinearity: str = "leaky_relu") -> None:
        """torchvision's initialisation: He-normal (fan_out) convs, unit BatchNorm, `init_linear`."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity=nonlinearity)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                self.init_linear(module)

    def view(self, key: str, names: Sequence[str]) -> nn.Sequential:
        """A Sequential over the named top-level modules, rebuilt only when one of them was replaced."""
        parts = [(name, getattr(self, name)) for name in names]
        cached = self.__dict__.get(key)
        if cached is None or any(a is not b for (_, a), b in zip(parts, cached.children(), strict=True)):
            cached = nn.Sequential(OrderedDict(parts))
            # straight into __dict__: nn.Module.__setattr__ would register it and list every weight twice
            self.__dict__[key] = cached
        return cached

    @property
    def head(self) -> nn.Sequential:
        """Pooling, flatten and the classifier: `forward(x) == head(features(x))`."""
        return self.view("_head_view", self.head_names)

    @property
    def cam_layer(self) -> nn.Module:
        """The last conv stage, whose output Grad-CAM reads."""
        return self.get_submodule(self.cam_path)

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's parameter groups, input side first."""
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        """Parameter groups for staged unfreezing: the trunk's, input side first, then `head`."""
        return [*self.trunk_blocks(), self.head]

    def init_linear(self, layer: nn.Linear) -> None:
        """Initialise a Linear the way this family's constructor does (PyTorch's default unless `linear_std`)."""
        if self.linear_std is not None:
            nn.init.normal_(layer.weight, 0, self.linear_std)
            nn.init.zeros_(layer.bias)

    def trunk_output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, H, W) that `features` gives for one input of `input_shape`, worked out on the meta device
        (shapes only: no arithmetic, no memory)."""
        trunk = self.features
        meta = {k: torch.empty_like(v, device="meta") for k, v in trunk.state_dict(keep_vars=True).items()}
        was_training = trunk.training
        trunk.eval()  # batch norm refuses one value per channel in train mode
        try:
            out = functional_call(trunk, meta, (torch.empty((1, *input_shape), device="meta"),))
        finally:
            trunk.train(was_training)
        return tuple(out.shape[1:])

    def replace_head(self, num_classes: int, input_shape: Sequence[int], pool: str = "avg",
                     hidden: Sequence[int] = (), activation: str = "relu", dropout: float = 0.0) -> None:
        """Put a new head on the trunk, as transfer-learning recipes build them (Keras' include_top=False
        plus new layers): `pool` (global avg / max, or flatten the map), then per hidden width a Linear,
        the activation and Dropout(dropout), then the output Linear. The trunk keeps its names."""
        channels, height, width = self.trunk_output_shape(input_shape)
        pools = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1), "flatten": nn.Identity()}
        if pool not in pools:
            raise ConfigError(f"model.head.pool must be one of {', '.join(pools)}, got '{pool}'")
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
        size = channels * height * width if pool == "flatten" else channels
        layers: list[nn.Module] = []
        for units in hidden:
            layers += [nn.Linear(size, units), acts[activation]()] + ([nn.Dropout(dropout)] if dropout else [])
            size = units
        if dropout and not hidden:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(size, num_classes))
        pool_name, classifier_name = self.head_names[0], self.head_names[-1]
        setattr(self, pool_name, pools[pool])
        setattr(self, classifier_name, nn.Sequential(*layers))
        self.last_linear = f"{classifier_name}.{len(layers) - 1}"

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a fresh one giving `num_classes` outputs."""
        old = self.get_submodule(self.last_linear)
        new = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self.init_linear(new)
        self.set_submodule(self.last_linear, new)


def conv_groups(features: nn.Sequential) -> list[nn.Sequential]:
    """Split a plain conv trunk at each Conv2d: each conv with its norm, activation and pooling."""
    starts = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    # slicing keeps the original keys ("3", "4", ...) and the very same modules
    return [features[a:b] for a, b in zip(starts, [*starts[1:], len(features)])]


def image_channels(input_shape: Sequence[int], min_side: int, model: str) -> int:
    """The channel count of an image `input_shape` (C, H, W); a ConfigError if it is not one or too small."""
    if len(input_shape) != 3:
        shape = tuple(input_shape)
        raise ConfigError(f"{model} needs images shaped (channels, height, width), got input_shape {shape}")
    channels, height, width = input_shape
    if min(height, width) < min_side:
        raise ConfigError(
            f"input_shape {tuple(input_shape)} is too small for {model}: it needs height and width >= {min_side}"
        )
    return channels
