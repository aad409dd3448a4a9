"""What a run directory gives MLflow, as data (no MLflow involved), and where a run is tracked."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dlkit.config import TrackCfg
from dlkit.errors import ConfigError
from dlkit.recipes import load_recipe
from dlkit.track import content
from dlkit.track.settings import artifact_location, checked_uri, tracking_uri


def test_the_resolved_recipe_flattens_to_dotted_params_with_json_values():
    recipe = load_recipe("digits-mlp", fields={"track.backend": "mlflow"}).model_dump(mode="json", exclude_none=True)
    params = content.flatten_params(recipe)
    assert params["name"] == "digits-mlp"
    assert params["train.optimizer.lr"] == "0.001"
    assert params["train.batch_size"] == "20"
    assert params["model.hidden"] == "[128, 64]"
    assert params["train.optimizer.betas"] == "[0.9, 0.999]"
    assert params["train.checkpoint.monitor"] == "val_accuracy"
    assert params["train.checkpoint.best"] == "true"
    assert params["expect.claims.test_accuracy"] == "0.994"
    assert params["train.stages"] == "[]"
    assert not [k for k in params if k.startswith("track")]  # where it is logged is no setting of what ran
    # every leaf of the recipe: name, description, seed, 26 data, 2 model, 36 train, 3 expect, 3 tune (its search space)
    assert len(params) == 73


def test_sections_in_lists_go_by_index_as_set_names_them():
    recipe = load_recipe("tiny-text-lstm").model_dump(mode="json", exclude_none=True)
    params = content.flatten_params(recipe)
    assert params["data.text.samples.0.text"] == "I love this phone, the battery lasts all day"
    assert params["data.text.samples.9.split"] == "test"
    assert params["model.stacked"] == "[64, 32]"


def test_values_and_keys_are_kept_within_mlflows_limits():
    kept, changed = content.within_limits({"a.b": "x" * 7000, "bad key!": "v", "k" * 251: "v", "ok": "1"},
                                          content.MAX_PARAM_VALUE)
    assert kept == {"a.b": "x" * 5997 + "...", "bad key_": "v", "ok": "1"}
    assert changed == ["a.b", "k" * 251]


def test_epoch_and_result_metrics():
    row = {"epoch": 3, "stage": 0, "train_loss": 0.25, "train_accuracy": 0.9, "val_loss": 0.3, "lr": 0.001,
           "seconds": 0.5, "note": "x", "flag": True}
    assert content.epoch_metrics(row) == {"stage": 0.0, "train_loss": 0.25, "train_accuracy": 0.9, "val_loss": 0.3,
                                          "lr": 0.001, "seconds": 0.5}
    summary = {"recipe": "r", "seed": 3, "test_accuracy": 0.97, "test_f1": 0.96, "latency_ms": 0.4, "params": 100,
               "device": "cpu", "test_roc_auc": float("nan"), "expect": {"source": "S0.1", "claims": [
                   {"metric": "test_accuracy", "claimed": 0.99, "achieved": 0.97, "status": "below"}]}}
    assert content.result_metrics(summary) == {"test_accuracy": 0.97, "test_f1": 0.96, "latency_ms": 0.4,
                                               "params": 100.0, "claimed_test_accuracy": 0.99}
    tags = content.result_tags(summary | {"precision": "fp32", "tested_weights": "last (epoch 3)"},
                               {"data_fingerprint": "abc"})
    assert tags == {"dlkit.device": "cpu", "dlkit.precision": "fp32", "dlkit.tested_weights": "last (epoch 3)",
                    "dlkit.data_fingerprint": "abc",
                    "dlkit.claim": "test_accuracy: claimed 0.99 (S0.1), ours 0.9700, below"}


def test_git_commit_of_the_working_folder(tmp_path):
    assert content.git_commit(tmp_path) == (None, False)  # not a repository
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "-C", str(repo), "add", "a.txt"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert content.git_commit(repo) == (head, False)
    (repo / "a.txt").write_text("2")
    assert content.git_commit(repo) == (head, True)


def test_the_tracking_uri_is_the_recipes_then_the_environments_then_a_sqlite_file_beside_the_runs(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, "runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert tracking_uri(None) == "http://127.0.0.1:5555"
    assert tracking_uri(TrackCfg(uri="sqlite:///x/t.db")) == f"sqlite:///{tmp_path / 'x' / 't.db'}"
    assert tracking_uri(TrackCfg(uri="sqlite:////abs/t.db")) == "sqlite:////abs/t.db"
    assert artifact_location("sqlite:////abs/t.db", "digits cnn/v2") == "file:///abs/mlartifacts/digits_cnn_v2"
    assert artifact_location("http://h:5000", "x") is None


@pytest.mark.parametrize("uri", ["runs/mlflow.db", "ftp://host/x", "mlflow.db"])
def test_a_uri_mlflow_does_not_read_is_one_error_line(uri):
    with pytest.raises(ConfigError, match=r"^tracking URI '.*' is not one MLflow reads; give http://HOST:PORT"):
        checked_uri(uri)


def test_artifact_files_are_the_run_directorys_without_checkpoints_and_status(tmp_path):
    from dlkit.rundir import RunDir

    for name in ("recipe.yaml", "metrics.jsonl", "status.json", "summary.json", "model.safetensors", "bundle.json",
                 "tracking.json", "checkpoints/last.safetensors", "plots/b.png", "plots/a.png"):
        Path(tmp_path, name).parent.mkdir(exist_ok=True)
        Path(tmp_path, name).write_text("x")
    assert content.artifact_files(RunDir(tmp_path)) == [
        "recipe.yaml", "metrics.jsonl", "summary.json", "bundle.json", "model.safetensors", "plots/a.png",
        "plots/b.png"]
