"""Residual networks (He et al. 2016): the CIFAR ResNets of S1.7 and torchvision's ImageNet ones.

One class, torchvision's names throughout (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample`,
`fc`), so torchvision's ImageNet checkpoints load with `strict=True` into `resnet18`/`resnet50`.

- `resnet18` / `resnet50`: 7x7/2 stem and 3x3/2 max-pool, four stages of 64..512 (x4 for
  bottlenecks) channels, 1x1-conv + BN ("option B") shortcuts, stride on the 3x3 conv of a
  bottleneck (torchvision's "V1.5"); 11,689,512 / 25,557,032 params at 1000 classes. Any input of
  1x1 or more works (every conv and pool is padded); at 32x32 layer4 sees 1x1 maps.
- `resnet20` / `resnet56`: the paper's CIFAR nets, a 3x3 stem (no max-pool), three stages of n
  basic blocks with 16/32/64 channels (6n + 2 layers) and parameter-free "option A" shortcuts:
  subsample by 2 and zero-pad the new channels. 269,722 / 853,018 params at 10 classes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import register_model
from dlkit.models.torchvision_layout import TorchvisionLayout, image_channels


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A padded 3x3 conv without bias (batch norm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 conv without bias (batch norm follows)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: keep every `stride`-th pixel and zero-pad the channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)  # F.pad order: W, H, then channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The subsampled, channel-padded input."""
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the shortcut, then relu."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(F(x) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity  # in place is safe: batch norm's backward does not read its output
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN, plus the shortcut, then relu."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(F(x) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(TorchvisionLayout):
    """Stem, stages `layer1..layerN`, global average pool, `fc`; torchvision's names and init."""

    head_names = ("avgpool", "flatten", "fc")
    last_linear = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        cifar_stem: bool = False,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ConfigError(f"model.shortcut must be 'A' (zero-padded identity) or 'B' (1x1 conv), got '{shortcut}'")
        self.shortcut = shortcut
        if cifar_stem:
            self.conv1 = conv3x3(in_channels, widths[0])
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.stage_names = [f"layer{i + 1}" for i in range(len(depths))]
        channels = widths[0]
        for i, (name, depth, planes) in enumerate(zip(self.stage_names, depths, widths, strict=True)):
            stage, channels = self.make_stage(block, channels, planes, depth, 1 if i == 0 else 2)
            setattr(self, name, stage)
        self.cam_path = self.stage_names[-1]
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()  # no state: torchvision's key list is unchanged
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int, depth: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        """`depth` blocks, the first one strided; return them and their output channels."""
        out_channels = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            if self.shortcut == "A":
                downsample = PadShortcut(in_channels, out_channels, stride)
            else:
                downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        layers = [block(in_channels, planes, stride, downsample)]
        layers += [block(out_channels, planes) for _ in range(depth - 1)]
        return nn.Sequential(*layers), out_channels

    @property
    def features(self) -> nn.Sequential:
        """The trunk, stem to last stage, as a view (its modules keep their top-level names)."""
        return self.view("_features_view", ("conv1", "bn1", "relu", "maxpool", *self.stage_names))

    def trunk_blocks(self) -> list[nn.Module]:
        """The stem (conv1, bn1), then each stage."""
        return [self.view("_stem_view", ("conv1", "bn1", "relu", "maxpool"))] + [
            getattr(self, name) for name in self.stage_names
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register_model("resnet20")
def resnet20(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), shortcut: str = "A") -> ResNet:
    """S1.7: the paper's 20-layer CIFAR ResNet (n=3); 269,722 params at 10 classes (272,474 with shortcut B)."""
    channels = image_channels(input_shape, 1, "resnet20")
    return ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), num_classes, channels, cifar_stem=True, shortcut=shortcut)


@register_model("resnet56")
def resnet56(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), shortcut: str = "A") -> ResNet:
    """S1.7: the paper's 56-layer CIFAR ResNet (n=9); 853,018 params at 10 classes."""
    channels = image_channels(input_shape, 1, "resnet56")
    return ResNet(BasicBlock, (9, 9, 9), (16, 32, 64), num_classes, channels, cifar_stem=True, shortcut=shortcut)


@register_model("resnet18")
def resnet18(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224)) -> ResNet:
    """torchvision's ResNet-18 (basic blocks 2-2-2-2); 11,689,512 params at 1000 classes."""
    channels = image_channels(input_shape, 1, "resnet18")
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes, channels)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224)) -> ResNet:
    """torchvision's ResNet-50 (bottlenecks 3-4-6-3); 25,557,032 params at 1000 classes."""
    channels = image_channels(input_shape, 1, "resnet50")
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes, channels)
