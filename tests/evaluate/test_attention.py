"""Attention rollout: a trained ViT's maps find the pattern that decides the class (patterns placed
anywhere in noise, as in the Grad-CAM tests), the maths spelt out, the model left untouched, and `heat_maps`
choosing rollout for transformers and Grad-CAM for conv models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlkit.errors import InputError
from dlkit.evaluate.attention import GRADCAM, ROLLOUT, attention_rollout, explains_images, heat_maps, rollout
from dlkit.models import build

TINY = {"patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 4.0}


def test_rollout_of_a_trained_vit_peaks_on_the_pattern_that_decides_the_class(known_answer):
    learned = known_answer.learn(lambda: build("vit", num_classes=4, input_shape=(1, 32, 32), **TINY), 4,
                                 lambda model, x: attention_rollout(model, x).heatmaps, examples=400, steps=200,
                                 lr=2e-3)
    result = attention_rollout(learned.model, learned.x)
    inside = known_answer.peaks_inside(result.heatmaps, learned.corners)
    per_class = sorted(inside[learned.y == label].float().mean().item() for label in range(4))
    assert learned.accuracy > 0.95
    # measured 0.59, 0.88, 0.92, 0.97. Rollout shows where the model looks, for no class in particular,
    # so one class may be told by the others' absence and its images looked at anywhere; the rest peak
    # on their pattern
    assert per_class[1] >= 0.85, per_class
    assert learned.untrained < 0.5  # measured 0.34: the peaks follow what was learned, not just the brightest pixels


def test_the_maths_spelt_out_and_batched_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = build("vit", num_classes=3, input_shape=(2, 8, 12), **TINY).eval()
    x = torch.rand(3, 2, 8, 12)
    batched = attention_rollout(model, x, target=2)
    for i in range(len(x)):
        single = attention_rollout(model, x[i:i + 1], target=2)
        torch.testing.assert_close(single.heatmaps[0], batched.heatmaps[i], rtol=0, atol=1e-5)
    with torch.no_grad():
        logits, maps = model.attention_maps(x)
    eye = torch.eye(1 + 2 * 3)
    joint = eye
    for attention in maps:  # (mean over heads + identity) / 2, rows summing to one, then chained
        mixed = (attention.mean(1) + eye) / 2
        joint = (mixed / mixed.sum(-1, keepdim=True)) @ joint
    torch.testing.assert_close(rollout(maps), joint, rtol=0, atol=1e-6)
    cam = joint[:, 0, 1:].reshape(3, 1, 2, 3)  # the class token's row over the 2x3 patch grid
    cam = F.interpolate(cam, size=(8, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(batched.heatmaps, cam / cam.amax(dim=(1, 2), keepdim=True), rtol=0, atol=1e-6)
    assert batched.target.tolist() == [2, 2, 2]
    torch.testing.assert_close(batched.probabilities, torch.softmax(logits, 1))


def test_mean_pooling_rolls_out_every_row_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = build("vit", num_classes=2, input_shape=(1, 16, 16), pool="mean", drop_path=0.2, **TINY)
    model.train()
    model.features.blocks[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.rand(2, 1, 16, 16)
    with torch.inference_mode():
        result = attention_rollout(model, x)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        _, maps = model.attention_maps(x)
    cam = rollout(maps).mean(1).reshape(2, 1, 4, 4)  # no class token: the pooled output reads every token
    cam = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(result.heatmaps, cam / cam.amax(dim=(1, 2), keepdim=True), rtol=0, atol=1e-6)


def test_heat_maps_choose_rollout_for_transformers_and_grad_cam_for_conv_models():
    torch.manual_seed(0)
    vit = build("vit", num_classes=3, input_shape=(1, 16, 16), **TINY)
    cnn = build("seed_cnn", num_classes=3, input_shape=(1, 16, 16))
    mlp = build("mlp", num_classes=3, input_shape=(1, 16, 16))
    x = torch.rand(2, 1, 16, 16)
    method, result = heat_maps(vit, x)
    assert method == ROLLOUT and result.heatmaps.shape == (2, 16, 16)
    assert heat_maps(cnn, x)[0] == GRADCAM
    assert explains_images(vit) and explains_images(cnn) and not explains_images(mlp)
    with pytest.raises(InputError, match="has no attention maps to explain; attention rollout needs a Vision"):
        attention_rollout(cnn, x)
    with pytest.raises(InputError, match=r"\(N, C, H, W\), got shape \(1, 16, 16\)"):
        attention_rollout(vit, x[0])
    with pytest.raises(InputError, match="torch.float64 weights"):
        attention_rollout(vit.double(), x)
