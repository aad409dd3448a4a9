"""The report at the end of a run: on by default, off with report=False / --no-report / DLKIT_REPORT=0,
and the latency a run records for compare."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from dlkit.data import load_data
from dlkit.evaluate.predictions import LATENCY_REPEATS, evaluation_notes, latency_ms, measure_test
from dlkit.recipes import load_recipe
from dlkit.runner import report_default, run

REPORT_FILES = ("report.html", "evaluation.json", "plots")


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("1", True), ("yes", True), ("0", False),
                                                 ("false", False), (" OFF ", False), ("No", False)])
def test_dlkit_report_environment_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("DLKIT_REPORT", raising=False)
    else:
        monkeypatch.setenv("DLKIT_REPORT", value)
    assert report_default() is expected


@pytest.mark.parametrize(("env", "argument", "written"), [("1", None, True), ("0", None, False),
                                                          ("1", False, False), ("0", True, True)])
def test_the_argument_wins_over_the_environment(monkeypatch, tmp_path, env, argument, written):
    monkeypatch.setenv("DLKIT_REPORT", env)
    run_dir = run("digits-mlp", epochs=1, out=tmp_path / "run", report=argument).run_dir
    assert [(run_dir / name).exists() for name in REPORT_FILES] == [written] * 3
    assert (run_dir / "summary.json").is_file() and (run_dir / "model.safetensors").is_file()


class Sleepy(nn.Module):
    """A model whose forward pass takes a known time: 2 ms of sleep plus a tiny matmul."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.002)
        return self.linear(x.flatten(1))


def test_latency_is_the_median_single_example_forward_time():
    recipe = load_recipe("digits-mlp")
    data = load_data(recipe.data, recipe.seed)
    model = Sleepy(math.prod(data.input_shape))
    ms = latency_ms(model, data.test)
    assert 2.0 <= ms < 20.0  # sleep(2 ms) is the floor; the median ignores a stray slow pass
    assert model.calls == 3 + LATENCY_REPEATS  # warm-up passes, then the timed ones, one example each
    assert model.training  # eval mode only while timing
    empty = replace(data.test, x=data.test.x[:0], y=data.test.y[:0])
    assert latency_ms(model, empty) is None


def test_a_class_missing_from_the_test_split_is_a_note_not_a_warning():
    recipe = load_recipe("digits-mlp")
    data = load_data(recipe.data, recipe.seed)
    keep = data.test.y != 9
    data = replace(data, test=replace(data.test, x=data.test.x[keep], y=data.test.y[keep]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(data.input_shape), 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics, predictions = measure_test(model, data)
    assert "test_roc_auc" not in metrics and metrics["test_accuracy"] >= 0
    assert evaluation_notes(predictions, data.classes) == [
        "ROC-AUC undefined for class 9: the test split lacks its positive or negative examples, so test_roc_auc "
        "is left out"]
    full = load_data(recipe.data, recipe.seed)
    assert evaluation_notes(measure_test(model, full)[1], full.classes) == []
    assert evaluation_notes(None, []) == []
