"""LeNet-5 (LeCun et al. 1998) with relu, for S1.3 mnist-lenet.

S1.3 lists "3 conv layers relu, average pooling, Dense120, Dense84, Dense10". LeNet-5's third conv
(C5: 120 maps of 5x5) sees 5x5 maps on a 28x28 input, so it *is* the Dense120 layer, written as a
conv; we keep it as LeNet-5 has it, which makes both halves of the description true:

    conv6 5x5 pad 2, relu, avgpool 2    28x28 -> 28x28 -> 14x14        156 params
    conv16 5x5, relu, avgpool 2         14x14 -> 10x10 -> 5x5        2,416
    conv120 5x5, relu (= Dense120)      5x5 -> 1x1                  48,120
    Flatten, Dense84 relu, Dense10                             10,164 + 850

61,706 parameters on MNIST. Other sizes (>= 28) work: the Dense84 reads 120 x side x side.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from dlkit.models import register_model
from dlkit.models.surface import Classifier
from dlkit.models.torchvision_layout import image_channels


def lenet_block(in_channels: int, out_channels: int, padding: int, pool: bool) -> nn.Sequential:
    """A 5x5 conv and relu, then a 2x2 average pool if `pool` (Keras' order: avg-pool and relu don't commute)."""
    parts: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(in_channels, out_channels, 5, padding=padding)),
        ("relu", nn.ReLU(inplace=True)),
    ]
    if pool:
        parts.append(("pool", nn.AvgPool2d(2)))
    return nn.Sequential(OrderedDict(parts))


@register_model("lenet")
def lenet(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> Classifier:
    """S1.3: LeNet-5 with relu and average pooling; 61,706 params on 28x28x1 (see the module docstring)."""
    in_channels = image_channels(input_shape, 28, "lenet")
    # same-padded C1 keeps 28x28, as LeNet-5's 32x32 input padded by 2; then pool, valid conv, pool, valid conv
    height, width = ((side // 2 - 4) // 2 - 4 for side in input_shape[1:])
    features = nn.Sequential(
        lenet_block(in_channels, 6, padding=2, pool=True),
        lenet_block(6, 16, padding=0, pool=True),
        lenet_block(16, 120, padding=0, pool=False),
    )
    head = nn.Sequential(
        nn.Flatten(),
        nn.Linear(120 * height * width, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
    return Classifier(features, head, cam_layer="features.2")
