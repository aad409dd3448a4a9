"""The small CNNs of the seed write-ups (S0.1, S3.A): 3x3 "valid" convs, 2x2 max-pools, dense head.

Keras writes each block as Conv2D(relu) then MaxPool2D; we keep the maths and reorder the cheap
part (see `conv_block`). The "future work" BatchNorm + Dropout variant is an option of each builder.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import register_model
from dlkit.models.surface import Classifier


def conv_block(in_channels: int, out_channels: int, pool: bool = True, batch_norm: bool = False) -> nn.Sequential:
    """A 3x3 valid conv, then [batch norm], relu and [2x2 max-pool], with named parts."""
    parts: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(in_channels, out_channels, 3))]
    if batch_norm:
        parts.append(("bn", nn.BatchNorm2d(out_channels)))
    relu, maxpool = ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2))
    if not pool:
        parts.append(relu)
    elif batch_norm:
        # a negative BN scale flips which value is the max, so only Keras' order is exact here
        parts += [relu, maxpool]
    else:
        # relu is monotone so it commutes with max-pool; pooling first runs relu on 4x fewer values
        parts += [maxpool, relu]
    return nn.Sequential(OrderedDict(parts))


def seed_family(
    channels: Sequence[int],
    pools: Sequence[bool],
    dense: int,
    num_classes: int,
    input_shape: Sequence[int],
    batch_norm: bool,
    dropout: float,
) -> Classifier:
    """Conv blocks of `channels` (pooled where `pools`), then Flatten, Dense(`dense`) relu, Dense(classes)."""
    if len(input_shape) != 3:
        raise ConfigError(f"a CNN needs images shaped (channels, height, width), got input_shape {tuple(input_shape)}")
    in_channels, height, width = input_shape
    blocks = []
    for out_channels, pool in zip(channels, pools):
        blocks.append(conv_block(in_channels, out_channels, pool, batch_norm))
        height, width = valid_side(height, pool), valid_side(width, pool)
        in_channels = out_channels
    if height < 1 or width < 1:
        raise ConfigError(f"input_shape {tuple(input_shape)} is too small for {len(channels)} conv blocks")
    head = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * height * width, dense),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(dense, num_classes),
    )
    return Classifier(nn.Sequential(*blocks), head, cam_layer=f"features.{len(blocks) - 1}")


def valid_side(size: int, pool: bool) -> int:
    """The side length after a 3x3 valid conv and, if `pool`, a 2x2 max-pool."""
    size -= 2
    return size // 2 if pool else size


@register_model("seed_cnn")
def seed_cnn(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> Classifier:
    """S0.1: Conv32, Pool, Conv64, Pool, Flatten, Dense128, Dense(classes); 225,034 params on MNIST."""
    return seed_family((32, 64), (True, True), 128, num_classes, input_shape, batch_norm, dropout)


@register_model("seed_cnn3")
def seed_cnn3(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> Classifier:
    """S3.A: Conv32, Pool, Conv64, Pool, Conv64, Flatten, Dense64, Dense(classes); 93,322 params on MNIST."""
    return seed_family((32, 64, 64), (True, True, False), 64, num_classes, input_shape, batch_norm, dropout)
