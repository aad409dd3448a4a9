"""The run directory contract, through the Python API: what `dlkit.run` writes and who can read it back."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dlkit
import dlkit.runner as runner
from dlkit.config import parse_recipe
from dlkit.data import load_data
from dlkit.engine.checkpoint import read_meta
from dlkit.engine.loop import predict_split
from dlkit.errors import ConfigError, DlkitError, RegistryError
from dlkit.evaluate.metrics import probabilities
from dlkit.evaluate.retest import evaluate_run
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe
from dlkit.runner import RunResult

EPOCH_KEYS = {"epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
SUMMARY_KEYS = {"test_accuracy", "test_loss", "test_f1", "test_precision", "test_recall", "test_roc_auc", "test_ece",
                "latency_ms", "n_train", "n_val", "n_test", "params", "trainable_params", "train_seconds",
                "epochs_run", "device", "precision", "seed", "data_source", "expect", "class_counts"}


class TrainedRun:
    """A finished run plus what the runner itself saw: the trained model and its test logits."""

    def __init__(self, result: RunResult, model: torch.nn.Module, test_logits: torch.Tensor):
        self.result = result
        self.model = model
        self.test_logits = test_logits

    @property
    def path(self) -> Path:
        return self.result.run_dir


def train_once(name: str, epochs: int, out: Path) -> TrainedRun:
    """`dlkit.run` with a spy on the runner's test pass, so tests can compare against the trained model
    (the spy keeps the model it was given and its fp32 logits over the test split)."""
    seen: dict[str, object] = {}
    real = runner.measure_test

    def spy(model, data, *args, **kwargs):
        seen["model"] = model
        seen["logits"] = predict_split(model, data.test, device=torch.device("cpu"))
        return real(model, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "measure_test", spy)
        result = dlkit.run(name, epochs=epochs, out=out)
    return TrainedRun(result, seen["model"], seen["logits"])


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> TrainedRun:
    return train_once("digits-cnn", 1, tmp_path_factory.mktemp("contract") / "cnn")


@pytest.fixture(scope="module")
def lstm(tmp_path_factory) -> TrainedRun:
    return train_once("breast-cancer-lstm", 2, tmp_path_factory.mktemp("contract") / "lstm")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_is_exported_lazily_from_the_package():
    assert dlkit.run.__doc__ and "\n" not in dlkit.run.__doc__.strip()
    # the lazy wrapper hands its arguments on: a bad one fails as the runner's own error
    with pytest.raises(RegistryError, match="unknown recipe 'digits-cnm' \\(did you mean 'digits-cnn'\\?\\)"):
        dlkit.run("digits-cnm")


def test_run_returns_the_run_dir_summary_and_history(cnn):
    result = cnn.result
    assert isinstance(result, RunResult)
    assert result.run_dir.is_dir() and result.run_dir.name == "cnn"
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert result.history == read_jsonl(result.run_dir / "metrics.jsonl")
    assert [h["epoch"] for h in result.history] == [1]


def test_run_dir_holds_exactly_the_contract_files(cnn):
    top = sorted(p.name for p in cnn.path.iterdir())
    assert top == ["bundle.json", "checkpoints", "metrics.jsonl", "model.safetensors", "recipe.yaml", "status.json",
                   "summary.json"]
    assert json.loads((cnn.path / "status.json").read_text())["state"] == "finished"
    ck = sorted(p.name for p in (cnn.path / "checkpoints").iterdir())
    assert ck == ["best.safetensors", "last.safetensors"]  # each holds its metadata: one atomic unit
    last = read_meta(cnn.path / "checkpoints" / "last.safetensors")
    best = read_meta(cnn.path / "checkpoints" / "best.safetensors")
    assert last["epoch"] == best["epoch"] == 1
    assert best["monitor"] == "val_accuracy"  # digits-cnn's checkpoint.monitor


def test_metrics_jsonl_has_one_line_per_epoch(lstm):
    rows = read_jsonl(lstm.path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) == EPOCH_KEYS
        assert 0.0 <= row["train_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert row["train_loss"] > 0 and row["val_loss"] > 0 and row["seconds"] > 0
        assert row["lr"] == pytest.approx(0.001)  # the recipe's adam lr, constant schedule


@pytest.mark.parametrize("which, params, n, classes", [
    ("cnn", 225_034, 1797, 10),
    ("lstm", 24_641, 569, 2),
])
def test_summary_fields(request, which, params, n, classes):
    run = request.getfixturevalue(which)
    s = run.result.summary
    assert SUMMARY_KEYS <= set(s)
    assert s["n_train"] + s["n_val"] + s["n_test"] == n
    for split in ("train", "val", "test"):
        counts = s["class_counts"][split]
        assert len(counts) == classes and sum(counts) == s[f"n_{split}"]
    assert s["params"] == s["trainable_params"] == params
    assert s["params"] == sum(p.numel() for p in run.model.parameters())
    assert s["epochs_run"] == len(run.result.history)
    assert s["device"] == "cpu" and s["precision"] in ("fp32", "bf16") and s["seed"] == 0
    assert s["train_seconds"] > 0
    claims = {c["metric"]: c for c in s["expect"]["claims"]}
    assert claims["test_accuracy"]["claimed"] == (0.99 if which == "cnn" else 0.97)
    assert claims["test_accuracy"]["achieved"] == s["test_accuracy"]
    assert claims["test_accuracy"]["status"] in ("met", "below")


def test_summary_metrics_are_the_trained_models_test_metrics(lstm):
    s = lstm.result.summary
    recipe = load_recipe("breast-cancer-lstm", epochs=2)
    y = load_data(recipe.data, recipe.seed).test.y
    pred = (lstm.test_logits.reshape(-1) > 0).float()
    assert s["test_accuracy"] == (pred == y).sum().item() / len(y)
    assert 0.5 <= s["test_roc_auc"] <= 1.0
    assert {c["metric"] for c in s["expect"]["claims"]} == {"test_accuracy", "test_f1", "test_roc_auc"}


def test_recipe_yaml_reparses_into_the_same_recipe(cnn):
    raw = yaml.safe_load((cnn.path / "recipe.yaml").read_text())
    again = parse_recipe(raw, origin="recipe.yaml")
    assert again == load_recipe("digits-cnn", epochs=1)
    assert again.train.epochs == 1 and again.name == "digits-cnn"


@pytest.mark.parametrize("which", ["cnn", "lstm"])
def test_bundle_alone_rebuilds_the_trained_model(request, tmp_path, which):
    run = request.getfixturevalue(which)
    # a copy whose recipe and summary are junk: the predictor must need only bundle.json + weights
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    (copy / "recipe.yaml").write_text("this: [is not a recipe\n")
    (copy / "summary.json").write_text("{}")
    shutil.rmtree(copy / "checkpoints")
    predictor = Predictor.from_run(copy)

    recipe = load_recipe("digits-cnn" if which == "cnn" else "breast-cancer-lstm", epochs=1)
    data = load_data(recipe.data, recipe.seed)
    assert predictor.classes == data.classes
    results = predictor.predict_tensor(data.test.x)
    assert len(results) == len(data.test)
    expected = probabilities(run.test_logits, data.task)
    got = torch.tensor([[r["probabilities"][c] for c in predictor.classes] for r in results])
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert [r["label"] for r in results] == [data.classes[i] for i in expected.argmax(1).tolist()]


@pytest.mark.parametrize("which", ["cnn", "lstm"])
def test_evaluate_run_reproduces_the_summary(request, which):
    run = request.getfixturevalue(which)
    s = run.result.summary
    again = evaluate_run(run.path)
    assert again["n_test"] == s["n_test"]
    tested = sorted(k for k in s if k.startswith("test_"))
    assert tested == sorted(k for k in again if k.startswith("test_"))
    assert {k: again[k] for k in tested} == {k: s[k] for k in tested}  # the same pass over the same weights


def test_weights_are_safetensors_not_pickle(cnn):
    raw = (cnn.path / "model.safetensors").read_bytes()
    assert not raw.startswith(b"PK")  # not torch.save's zip of pickles
    # safetensors layout: u64 header length, a JSON header, then exactly the tensors' bytes
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert 8 + header_len + max(ends) == len(raw)
    state = load_file(str(cnn.path / "model.safetensors"))
    trained = cnn.model.state_dict()
    assert set(state) == set(trained) == set(header) - {"__metadata__"}
    for name, tensor in state.items():
        assert torch.equal(tensor, trained[name].cpu()), name


def test_out_at_a_non_empty_folder_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DlkitError, match="already exists and is not an empty folder"):
        dlkit.run("digits-mlp", epochs=1, out=out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, error, message", [
    (["data.name=no_such_data"], RegistryError, "unknown dataset 'no_such_data'"),
    (["model.bogus=1"], ConfigError, "unknown field 'model.bogus' for model 'mlp'"),
    (["train.early_stopping.monitor=val_bogus"], ConfigError, "'val_bogus' is not a metric of this run"),
])
def test_a_run_failing_before_training_leaves_no_run_dir(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        dlkit.run("digits-mlp", overrides=overrides, epochs=1)
    with pytest.raises(error, match=message):
        dlkit.run("digits-mlp", overrides=overrides, epochs=1, out=tmp_path / "explicit")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "explicit").exists()
