"""The from-scratch recipes through `dlkit run`: NumPy training, the usual run directory, and the
PyTorch twin beside it."""
from __future__ import annotations

import json

import pytest

from dlkit import run
from dlkit.errors import ConfigError
from dlkit.evaluate.retest import evaluate_run
from dlkit.predict import Predictor

CONTRACT = {"recipe.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "bundle.json", "checkpoints", "status.json"}


def test_scratch_linreg_learns_the_fahrenheit_line_and_matches_least_squares(tmp_path):
    result = run("scratch-linreg", out=tmp_path / "run")
    s = result.summary
    assert abs(s["weight"] - 1.8) < 0.02 and abs(s["bias"] - 32) < 0.5
    assert s["weight"] == pytest.approx(s["closed_form_weight"], abs=1e-6)
    assert s["bias"] == pytest.approx(s["closed_form_bias"], abs=1e-5)
    assert s["test_mse"] < 2.0  # the pairs' noise has variance 1
    assert [c["status"] for c in s["expect"]["claims"]] == ["met", "met"]
    assert {p.name for p in result.run_dir.iterdir()} == CONTRACT
    losses = [json.loads(line)["train_loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 100 and losses[-1] < losses[0] / 1000
    (boiling,) = Predictor.from_run(result.run_dir).predict(["100"])  # the bundle serves the learned line
    assert boiling["value"] == pytest.approx(s["weight"] * 100 + s["bias"], rel=1e-6)


@pytest.mark.parametrize(("recipe", "floor"), [("scratch-mlp", 0.9), ("scratch-moons", 0.95)])
def test_scratch_networks_learn_and_equal_their_pytorch_twin(recipe, floor, tmp_path):
    result = run(recipe, out=tmp_path / "run")
    s = result.summary
    assert s["test_accuracy"] >= floor
    assert s["torch_test_accuracy"] == s["test_accuracy"]
    assert s["numpy_vs_torch_max_weight_diff"] < 1e-10  # hand-written backprop == autograd, step by step
    again = evaluate_run(result.run_dir)  # the saved torch mlp gives the NumPy network's answers
    assert again["test_accuracy"] == s["test_accuracy"]
    assert again["test_loss"] == pytest.approx(s["test_loss"], rel=1e-6)


@pytest.mark.parametrize(("override", "message"), [
    ("train.optimizer.name=adam", "train.engine=numpy trains model.name=mlp with train.optimizer.name=sgd "
                                  "(momentum allowed), one stage, nothing frozen"),
    ("model.dropout=0.2", "train.engine=numpy has no dropout: remove model.dropout"),
])
def test_scratch_mistakes_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        run("scratch-mlp", overrides=[override])
    assert str(err.value) == message


def test_regression_with_hidden_layers_is_refused():
    with pytest.raises(ConfigError, match=r"single neuron: set model.hidden=\[\]$"):
        run("scratch-linreg", overrides=["model.hidden=[4]"])
