"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, for S0.3 and S3.A2.

Names and shapes are torchvision's (`features.0.0.weight`, `features.1.conv.0.0.weight`, ...,
`classifier.1.weight`), so its ImageNet checkpoint loads with `strict=True`: 3,504,872 params at
1000 classes, of which the trunk (`features`) holds 2,223,872. Keras' frozen base of S3.A2 reports
2,257,984 because Keras also counts each batch norm's moving mean and variance (17,056 channels).
Every conv is padded, so any input of 1x1 or more works (32x32 leaves 1x1 maps before the pool).
"""
from __future__ import annotations

import torch
from torch import nn

from dlkit.models import register_model
from dlkit.models.torchvision_layout import TorchvisionLayout, image_channels

# (expansion t, output channels c, repeats n, first stride s) of the paper's Table 2
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), as torchvision rounds widths."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # never round down by more than 10%
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Padded conv (no bias), batch norm, ReLU6: torchvision's Conv2dNormActivation, keys `.0`, `.1`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (unless t = 1), 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [] if expand_ratio == 1 else [conv_bn_relu6(in_channels, hidden, kernel=1)]
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, plus its input when the shapes match."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(TorchvisionLayout):
    """features (stem, 17 inverted residuals, 1x1 conv to 1280) -> global pool -> flatten -> classifier."""

    last_linear = "classifier.1"
    linear_std = 0.01

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3, dropout: float = 0.2
    ) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))  # torchvision never narrows the last conv
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, channels, stride=2)]
        for expand, width, repeats, stride in SETTINGS:
            out_channels = make_divisible(width * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand))
                channels = out_channels
        layers.append(conv_bn_relu6(channels, last_channels, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # torchvision pools functionally; a module adds no keys
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        self.init_weights()

    def trunk_blocks(self) -> list[nn.Module]:
        """The 19 entries of `features`: stem, each inverted residual, the last 1x1 conv."""
        return list(self.features)


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000,
    input_shape: tuple[int, ...] = (3, 224, 224),
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> MobileNetV2:
    """torchvision's MobileNetV2; 3,504,872 params at 1000 classes and width 1.0."""
    return MobileNetV2(num_classes, width_mult, image_channels(input_shape, 1, "mobilenet_v2"), dropout)
