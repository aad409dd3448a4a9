"""The offline experiments' acceptance targets: each packaged recipe at its full settings (no epoch cut).

These run in every `pytest` invocation (each recipe trains in seconds on a CPU); deselect them with
`-m "not slow"` when iterating.
"""
from __future__ import annotations

import json

import pytest

import dlkit
from dlkit.recipes import load_recipe

# recipe -> minimum test metrics on its seed-0 split (the acceptance targets; measured on
# seed 0: mnist5k-cnn 0.974, digits-cnn 0.983 in the MNIST layout, digits-mlp 0.969)
TARGETS = {
    "mnist5k-cnn": {"test_accuracy": 0.965},
    "digits-cnn": {"test_accuracy": 0.97},
    "digits-mlp": {"test_accuracy": 0.95},
    "breast-cancer-lstm": {"test_accuracy": 0.95, "test_roc_auc": 0.98},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(TARGETS))
def test_recipe_reaches_its_target(tmp_path, recipe):
    result = dlkit.run(recipe, out=tmp_path / recipe)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    configured = load_recipe(recipe).train.epochs
    assert summary["epochs_run"] == configured  # the full schedule, no early stop or cut
    for metric, minimum in TARGETS[recipe].items():
        assert summary[metric] >= minimum, f"{recipe}: {metric} {summary[metric]:.4f} < {minimum}"
    if recipe == "digits-mlp":
        assert summary["params"] == summary["trainable_params"] == 109_386  # S2.3's count
