"""Grad-CAM: maps that find what a trained model learned, the same maths batched or one by one,
every conv model in the registry explained, the model left untouched, overlays as real PNGs."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dlkit.errors import InputError
from dlkit.evaluate.gradcam import evidence, gradcam, jet, overlay, save_overlay
from dlkit.models import MODELS, build

SMALL_HEAD = {"pool": "avg", "hidden": [16], "activation": "relu", "dropout": 0.0}


def test_maps_of_a_trained_model_peak_on_the_pattern_that_decides_the_class(known_answer):
    # the class is in *what* the patch shows, not where: Grad-CAM's spatially averaged channel
    # weights cannot see a class that is coded by position alone. Two classes: horizontal or vertical stripes
    learned = known_answer.learn(lambda: build("resnet20", num_classes=2, input_shape=(1, 32, 32)), 2,
                                 lambda model, x: gradcam(model, x).heatmaps, examples=200, steps=60, lr=1e-3)
    result = gradcam(learned.model, learned.x)  # padded convs: the maps line up with the pixels
    inside = known_answer.peaks_inside(result.heatmaps, learned.corners)
    assert learned.accuracy > 0.95
    assert torch.equal(result.predicted, result.target)
    for label in (0, 1):
        assert inside[learned.y == label].float().mean().item() >= 0.9
    assert learned.untrained < 0.6  # the peaks follow what was learned, not just the brightest pixels


def test_batched_maps_equal_one_image_at_a_time_and_the_reference_computation():
    torch.manual_seed(0)
    model = build("seed_cnn", num_classes=3, input_shape=(1, 20, 20))
    x = torch.rand(5, 1, 20, 20)
    targets = torch.tensor([0, 1, 2, 2, 1])
    batched = gradcam(model, x, targets)
    for i in range(len(x)):
        single = gradcam(model, x[i:i + 1], int(targets[i]))
        torch.testing.assert_close(single.heatmaps[0], batched.heatmaps[i], rtol=0, atol=1e-5)
        # the maths spelt out: seed_cnn's cam layer is the last block of `features`
        activation = model.features(x[i:i + 1]).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.head(activation)[0, targets[i]], activation)
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=(20, 20), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(batched.heatmaps[i], torch.nan_to_num(cam / cam.max()), rtol=0, atol=1e-5)
    # maps with no positive evidence for their class stay all zero, the others peak at 1
    assert batched.heatmaps.amax(dim=(1, 2)).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(batched.probabilities, torch.softmax(model(x), 1).detach())
    assert torch.equal(batched.target, targets)
    assert torch.equal(batched.predicted, model(x).argmax(1))


def test_the_model_is_left_as_it_was_even_with_every_weight_frozen_and_mixed_modes():
    torch.manual_seed(0)
    model = build("resnet20", num_classes=4, input_shape=(3, 16, 16))
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    model.layer2.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():  # a caller that switched autograd off still gets its maps
        result = gradcam(model, x, target=1)
    assert result.heatmaps.amax(dim=(1, 2)).tolist() == [1.0, 1.0, 1.0]
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.layer3._forward_hooks
    # batch norm ran in eval mode: each map is that of its image alone
    torch.testing.assert_close(gradcam(model, x[:1], target=1).heatmaps[0], result.heatmaps[0], rtol=0, atol=1e-5)


def test_hooks_are_removed_and_modes_restored_when_the_layer_is_unusable():
    model = build("seed_cnn", num_classes=2, input_shape=(1, 12, 12)).train()
    with pytest.raises(InputError, match=r"must output one \(N, K, h, w\) tensor, got shape \(2, 2\)"):
        gradcam(model, torch.rand(2, 1, 12, 12), layer=model.head)
    with pytest.raises(InputError, match="ran 0 times"):
        gradcam(model, torch.rand(2, 1, 12, 12), layer=nn.Conv2d(1, 1, 3))
    assert model.training and not model.head._forward_hooks


def test_channels_last_gives_the_same_maps():
    torch.manual_seed(0)
    model = build("resnet20", num_classes=3, input_shape=(3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    expected = gradcam(model, x).heatmaps
    model.to(memory_format=torch.channels_last)
    result = gradcam(model, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(result.heatmaps, expected, rtol=0, atol=1e-5)


def test_one_logit_binary_model_explains_each_class_with_the_logits_sign():
    torch.manual_seed(0)
    model = build("seed_cnn", num_classes=1, input_shape=(1, 20, 20))
    x = torch.rand(6, 1, 20, 20)
    class0, class1 = gradcam(model, x, 0), gradcam(model, x, 1)
    p = torch.sigmoid(model(x)[:, 0]).detach()
    torch.testing.assert_close(class1.probabilities, torch.stack([1 - p, p], 1))
    assert torch.equal(class1.predicted, (p > 0.5).long())
    assert torch.equal(class0.target, torch.zeros(6, dtype=torch.long))
    assert (class0.heatmaps - class1.heatmaps).abs().amax(dim=(1, 2)).min() > 0.1


class Brightness(nn.Module):
    """Class 1's logit is the mean of a ReLU'd conv map, class 0's its negative: the map argues only for class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
        self.cam_layer = self.features  # activations A >= 0

    def forward(self, x: Tensor) -> Tensor:
        score = self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1)


def test_a_class_that_nothing_in_the_layer_supports_gets_an_empty_map():
    torch.manual_seed(0)
    model = Brightness()
    x = torch.rand(3, 1, 12, 12)
    supported, against = gradcam(model, x, 1), gradcam(model, x, 0)
    assert all(evidence(m) for m in supported.heatmaps)
    assert supported.heatmaps.amax(dim=(1, 2)).tolist() == [1.0, 1.0, 1.0]
    # every weight w_k is negative for class 0, so relu(sum_k w_k A_k) is zero everywhere: no evidence
    assert not any(evidence(m) for m in against.heatmaps)
    assert torch.equal(against.heatmaps, torch.zeros(3, 12, 12))


# every conv model of the registry, at a small input; (input_shape, builder arguments)
CONV_CASES: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "alexnet": ((3, 63, 63), {}),  # its 11x11/4 conv and three 3x3/2 pools need 63x63
    "alexnet32": ((3, 32, 32), {"dense": 32}),
    "zfnet": ((3, 32, 32), {"dense": 32}),
    "lenet": ((1, 28, 28), {}),
    "seed_cnn": ((1, 28, 28), {}),
    "seed_cnn3": ((3, 32, 32), {"batch_norm": True}),
    "resnet20": ((3, 32, 32), {}),
    "resnet56": ((3, 32, 32), {}),
    "resnet18": ((3, 64, 64), {}),
    "resnet50": ((3, 64, 64), {}),
    "mobilenet_v2": ((3, 64, 64), {"head": SMALL_HEAD}),  # a replaced head still reaches the trunk
    "vgg11": ((3, 32, 32), {}),
    "vgg16": ((3, 32, 32), {}),
    "vgg16_bn": ((3, 64, 64), {"head": SMALL_HEAD}),
}
NO_CAM_CASES: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "mlp": ((1, 28, 28), {}),
    "lstm": ((30,), {}),
}
TOKEN_MODELS = {"distilbert", "hf_text"}  # no cam layer either; building one means importing transformers
ENSEMBLES = {"ensemble"}  # conv members or not, no one layer: refused below
# no cam layer: attention rollout explains them (test_attention.py)
ATTENTION_MODELS = {"vit", "vit_tiny_patch4", "vit_tiny_patch7", "hf_vit"}


def test_every_registered_model_is_covered():
    assert set(MODELS.names()) == set(CONV_CASES) | set(NO_CAM_CASES) | TOKEN_MODELS | ENSEMBLES | ATTENTION_MODELS


def test_an_ensemble_of_conv_models_is_refused_in_one_line():
    members = [{"name": "seed_cnn", "args": {}}, {"name": "lenet", "args": {}}]
    model = build("ensemble", num_classes=3, input_shape=(1, 28, 28), members=members)
    with pytest.raises(InputError) as info:
        gradcam(model, torch.rand(2, 1, 28, 28))
    assert str(info.value) == ("an ensemble has no one conv layer to explain (Grad-CAM follows one model's); "
                               "explain one of its members' runs")


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_every_conv_model_gives_finite_maps_of_the_input_size_in_0_1(name):
    torch.manual_seed(0)
    shape, kwargs = CONV_CASES[name]
    model = build(name, num_classes=3, input_shape=shape, **kwargs)
    result = gradcam(model, torch.rand(2, *shape))
    assert result.heatmaps.shape == (2, *shape[1:])
    assert result.heatmaps.dtype == torch.float32 and torch.isfinite(result.heatmaps).all()
    assert result.heatmaps.min() >= 0
    assert set(result.heatmaps.amax(dim=(1, 2)).tolist()) <= {0.0, 1.0}  # each map scaled by its own max
    assert result.probabilities.shape == (2, 3) and result.predicted.shape == result.target.shape == (2,)


@pytest.mark.parametrize("name", sorted(NO_CAM_CASES))
def test_models_without_conv_layers_are_refused(name):
    shape, kwargs = NO_CAM_CASES[name]
    model = build(name, num_classes=2, input_shape=shape, **kwargs)
    message = "model Classifier has no conv layer to explain; Grad-CAM needs a conv model"
    with pytest.raises(InputError) as info:
        gradcam(model, torch.rand(2, *shape))
    assert str(info.value) == message


@pytest.mark.parametrize(("target", "match"), [
    (3, r"class indices in 0\.\.2, got 3"),
    (torch.tensor([0, -1]), r"class indices in 0\.\.2, got -1"),
    (torch.tensor([0, 1, 2]), r"one per image \(2\), got 3"),
])
def test_bad_targets_are_refused(target, match):
    model = build("seed_cnn", num_classes=3, input_shape=(1, 12, 12))
    with pytest.raises(InputError, match=match):
        gradcam(model, torch.rand(2, 1, 12, 12), target)


def test_bad_inputs_and_half_precision_models_are_refused():
    model = build("seed_cnn", num_classes=3, input_shape=(1, 12, 12))
    with pytest.raises(InputError, match=r"\(N, C, H, W\), got shape \(1, 12, 12\)"):
        gradcam(model, torch.rand(1, 12, 12))
    with pytest.raises(InputError, match="torch.float64 weights; call model.float"):
        gradcam(model.double(), torch.rand(2, 1, 12, 12))


def test_overlay_blends_the_colour_map_by_heat():
    grey = np.full((3, 4, 5), 0.5, dtype=np.float32)
    heat = np.zeros((4, 5), dtype=np.float32)
    heat[1, 2] = 1.0
    out = overlay(grey, heat, alpha=0.45)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert (out[0, 0] == [128, 128, 128]).all()  # no heat: the image itself
    expected = np.round((0.55 * 0.5 + 0.45 * jet(np.array(1.0))) * 255)  # jet(1) is dark red (0.5, 0, 0)
    assert out[1, 2].tolist() == expected.tolist() == [128, 70, 70]
    one_channel = overlay(torch.full((1, 4, 5), 0.5), torch.from_numpy(heat))
    plain = overlay(torch.full((4, 5), 0.5), heat)
    assert np.array_equal(one_channel, out) and np.array_equal(plain, out)
    with pytest.raises(InputError, match="does not match"):
        overlay(grey, np.zeros((5, 4)))


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(colours, [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_save_overlay_writes_a_png_of_the_image_size_atomically(tmp_path):
    image, heat = torch.rand(3, 10, 14), torch.rand(10, 14)
    path = save_overlay(tmp_path / "cams" / "one.png", image, heat)
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG" and png.size == (14, 10) and png.mode == "RGB"
        assert np.array_equal(np.asarray(png), overlay(image, heat))
    titled = save_overlay(tmp_path / "cams" / "titled.png", image, heat, title="cat 0.93")
    with Image.open(titled) as png:
        png.load()
        assert png.width >= 14 and png.height > 10
        assert np.array_equal(np.asarray(png)[-10:, :14], overlay(image, heat))  # the image sits under the title
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["one.png", "titled.png"]  # no temp files left
