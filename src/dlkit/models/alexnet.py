"""AlexNet (Krizhevsky et al. 2012) and its refinement ZFNet (Zeiler & Fergus 2013).

- `alexnet`: torchvision's ImageNet layout (the one-column variant of Krizhevsky's 2014 "One weird
  trick": 64/192/384/256/256 channels, no LRN), same parameter names, so its checkpoints load with
  `strict=True`; 61,100,840 params at 1000 classes. It needs 63x63 inputs or more (11x11/4 conv,
  three 3x3/2 pools).
- `alexnet32` (S1.4 cifar10-alexnet): the same five convs and three dense layers sized for 32x32.
- `zfnet` (S1.5 cifar10-zfnet): ZFNet's 5 convs, 3 max-pools, 3 dense layers sized for 32x32.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from dlkit.models import register_model
from dlkit.models.surface import Classifier
from dlkit.models.torchvision_layout import TorchvisionLayout, conv_groups, image_channels


class AlexNet(TorchvisionLayout):
    """torchvision's AlexNet: features -> avgpool (6x6) -> flatten -> classifier (4096, 4096, classes)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()  # no state: torchvision's key list is unchanged
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def trunk_blocks(self) -> list[nn.Module]:
        """One group per conv layer (conv, relu and a following max-pool)."""
        return list(conv_groups(self.features))


@register_model("alexnet")
def alexnet(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224), dropout: float = 0.5) -> AlexNet:
    """torchvision's AlexNet: 5 convs, 3 dense; 61,100,840 params at 1000 classes."""
    return AlexNet(num_classes, image_channels(input_shape, 63, "AlexNet"), dropout)


def conv_block(in_channels: int, out_channels: int, kernel: int, pool: nn.MaxPool2d | None) -> nn.Sequential:
    """A same-padded stride-1 conv, relu and an optional max-pool, with named parts."""
    parts: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)),
        ("relu", nn.ReLU(inplace=True)),
    ]
    if pool is not None:
        parts.append(("pool", pool))
    return nn.Sequential(OrderedDict(parts))


def pooled_side(side: int, pool: nn.MaxPool2d) -> int:
    """The side length a max-pool leaves (floor mode)."""
    kernel, stride, padding = (int(v) for v in (pool.kernel_size, pool.stride, pool.padding))
    return (side + 2 * padding - kernel) // stride + 1


def five_conv_net(
    widths: Sequence[int],
    kernels: Sequence[int],
    make_pool: Callable[[], nn.MaxPool2d],
    num_classes: int,
    input_shape: Sequence[int],
    min_side: int,
    dense: int,
    dropout: float,
    name: str,
) -> Classifier:
    """Five convs (max-pooled after the 1st, 2nd and 5th), then AlexNet's dropout-dense-dense-dense head."""
    in_channels = image_channels(input_shape, min_side, name)
    height, width = input_shape[1:]
    blocks = []
    for i, (out_channels, kernel) in enumerate(zip(widths, kernels, strict=True)):
        pool = make_pool() if i in (0, 1, 4) else None
        blocks.append(conv_block(in_channels, out_channels, kernel, pool))
        if pool is not None:
            height, width = pooled_side(height, pool), pooled_side(width, pool)
        in_channels = out_channels
    head = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(in_channels * height * width, dense),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(dense, dense),
        nn.ReLU(inplace=True),
        nn.Linear(dense, num_classes),
    )
    return Classifier(nn.Sequential(*blocks), head, cam_layer=f"features.{len(blocks) - 1}")


@register_model("alexnet32")
def alexnet32(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    dense: int = 4096,
    dropout: float = 0.5,
) -> Classifier:
    """S1.4: AlexNet for 32x32 images; 36,051,786 params on CIFAR-10.

    Kept from torchvision's AlexNet: the 64/192/384/256/256 channels, the 5x5 second conv, pooling
    after convs 1, 2 and 5, and the Dropout-4096-4096-classes head. Changed for 32x32: the first
    conv is 3x3 stride 1 (not 11x11 stride 4), all convs keep the size, pools are 2x2 stride 2
    (32 -> 16 -> 8 -> 4), and the head reads the 256x4x4 maps directly (no adaptive pool).
    """
    return five_conv_net(
        (64, 192, 384, 256, 256), (3, 5, 3, 3, 3), lambda: nn.MaxPool2d(2),
        num_classes, input_shape, 8, dense, dropout, "alexnet32",
    )


@register_model("zfnet")
def zfnet(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    dense: int = 4096,
    dropout: float = 0.5,
) -> Classifier:
    """S1.5: ZFNet for 32x32 images (5 convs, 3 max-pools, 3 dense); 37,330,058 params on CIFAR-10.

    Kept from ZFNet: the 96/256/384/384/256 channels, the 7x7 first and 5x5 second convs, the
    overlapping 3x3 stride-2 max-pools after convs 1, 2 and 5, and the 4096-4096-classes head with
    dropout. Changed for 32x32: every conv is stride 1 and same-padded, the pools are padded by 1
    (32 -> 16 -> 8 -> 4), and the contrast normalisation layers are left out (as torchvision's AlexNet).
    """
    return five_conv_net(
        (96, 256, 384, 384, 256), (7, 5, 3, 3, 3), lambda: nn.MaxPool2d(3, stride=2, padding=1),
        num_classes, input_shape, 1, dense, dropout, "zfnet",
    )
