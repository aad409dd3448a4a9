"""torchvision-layout models: exact state_dict keys and shapes, checkpoint round trips, dlkit's surface.

torchvision cannot be installed here, so the expected key lists are written from torchvision's
model definitions (alexnet.py, vgg.py, resnet.py, mobilenetv2.py) as data and loops, independently
of dlkit's classes; the counts are torchvision's published ones.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dlkit.models import build

Keys = list[tuple[str, tuple[int, ...]]]

# name: (parameter count, state_dict key count) at 1000 classes, as torchvision's models have them
COUNTS = {
    "alexnet": (61_100_840, 16),
    "vgg11": (132_863_336, 22),
    "vgg16": (138_357_544, 32),
    "vgg16_bn": (138_365_992, 32 + 13 * 5),
    "resnet18": (11_689_512, 62 + 20 * 3),  # 20 batch norms each add 3 buffers
    "resnet50": (25_557_032, 161 + 53 * 3),
    "mobilenet_v2": (3_504_872, 158 + 52 * 3),
}
SMALL = {"alexnet": (3, 64, 64)}  # the smallest convenient input; the others take 32x32


def bn(prefix: str, channels: int) -> Keys:
    """A BatchNorm2d's entries, in PyTorch's order."""
    return [(f"{prefix}.{n}", (channels,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())
    ]


def alexnet_keys() -> Keys:
    """torchvision's AlexNet, written out."""
    convs = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
    keys = [k for i, o, c, s in convs for k in ((f"features.{i}.weight", (o, c, s, s)), (f"features.{i}.bias", (o,)))]
    for i, o, c in [(1, 4096, 9216), (4, 4096, 4096), (6, 1000, 4096)]:
        keys += [(f"classifier.{i}.weight", (o, c)), (f"classifier.{i}.bias", (o,))]
    return keys


def vgg_keys(config: str, batch_norm: bool) -> Keys:
    """torchvision's make_layers: conv [bn] relu per number, one max-pool per 'M'."""
    keys: Keys = []
    index, channels = 0, 3
    for item in config.split():
        if item == "M":
            index += 1
            continue
        width = int(item)
        keys += [(f"features.{index}.weight", (width, channels, 3, 3)), (f"features.{index}.bias", (width,))]
        if batch_norm:
            keys += bn(f"features.{index + 1}", width)
        index, channels = index + (3 if batch_norm else 2), width
    for i, o, c in [(0, 4096, 25088), (3, 4096, 4096), (6, 1000, 4096)]:
        keys += [(f"classifier.{i}.weight", (o, c)), (f"classifier.{i}.bias", (o,))]
    return keys


def resnet_keys(bottleneck: bool, depths: tuple[int, ...]) -> Keys:
    """torchvision's ResNet: stem, layer1..4 of BasicBlock / Bottleneck, 1x1-conv downsample, fc."""
    keys = [("conv1.weight", (64, 3, 7, 7)), *bn("bn1", 64)]
    channels, expansion = 64, 4 if bottleneck else 1
    for stage, (depth, planes) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for b in range(depth):
            p = f"layer{stage}.{b}"
            if bottleneck:
                convs = [(planes, channels, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, channels, 3), (planes, planes, 3)]
            for n, (o, c, s) in enumerate(convs, start=1):
                keys += [(f"{p}.conv{n}.weight", (o, c, s, s)), *bn(f"{p}.bn{n}", o)]
            if b == 0 and (stage > 1 or channels != planes * expansion):
                keys += [(f"{p}.downsample.0.weight", (planes * expansion, channels, 1, 1))]
                keys += bn(f"{p}.downsample.1", planes * expansion)
            channels = planes * expansion
    return keys + [("fc.weight", (1000, channels)), ("fc.bias", (1000,))]


def mobilenet_v2_keys() -> Keys:
    """torchvision's MobileNetV2 at width 1.0 (every width is already a multiple of 8)."""
    keys = [("features.0.0.weight", (32, 3, 3, 3)), *bn("features.0.1", 32)]
    index, channels = 1, 32
    for t, c, n in [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]:
        for _ in range(n):
            p, hidden, i = f"features.{index}.conv", channels * t, 0
            if t != 1:
                keys += [(f"{p}.0.0.weight", (hidden, channels, 1, 1)), *bn(f"{p}.0.1", hidden)]
                i = 1
            keys += [(f"{p}.{i}.0.weight", (hidden, 1, 3, 3)), *bn(f"{p}.{i}.1", hidden)]
            keys += [(f"{p}.{i + 1}.weight", (c, hidden, 1, 1)), *bn(f"{p}.{i + 2}", c)]
            index, channels = index + 1, c
    keys += [("features.18.0.weight", (1280, 320, 1, 1)), *bn("features.18.1", 1280)]
    return keys + [("classifier.1.weight", (1000, 1280)), ("classifier.1.bias", (1000,))]


VGG_A = "64 M 128 M 256 256 M 512 512 M 512 512 M"
VGG_D = "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M"
EXPECTED = {
    "alexnet": alexnet_keys,
    "vgg11": lambda: vgg_keys(VGG_A, False),
    "vgg16": lambda: vgg_keys(VGG_D, False),
    "vgg16_bn": lambda: vgg_keys(VGG_D, True),
    "resnet18": lambda: resnet_keys(False, (2, 2, 2, 2)),
    "resnet50": lambda: resnet_keys(True, (3, 4, 6, 3)),
    "mobilenet_v2": mobilenet_v2_keys,
}
ANCHORS = {
    "alexnet": {"features.0.weight": (64, 3, 11, 11), "classifier.1.weight": (4096, 9216)},
    "vgg16": {"features.28.weight": (512, 512, 3, 3), "classifier.6.weight": (1000, 4096)},
    "vgg16_bn": {"features.1.running_var": (64,), "features.40.weight": (512, 512, 3, 3)},
    "resnet18": {"layer2.0.downsample.0.weight": (128, 64, 1, 1), "bn1.num_batches_tracked": ()},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1)},
    "mobilenet_v2": {"features.1.conv.0.0.weight": (32, 1, 3, 3), "features.17.conv.2.weight": (320, 960, 1, 1)},
}


def meta_build(name: str, **kwargs: object) -> nn.Module:
    """Build without allocating or initialising weights: keys, shapes and counts only."""
    with torch.device("meta"):
        return build(name, **kwargs)


@pytest.fixture(scope="module")
def built() -> Iterator[Callable[[str], nn.Module]]:
    """Each model at 1000 classes for its small input, in eval mode, built once (VGG's init takes a second)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build(name, num_classes=1000, input_shape=SMALL.get(name, (3, 32, 32))).eval()
        return cache[name]

    yield get
    cache.clear()  # the three VGGs hold 1.6 GB


@pytest.mark.parametrize("name", list(COUNTS))
def test_state_dict_keys_shapes_and_counts_are_torchvisions(name: str) -> None:
    model = meta_build(name, num_classes=1000)
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert ours == EXPECTED[name]()
    params, keys = COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(ours) == keys
    for key, shape in ANCHORS.get(name, {}).items():
        assert dict(ours)[key] == shape


@pytest.mark.parametrize("name", list(COUNTS))
def test_checkpoint_round_trip_loads_strictly_and_gives_identical_outputs(
    name: str, built: Callable[[str], nn.Module]
) -> None:
    shape = SMALL.get(name, (3, 32, 32))
    model = built(name)
    data = save_safetensors(model.state_dict())  # refuses shared tensors: no weight is listed twice
    # a checkpoint lands in an unallocated model, as a torchvision .pth would
    fresh = meta_build(name, num_classes=1000, input_shape=shape)
    fresh.load_state_dict(load_safetensors(data), strict=True, assign=True)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_checkpoints_without_num_batches_tracked_still_load_strictly() -> None:
    # torchvision's older checkpoints predate the buffer. BatchNorm's load hook fills the missing
    # counters in when the dict has no version metadata (safetensors, a plain dict) or version 1
    # (saved by an old PyTorch); only a version-2 dict missing them fails strict loading
    torch.manual_seed(0)
    model = build("resnet18", input_shape=(3, 32, 32)).eval()
    plain = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(plain) == 102
    legacy = OrderedDict(plain)
    metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    legacy._metadata = {k: {**v, "version": 1} for k, v in metadata.items()}  # type: ignore[attr-defined]
    x = torch.randn(2, 3, 32, 32)
    for old in (plain, legacy):
        fresh = build("resnet18", input_shape=(3, 32, 32))
        fresh.load_state_dict(old, strict=True)
        assert fresh.bn1.num_batches_tracked.item() == 0
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), model(x))


CAM = {"resnet18": "layer4", "resnet50": "layer4"}  # the others: their `features`


@pytest.mark.parametrize("name", list(COUNTS))
def test_surface_is_views_over_torchvisions_modules(name: str, built: Callable[[str], nn.Module]) -> None:
    shape = SMALL.get(name, (3, 32, 32))
    model = built(name)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(model.head(model.features(x)), model(x))
    assert model.cam_layer is model.get_submodule(CAM.get(name, "features"))
    assert model.head is model.head and model.blocks[-1] is model.head
    grouped = [id(p) for block in model.blocks for p in block.parameters()]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    assert not any(path.startswith("_") for path, _ in model.named_modules())
