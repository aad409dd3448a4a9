"""The report at the end of a run: on by default, off with report=False / --no-report / DLKIT_REPORT=0,
and the latency a run records for compare."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from dlkit.data import load_data
from dlkit.evaluate.predictions import (
    LATENCY_MIN_REPEATS,
    LATENCY_REPEATS,
    LATENCY_WARMUP,
    evaluation_notes,
    latency_ms,
    latency_stats,
    measure_test,
)
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


class Scripted(nn.Module):
    """A model whose forward pass takes the time a script says, on a fake clock it advances itself."""

    def __init__(self, features: int, seconds: list[float]) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 10)
        self.seconds, self.now, self.calls = seconds, 0.0, 0

    def clock(self) -> float:
        return self.now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.now += self.seconds[min(self.calls, len(self.seconds) - 1)]
        self.calls += 1
        return self.linear(x.flatten(1))


@pytest.fixture(scope="module")
def digits_test():
    recipe = load_recipe("digits-mlp")
    return load_data(recipe.data, recipe.seed).test


def test_latency_is_the_median_of_single_example_passes_with_its_spread(digits_test):
    # five slow warm-up passes (not timed), then passes of 1..50 ms: all 50 fit the 2 s budget
    model = Scripted(math.prod(digits_test.x.shape[1:]), [1.0] * LATENCY_WARMUP + [k / 1000 for k in range(1, 51)])
    stats = latency_stats(model, digits_test, clock=model.clock)
    # np.percentile of 1..50 ms: the median 25.5, p10 at rank 4.9 -> 5.9, p90 at rank 44.1 -> 45.1
    assert stats == {"latency_ms": 25.5, "latency_ms_p10": 5.9, "latency_ms_p90": 45.1, "latency_passes": 50}
    assert model.calls == LATENCY_WARMUP + LATENCY_REPEATS
    assert model.training  # eval mode only while timing


def test_a_slow_machine_still_gets_the_minimum_count_and_one_stray_pass_does_not_move_the_median(digits_test):
    # every pass takes 3 s (past the whole budget), one of them 30 s: still nine timed passes
    seconds = [0.0] * LATENCY_WARMUP + [3.0, 30.0] + [3.0] * 20
    model = Scripted(math.prod(digits_test.x.shape[1:]), seconds)
    stats = latency_stats(model, digits_test, clock=model.clock)
    assert stats["latency_passes"] == LATENCY_MIN_REPEATS == 9
    assert stats["latency_ms"] == 3000.0 and stats["latency_ms_p10"] == 3000.0
    assert stats["latency_ms_p90"] == pytest.approx(3000.0 + 0.2 * 27000.0)  # rank 7.2 of 9 sorted: 3000 .. 30000
    assert latency_ms(Scripted(math.prod(digits_test.x.shape[1:]), [0.0]), digits_test) >= 0.0  # real clock, median only
    empty = replace(digits_test, x=digits_test.x[:0], y=digits_test.y[:0])
    assert latency_stats(model, empty) is None and latency_ms(model, empty) is None


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
