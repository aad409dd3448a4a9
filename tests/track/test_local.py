"""Tracking into the default store, a local SQLite file beside the runs: what a run logs, the model MLflow
loads without pickle, statuses that tell the truth, a resumed run continuing its MLflow run."""
from __future__ import annotations

import base64
import contextlib
import csv
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from torch import nn

import dlkit
from dlkit.engine.callbacks import Callback, FitState
from dlkit.errors import RunInterrupted, TrainingError
from dlkit.predict import Predictor
from dlkit.rundir import RunDir
from dlkit.track import content, resume_tracker, sync_run, tracking_outcome
from dlkit.track.logged_model import PYFUNC_LOADER, requirements

TRACK = {"track.backend": "mlflow"}


def tracking(run_dir: Path) -> dict:
    return json.loads((run_dir / "tracking.json").read_text())


def without_input(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "input"} for r in results]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A runs folder whose mlflow.db is the default store of the runs made into it."""
    return tmp_path_factory.mktemp("local") / "runs"


@pytest.fixture(scope="module")
def cnn(store) -> Path:
    """A tracked digits-cnn run (2 epochs, report written), its model registered as `digits`, made in a
    git repository with one commit."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(store.parent)]
    (store.parent / "notes.txt").write_text("the experiment's code")
    for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "one"]):
        subprocess.run([*git, *args], check=True)
    fields = TRACK | {"track.registered_model": "digits"}
    with contextlib.chdir(store.parent):
        return dlkit.run("digits-cnn", epochs=2, out=store / "cnn", runs_root=store, report=True, fields=fields).run_dir


@pytest.fixture
def load_from(monkeypatch):
    """`load_from(uri, model_uri)`: mlflow.pyfunc.load_model with MLFLOW_TRACKING_URI set for the call."""
    def load(uri: str, model_uri: str):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        return mlflow.pyfunc.load_model(model_uri)
    return load


def test_a_run_logs_its_recipe_epochs_tests_tags_and_files_and_ends_finished(tools, cnn, store):
    state = tracking(cnn)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert state["tracking_uri"] == uri and state["experiment"] == "digits-cnn" and state["run_name"] == "cnn"
    run = tools.client(uri).get_run(state["run_id"])
    assert (run.info.status, run.info.run_name) == ("FINISHED", "cnn")
    assert tools.client(uri).get_experiment(run.info.experiment_id).name == "digits-cnn"
    recipe = RunDir(cnn).recipe().model_dump(mode="json", exclude_none=True)
    assert run.data.params == content.flatten_params(recipe)
    assert run.data.params["train.epochs"] == "2" and run.data.params["train.optimizer.lr"] == "0.001"

    epochs = [json.loads(line) for line in (cnn / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert tools.history(uri, state["run_id"], key) == [(e["epoch"], e[key]) for e in epochs]
    summary = json.loads((cnn / "summary.json").read_text())
    tests = {k: v for k, v in summary.items() if k.startswith("test_")}
    assert sorted(tests) == ["test_accuracy", "test_ece", "test_f1", "test_loss", "test_precision", "test_recall",
                             "test_roc_auc", "test_top3_accuracy", "test_top5_accuracy"]
    assert {k: run.data.metrics[k] for k in tests} == tests
    assert tools.history(uri, state["run_id"], "test_accuracy") == [(2, summary["test_accuracy"])]
    assert run.data.metrics["claimed_test_accuracy"] == 0.99

    bundle = json.loads((cnn / "bundle.json").read_text())
    achieved = summary["expect"]["claims"][0]
    assert {k: v for k, v in run.data.tags.items() if k.startswith("dlkit.")} == {
        "dlkit.recipe": "digits-cnn", "dlkit.seed": "0", "dlkit.writeup": "S0.1", "dlkit.version": dlkit.__version__,
        "dlkit.run_dir": str(cnn.resolve()), "dlkit.data_fingerprint": bundle["data_fingerprint"],
        "dlkit.device": "cpu", "dlkit.precision": summary["precision"], "dlkit.tested_weights": "last (epoch 2)",
        "dlkit.claim": f"test_accuracy: claimed 0.99 (S0.1), ours {achieved['achieved']:.4f}, {achieved['status']}",
        "dlkit.training_set": "trained on 1,258 of the claim's 60,000 examples", "dlkit.status": "finished",
        "dlkit.git_dirty": "false"}  # runs/ is not tracked by git
    head = subprocess.run(["git", "-C", str(store.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()

    files = content.artifact_files(RunDir(cnn))
    assert {"report.html", "evaluation.json", "plots/curves.png", "model.safetensors", "bundle.json"} <= set(files)
    assert tools.artifact_paths(uri, state["run_id"]) == sorted(files)
    for name in ("summary.json", "plots/curves.png", "model.safetensors"):
        local = mlflow.artifacts.download_artifacts(run_id=state["run_id"], artifact_path=name, tracking_uri=uri)
        assert Path(local).read_bytes() == (cnn / name).read_bytes()
    # the artifacts live beside the store, not in whatever folder the run started from
    assert (store / "mlartifacts" / "digits-cnn").is_dir()
    assert state["sent"] | {"files": None, "model": None} == {
        "start": True, "epochs": 2, "results": True, "files": None, "model": None, "registered": "1",
        "status": "FINISHED"}
    assert set(state["sent"]["files"]) == set(files)


def test_the_model_is_code_plus_the_bundle_with_no_pickle_and_no_signature(tools, cnn, store):
    state = tracking(cnn)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    model_id = state["sent"]["model"]
    assert tools.client(uri).get_run(state["run_id"]).outputs.model_outputs[0].model_id == model_id
    location = tools.client(uri).get_logged_model(model_id).artifact_location
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    bundle = json.loads((cnn / "bundle.json").read_text())
    assert files == sorted(["MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "pyfunc_model.py",
                            *(f"artifacts/run/{name}" for name in content.model_files(bundle))])
    assert (local / "pyfunc_model.py").read_bytes() == PYFUNC_LOADER.read_bytes()
    for name in content.model_files(bundle):
        assert (local / "artifacts" / "run" / name).read_bytes() == (cnn / name).read_bytes()
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert pyfunc["model_code_path"].endswith("pyfunc_model.py")
    assert "python_model" not in pyfunc  # the cloudpickle file of a PythonModel instance
    assert "signature" not in mlmodel and "saved_input_example_info" not in mlmodel
    assert (local / "requirements.txt").read_text().split() == requirements(bundle)
    for path in local.rglob("*"):
        assert not path.name.endswith((".pkl", ".pickle", ".cloudpickle")), path


def test_the_registered_model_predicts_as_dlkit_predict(tools, cnn, store, digit_files, load_from):
    uri = f"sqlite:///{store / 'mlflow.db'}"
    version = tools.client(uri).get_model_version("digits", "1")
    model_id = tracking(cnn)["sent"]["model"]
    assert (version.source, version.run_id) == (tools.client(uri).get_logged_model(model_id).artifact_location,
                                                tracking(cnn)["run_id"])
    model = load_from(uri, "models:/digits/1")
    expected = without_input(Predictor.from_run(cnn).predict([str(p) for p in digit_files]))
    assert model.predict([base64.b64encode(p.read_bytes()).decode() for p in digit_files]) == expected
    assert model.predict([p.read_bytes() for p in digit_files]) == expected
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"inputs\[0\]: not valid base64"):
        model.predict(["not an image"])


def test_image_text_and_table_runs_predict_through_mlflow_as_dlkit_predict(runs, digit_files, tmp_path, load_from):
    """The shared runs (never tracked) are sent whole by sync, then loaded back from MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    models = {}
    for name, run_dir in runs.items():
        copy = shutil.copytree(run_dir, tmp_path / name)
        state = sync_run(copy, uri=uri)
        assert state["sent"]["status"] == "FINISHED" and state["experiment"] == name
        models[name] = (load_from(uri, f"models:/{state['sent']['model']}"), Predictor.from_run(copy))

    model, predictor = models["digits-cnn"]
    images = [base64.b64encode(p.read_bytes()).decode() for p in digit_files]
    assert model.predict(images) == without_input(predictor.predict([str(p) for p in digit_files]))

    model, predictor = models["tiny-text-lstm"]
    texts = ["I really enjoyed this book, a great read", "Terrible customer service, never again", "so so"]
    assert model.predict(texts) == without_input(predictor.predict(texts))

    model, predictor = models["breast-cancer-lstm"]
    data = load_breast_cancer(as_frame=True)
    names = predictor.bundle["preprocessing"]["feature_names"]
    rows = data.frame[names].iloc[:25]
    table = tmp_path / "rows.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([names, *rows.values.tolist()])
    expected = without_input(predictor.predict([str(table)]))  # dlkit predict rows.csv: one batch of 25
    assert len(expected) == 25
    assert model.predict(rows) == expected
    assert model.predict(rows.values.tolist()) == expected
    assert model.predict(rows.to_dict(orient="records")) == expected


def test_a_non_finite_loss_ends_failed_with_the_error_line(tools, store):
    out = store / "nan"
    with pytest.raises(TrainingError):
        dlkit.run("digits-mlp", epochs=1, out=out, runs_root=store, fields=TRACK,
                  overrides=["train.optimizer.name=sgd", "train.optimizer.lr=1e12"])
    state, status = tracking(out), json.loads((out / "status.json").read_text())
    run = tools.client(state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["dlkit.error"] == status["message"] == (
        "the training loss became nan in epoch 1; lower train.optimizer.lr or set train.grad_clip")
    assert run.data.tags["dlkit.status"] == "failed"
    assert run.data.metrics == {}  # no epoch finished
    assert tools.artifact_paths(state["tracking_uri"], state["run_id"]) == ["metrics.jsonl", "recipe.yaml"]
    assert state["sent"]["model"] is None


def test_an_exception_ends_failed_and_ctrl_c_ends_killed(tools, store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the test split   vanished")

    monkeypatch.setattr("dlkit.runner.measure_test", broken)
    with pytest.raises(RuntimeError):
        dlkit.run("digits-mlp", epochs=1, out=store / "error", runs_root=store, fields=TRACK)
    state = tracking(store / "error")
    run = tools.client(state["tracking_uri"]).get_run(state["run_id"])
    assert (run.info.status, run.data.tags["dlkit.error"]) == ("FAILED", "the test split vanished")
    assert [step for step, _ in tools.history(state["tracking_uri"], state["run_id"], "train_loss")] == [1]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dlkit.runner.measure_test", ctrl_c)
    with pytest.raises(RunInterrupted):
        dlkit.run("digits-mlp", epochs=1, out=store / "killed", runs_root=store, fields=TRACK)
    state = tracking(store / "killed")
    run = tools.client(state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["dlkit.error"] == (
        "stopped after epoch 1 of 1; kept checkpoints/state-000000063.safetensors")


def test_a_resumed_run_directory_continues_the_same_mlflow_run(tools, store, monkeypatch):
    monkeypatch.setattr("dlkit.runner.measure_test", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(RunInterrupted):
        dlkit.run("digits-mlp", epochs=2, out=store / "resumed", runs_root=store, fields=TRACK)
    path = store / "resumed"
    before = tracking(path)
    uri, run_id = before["tracking_uri"], before["run_id"]
    assert tools.client(uri).get_run(run_id).info.status == "KILLED"

    tracker = resume_tracker(path)
    assert isinstance(tracker, Callback)
    state = FitState(model=nn.Identity(), epoch=2)
    tracker.on_stage_start(state)  # waits until MLflow has the run again
    run = tools.client(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and "dlkit.error" not in run.data.tags
    tracker.on_epoch_end(state, {"epoch": 3, "stage": 0, "train_loss": 0.125, "lr": 0.001})
    RunDir(path).mark("interrupted", "stopped after epoch 3 of 4; kept checkpoints/last.safetensors (epoch 3)")
    with pytest.raises(KeyboardInterrupt), tracking_outcome(tracker):
        raise KeyboardInterrupt
    after = tracking(path)
    assert after["run_id"] == run_id and after["sent"]["epochs"] == 3
    run = tools.client(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["dlkit.error"] == "stopped after epoch 3 of 4; kept checkpoints/last.safetensors (epoch 3)"
    assert [step for step, _ in tools.history(uri, run_id, "train_loss")] == [1, 2, 3]
    assert tools.history(uri, run_id, "train_loss")[-1] == (3, 0.125)
    assert len(tools.client(uri).search_runs([run.info.experiment_id], f"tags.`dlkit.run_dir` = '{path.resolve()}'")) == 1


def test_an_untracked_run_has_no_tracker_to_resume(store):
    out = dlkit.run("digits-mlp", epochs=1, out=store / "plain", runs_root=store).run_dir
    assert resume_tracker(out) is None and not (out / "tracking.json").exists()


def test_a_numpy_engine_run_is_sent_once_finished(tools, store):
    result = dlkit.run("scratch-linreg", out=store / "numpy", runs_root=store, fields=TRACK)
    state = tracking(result.run_dir)
    uri = state["tracking_uri"]
    run = tools.client(uri).get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert tools.history(uri, state["run_id"], "train_loss") == [(e["epoch"], e["train_loss"]) for e in result.history]
    assert run.data.metrics["test_mse"] == result.summary["test_mse"]
    assert state["sent"]["model"] is not None
