"""VGG (Simonyan & Zisserman 2014) in torchvision's layout, for S1.6, S1.8, S1.9 and S2.4.

Parameter names and shapes are torchvision's (`features.N.weight`, `classifier.0/3/6.*`), so its
ImageNet checkpoints load with `strict=True`. Counts at 1000 classes: vgg11 132,863,336,
vgg16 138,357,544, vgg16_bn 138,365,992. The adaptive average pool makes the classifier's input
512x7x7 at any input of 32x32 or more (five 2x2 max-pools), so CIFAR-size images work too.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dlkit.models import register_model
from dlkit.models.torchvision_layout import TorchvisionLayout, conv_groups, image_channels

# torchvision's configurations "A" (11 layers) and "D" (16 layers); "M" is a 2x2 max-pool
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
MIN_SIDE = 32  # five 2x2 max-pools need 32 pixels to leave one


def vgg_trunk(config: Sequence[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """3x3 same convs ([batch norm], relu) and 2x2 max-pools, indexed exactly like torchvision's."""
    layers: list[nn.Module] = []
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(item)
    return nn.Sequential(*layers)


class VGG(TorchvisionLayout):
    """features (conv trunk) -> avgpool (7x7) -> flatten -> classifier (4096, 4096, classes)."""

    linear_std = 0.01

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.flatten = nn.Flatten()  # no state: torchvision's key list is unchanged
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self.init_weights("relu")

    def trunk_blocks(self) -> list[nn.Module]:
        """One group per conv layer (conv, [bn], relu and a following max-pool)."""
        return list(conv_groups(self.features))


def build_vgg(config: str, batch_norm: bool, num_classes: int, input_shape: Sequence[int], dropout: float) -> VGG:
    """A VGG of torchvision configuration `config` for images of `input_shape`."""
    in_channels = image_channels(input_shape, MIN_SIDE, "VGG")
    return VGG(vgg_trunk(CONFIGS[config], in_channels, batch_norm), num_classes, dropout)


@register_model("vgg11")
def vgg11(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224), dropout: float = 0.5) -> VGG:
    """VGG-11 (configuration A): 8 convs, 3 dense; 132,863,336 params at 1000 classes."""
    return build_vgg("A", False, num_classes, input_shape, dropout)


@register_model("vgg16")
def vgg16(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224), dropout: float = 0.5) -> VGG:
    """VGG-16 (configuration D): 13 convs, 3 dense; 138,357,544 params at 1000 classes."""
    return build_vgg("D", False, num_classes, input_shape, dropout)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224), dropout: float = 0.5) -> VGG:
    """VGG-16 with batch norm after each conv; 138,365,992 params at 1000 classes."""
    return build_vgg("D", True, num_classes, input_shape, dropout)
