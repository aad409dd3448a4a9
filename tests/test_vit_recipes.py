"""The ViT recipes: each describes without data (cifar10 is not on this machine), and mnist5k-vit-smoke
runs on the real MNIST digits through to a report with attention rollout and `dlkit explain`."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dlkit import run
from dlkit.catalog import describe_recipe
from dlkit.explain import explain_image
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe


@pytest.mark.parametrize(("recipe", "model", "params"), [
    ("mnist5k-vit", "vit_tiny_patch7", 805_130), ("mnist5k-vit-smoke", "vit_tiny_patch7", 805_130),
    ("cifar10-vit", "vit_tiny_patch4", 811_146), ("cifar10-vit-smoke", "vit_tiny_patch4", 811_146)])
def test_vit_recipes_describe_without_data_and_train_as_small_data_vits_need(recipe, model, params):
    described = describe_recipe(recipe)
    assert (described.model, described.summary.params, described.num_outputs) == (model, params, 10)
    train = load_recipe(recipe).train
    assert train.optimizer.name == "adamw" and train.optimizer.weight_decay == 0.05
    assert train.schedule.name == "cosine" and train.schedule.warmup_epochs > 0
    assert train.label_smoothing == 0.1
    assert not load_recipe(recipe).data.augment.hflip or recipe.startswith("cifar10")  # a flipped digit is another


@pytest.mark.slow
def test_mnist5k_vit_smoke_reports_attention_rollout_and_explains_a_digit(tmp_path):
    result = run("mnist5k-vit-smoke", out=tmp_path / "run", report=True)
    s = result.summary
    assert (s["n_train"], s["n_val"], s["n_test"], s["epochs_run"]) == (512, 500, 1000, 1)
    assert s["params"] == 805_130 and 0.0 <= s["test_accuracy"] <= 1.0 and np.isfinite(s["test_loss"])
    plots = {p.name for p in (result.run_dir / "plots").iterdir()}
    assert "attention_rollout.png" in plots and "gradcam.png" not in plots
    assert "Attention rollout" in (result.run_dir / "report.html").read_text()
    page = np.full((64, 64), 255, np.uint8)  # dark ink on white paper, as a user scans a digit
    page[16:48, 28:36] = 0
    Image.fromarray(page).save(tmp_path / "one.png")
    said = explain_image(result.run_dir, str(tmp_path / "one.png"))
    assert said["method"] == "Attention rollout" and said["heatmap"].endswith("one.attention.png")
    assert said["label"] == Predictor.from_run(result.run_dir).predict([str(tmp_path / "one.png")])[0]["label"]
    assert Image.open(said["heatmap"]).size[0] > 224  # the digit page enlarged, with its colour scale
