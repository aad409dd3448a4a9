"""The image-model zoo: the from-scratch models layer by layer, the torchvision-layout surface, summaries."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import build
from dlkit.models.resnet import PadShortcut
from dlkit.models.summary import summarize

ZOO = {
    "lenet": (1, 28, 28),
    "alexnet32": (3, 32, 32),
    "zfnet": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "alexnet": (3, 64, 64),
    "vgg11": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "vgg16_bn": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "resnet50": (3, 32, 32),
    "mobilenet_v2": (3, 32, 32),
}
SMALL = {"alexnet": (3, 64, 64)}  # the torchvision-layout models take 32x32 but AlexNet (63x63 at least)
FIRST_CONV = {"resnet18": "conv1.weight", "resnet50": "conv1.weight", "mobilenet_v2": "features.0.0.weight"}
TORCHVISION = ["alexnet", "vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2"]


def meta_build(name: str, **kwargs: object) -> nn.Module:
    """Build without allocating or initialising weights: keys, shapes and counts only."""
    with torch.device("meta"):
        return build(name, **kwargs)


def shapes(name: str, **kwargs: object) -> dict[str, tuple[int | None, ...] | None]:
    """Each leaf layer's output shape for one image of the model's default input."""
    return {row.name: row.output_shape for row in summarize(build(name, **kwargs), ZOO[name]).rows}


def test_lenet_is_lenet5_with_c5_as_the_dense120() -> None:
    summary = summarize(build("lenet"), (1, 28, 28))
    seen = {row.name: row.output_shape for row in summary.rows}
    assert seen["features.0.conv"] == (None, 6, 28, 28) and seen["features.0.pool"] == (None, 6, 14, 14)
    assert seen["features.1.conv"] == (None, 16, 10, 10) and seen["features.1.pool"] == (None, 16, 5, 5)
    assert seen["features.2.conv"] == (None, 120, 1, 1) and seen["head.0"] == (None, 120)
    assert [type(m).__name__ for m in build("lenet").features[0]] == ["Conv2d", "ReLU", "AvgPool2d"]
    assert [row.params for row in summary.rows if row.params] == [156, 2_416, 48_120, 10_164, 850]


@pytest.mark.parametrize(
    ("name", "kernels", "pooled"),
    [
        ("alexnet32", [3, 5, 3, 3, 3], {"features.0.pool": 16, "features.1.pool": 8, "features.4.pool": 4}),
        ("zfnet", [7, 5, 3, 3, 3], {"features.0.pool": 16, "features.1.pool": 8, "features.4.pool": 4}),
    ],
)
def test_five_conv_nets_pool_32_down_to_4(name: str, kernels: list[int], pooled: dict[str, int]) -> None:
    model = build(name)
    assert [m.kernel_size[0] for m in model.modules() if isinstance(m, nn.Conv2d)] == kernels
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [4096, 4096, 10]
    seen = shapes(name)
    assert {key: seen[key][-1] for key in pooled} == pooled
    assert seen["head.0"] == (None, 256 * 4 * 4)
    assert model.cam_layer is model.features[4]


@pytest.mark.parametrize(("name", "n"), [("resnet20", 3), ("resnet56", 9)])
def test_cifar_resnets_have_6n_plus_2_layers_and_three_stages(name: str, n: int) -> None:
    model = build(name).eval()
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 * n + 2  # option A shortcuts add no layers
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert not hasattr(model, "layer4") and isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.layer1(model.features[:4](x)).shape == (2, 16, 32, 32)
        assert model.features(x).shape == (2, 64, 8, 8)
        assert torch.equal(model.head(model.features(x)), model(x))
    assert model.cam_layer is model.layer3
    assert model.blocks[1:] == [model.layer1, model.layer2, model.layer3, model.head]


def test_option_a_shortcut_subsamples_and_zero_pads_the_channels() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    model = build("resnet20")
    assert isinstance(model.layer2[0].downsample, PadShortcut) and model.layer1[0].downsample is None
    assert sum(p.numel() for p in model.layer2[0].downsample.parameters()) == 0


def test_bad_shapes_and_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.shortcut"):
        build("resnet20", shortcut="C")
    with pytest.raises(ConfigError, match="too small for lenet"):
        build("lenet", input_shape=(1, 27, 28))
    with pytest.raises(ConfigError, match="too small for alexnet32"):
        build("alexnet32", input_shape=(3, 7, 7))
    with pytest.raises(ConfigError, match=r"\(channels, height, width\)"):
        build("resnet20", input_shape=(784,))


@pytest.mark.parametrize("name", list(ZOO))
def test_summary_covers_every_zoo_model(name: str) -> None:
    model = meta_build(name, input_shape=ZOO[name])  # shapes and counts only: no 0.5 GB of VGG weights
    summary = summarize(model, ZOO[name])
    assert summary.params == summary.trainable_params == sum(p.numel() for p in model.parameters())
    assert sum(row.params for row in summary.rows) == summary.params
    assert summary.rows[0].kind == "Conv2d" and summary.rows[-1].kind == "Linear"
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert summary.rows[-1].output_shape == (None, last.out_features)


def test_block_groups_follow_the_layers() -> None:
    vgg = meta_build("vgg16_bn")
    assert len(vgg.blocks) == 14  # 13 conv groups, then the head
    assert [type(m).__name__ for m in vgg.blocks[1]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    resnet = meta_build("resnet18")
    assert [name for name, _ in resnet.blocks[0].named_children()] == ["conv1", "bn1", "relu", "maxpool"]
    assert resnet.blocks[1:5] == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    assert len(meta_build("mobilenet_v2").blocks) == 20 and len(meta_build("alexnet").blocks) == 6


LAST = [("alexnet", "classifier.6"), ("resnet18", "fc"), ("mobilenet_v2", "classifier.1")]


@pytest.mark.parametrize(("name", "last"), LAST)
def test_reset_classifier_replaces_only_the_final_linear(name: str, last: str) -> None:
    shape = SMALL.get(name, (3, 32, 32))
    model = build(name, input_shape=shape)
    before = {k: v.shape for k, v in model.state_dict().items()}
    model.reset_classifier(3)
    after = {k: v.shape for k, v in model.state_dict().items()}
    assert {k for k in before if before[k] != after[k]} == {f"{last}.weight", f"{last}.bias"}
    new = model.get_submodule(last)
    assert new.out_features == 3
    assert [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1] is new
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_views_follow_replaced_modules_and_copies() -> None:
    model = build("resnet18", input_shape=(3, 32, 32))
    model.fc = nn.Linear(512, 2)  # the torchvision fine-tuning idiom
    assert model.head.fc is model.fc and model.blocks[-1] is model.head
    twin = copy.deepcopy(model)
    assert twin.features.conv1 is twin.conv1 and twin.head.fc is twin.fc and twin.fc is not model.fc


@pytest.mark.parametrize("name", TORCHVISION)
def test_one_channel_input_changes_only_the_first_conv(name: str) -> None:
    shape = SMALL.get(name, (3, 32, 32))
    three = {k: v.shape for k, v in meta_build(name, input_shape=shape).state_dict().items()}
    one = {k: v.shape for k, v in meta_build(name, input_shape=(1, *shape[1:])).state_dict().items()}
    first = FIRST_CONV.get(name, "features.0.weight")
    assert [k for k in three if three[k] != one[k]] == [first]
    assert one[first][1] == 1


@pytest.mark.parametrize(("name", "side"), [("alexnet", 63), ("vgg11", 32)])
def test_smallest_input_works_and_one_pixel_less_is_a_config_error(name: str, side: int) -> None:
    model = meta_build(name, num_classes=4, input_shape=(3, side, side))  # shapes only: no weights needed
    assert model(torch.zeros(1, 3, side, side, device="meta")).shape == (1, 4)
    with pytest.raises(ConfigError, match="too small"):
        build(name, input_shape=(3, side - 1, side))


def test_mobilenet_v2_trunk_is_the_keras_base_of_s3a2() -> None:
    model = meta_build("mobilenet_v2")
    trunk = sum(p.numel() for p in model.features.parameters())
    bn_channels = sum(m.num_features for m in model.features.modules() if isinstance(m, nn.BatchNorm2d))
    assert trunk == 2_223_872
    assert trunk + 2 * bn_channels == 2_257_984  # Keras also counts moving mean and variance
