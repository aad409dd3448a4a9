"""dlkit tune in one process: real Optuna studies in SQLite files over digits-mlp, a few epochs each."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import optuna
import pytest
import yaml

from dlkit.files import sha256_file
from dlkit.recipes import load_recipe
from dlkit.rundir import RunDir
from dlkit.runner import run
from dlkit.tune import tune
from dlkit.tune.trials import Pruning

LR_FROM_POOR = ["train.optimizer.lr=loguniform(1e-5, 1e-1)"]
PRUNED = re.compile(r"pruned by the study after epoch (\d+) \(val_accuracy ([0-9.]+)\)")


def stored_study(folder: Path, name: str) -> optuna.Study:
    """The study as Optuna reads it back from the SQLite file in its folder."""
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(folder / 'study.db').resolve()}")


def epochs_of(run_dir: str | Path) -> list[dict]:
    return RunDir(run_dir).history()


def test_a_small_study_beats_a_poor_learning_rate_by_far(tmp_path):
    # digits-mlp started at lr 1e-5 (100 times too small): 8 trials of 3 epochs over the learning rate, the
    # batch size and the dropout (the recipe's own space, its lr range widened down to the start)
    style = lambda: {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")}  # noqa: E731
    before = style()
    result = tune("digits-mlp", trials=8, epochs=3, overrides=["train.optimizer.lr=1e-5"], space=LR_FROM_POOR,
                  study="proof")
    assert style() == before  # Optuna's plot style did not leak into dlkit's own plots (Agg was chosen: no display)
    rows = result.rows
    assert [r["trial"] for r in rows] == list(range(8)) and result.ran == list(range(8))
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    start, best = rows[0], result.best
    # trial 0 is the recipe as given: every digit called the same class, 18 of 180 and 36 of 359 right
    assert start["as_given"] and start["params"] == {"train.optimizer.lr": 1e-5, "train.batch_size": 20,
                                                     "model.dropout": 0.0}
    assert (start["value"], start["test"]["test_accuracy"]) == (18 / 180, 36 / 359)
    assert best["value"] >= 0.85 and best["test"]["test_accuracy"] >= 0.85
    assert best["value"] - start["value"] >= 0.7 and best["test"]["test_accuracy"] - start["test"]["test_accuracy"] >= 0.7
    assert best["value"] == max(r["value"] for r in rows if r["state"] == "complete")
    print(f"\nproof: val {start['value']:.4f} -> {best['value']:.4f}, test {start['test']['test_accuracy']:.4f} -> "
          f"{best['test']['test_accuracy']:.4f} (trial {best['trial']}: {best['params']})")
    study = stored_study(result.folder, "proof")
    for row, trial in zip(rows, sorted(study.trials, key=lambda t: t.number)):
        history = epochs_of(row["run_dir"])
        summary = RunDir.open(row["run_dir"]).summary()  # a finished run, pruned or not
        # Optuna saw each epoch's val_accuracy, and the trial's value is its kept (last) epoch's
        assert trial.intermediate_values == {e["epoch"]: e["val_accuracy"] for e in history}
        assert row["value"] == history[-1]["val_accuracy"] == trial.value
        assert row["test"]["test_accuracy"] == summary["test_accuracy"]
        if row["state"] == "pruned":
            epoch, value = PRUNED.fullmatch(row["note"]).groups()
            assert int(epoch) == len(history) == summary["epochs_run"] < 3 and row["note"] in summary["notes"]
            assert value == f"{history[-1]['val_accuracy']:.4g}"
        else:
            assert summary["epochs_run"] == 3
    # best.yaml is the best trial's recipe: `dlkit run` on it trains the same weights to the same test metrics
    again = run(result.folder / "best.yaml", out=tmp_path / "again")
    best_dir = Path(best["run_dir"])
    assert sha256_file(again.run_dir / "model.safetensors") == sha256_file(best_dir / "model.safetensors")
    assert again.summary["test_accuracy"] == best["test"]["test_accuracy"]
    assert (again.run_dir / "recipe.yaml").read_text() == (best_dir / "recipe.yaml").read_text()
    head = (result.folder / "best.yaml").read_text().splitlines()[:3]
    assert head[0] == f"# the best trial of study 'proof': trial {best['trial']}, val_accuracy {best['value']:.4f}"
    # study.html: self-contained, with Optuna's three plots
    page = (result.folder / "study.html").read_text()
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert [name for name, _ in images] == ["history", "importances", "parallel"]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert "http" not in page.replace('lang="en"', "") and "<script" not in page
    assert f'<a href="trial-{best["trial"]}/report.html">' not in page  # DLKIT_REPORT=0: no trial reports to link
    saved = json.loads((result.folder / "study.json").read_text())
    assert saved["best"]["trial"] == best["trial"] and saved["budget"] == 8 and saved["trials"] == rows


def test_the_budget_is_the_studys_and_the_same_command_continues_it():
    common = {"epochs": 1, "space": ["train.optimizer.lr=loguniform(1e-4, 1e-2)"], "pruner": "hyperband"}
    first = tune("digits-mlp", trials=1, **common)
    assert first.ran == [0] and [r["state"] for r in first.rows] == ["complete"]
    page = (first.folder / "study.html").read_text()
    assert "The plots need two completed trials; the study has 1." in page and "<img" not in page
    assert tune("digits-mlp", trials=1, **common).ran == []  # the study holds its one trial: nothing to do
    more = tune("digits-mlp", trials=3, **common)
    assert more.ran == [1, 2] and [r["trial"] for r in more.rows] == [0, 1, 2]
    assert more.rows[0] == first.rows[0]
    # the same study under another name draws and trains the same trials: seeded by the recipe's seed and the
    # trial's number, not by the process
    twin = tune("digits-mlp", trials=3, study="twin", **common)
    same = ("trial", "params", "value", "test")
    assert [{k: r[k] for k in same} for r in twin.rows] == [{k: r[k] for k in same} for r in more.rows]
    assert len({r["params"]["train.optimizer.lr"] for r in twin.rows}) == 3


def test_no_trial_starts_after_the_timeout():
    result = tune("digits-mlp", trials=5, epochs=1, timeout=1e-9, study="late")
    assert result.ran == [] and result.best is None and "best" not in result.files
    # the recipe as given waits, first in line, for the next command
    assert [(r["trial"], r["state"], r["as_given"]) for r in result.rows] == [(0, "waiting", True)]
    assert "No trial has completed yet." in (result.folder / "study.html").read_text()


def test_failed_trials_are_recorded_and_the_study_goes_on():
    # trial 0 runs the recipe as given (SGD at lr 1e6: the loss becomes nan); 'swish' is no activation
    result = tune("digits-mlp", trials=5, epochs=1, overrides=["train.optimizer.name=sgd", "train.optimizer.lr=1e6"],
                  space={"train.optimizer.lr": "choice(0.05, 1e6)", "model.activation": "choice(relu, swish)"},
                  pruner="none")
    rows = result.rows
    assert len(rows) == 5 and rows[0]["as_given"]
    kinds = set()
    for row in rows:
        params, path = row["params"], Path(f"runs/digits-mlp/trial-{row['trial']}")
        if params["model.activation"] == "swish":  # refused when the model is built: no run directory
            kinds.add("bad combination")
            assert (row["state"], row["note"]) == ("failed", "model.activation must be one of relu, gelu, tanh, "
                                                              "sigmoid, got 'swish'")
            assert not path.exists()
        elif params["train.optimizer.lr"] == 1e6:
            kinds.add("nan")
            assert row["state"] == "failed" and row["note"].startswith(
                "the training loss became nan in epoch 1; lower train.optimizer.lr or set train.grad_clip")
            assert RunDir(path).status()["state"] == "failed"
        else:
            kinds.add("complete")
            assert row["state"] == "complete" and row["value"] == epochs_of(path)[-1]["val_accuracy"]
    assert kinds == {"bad combination", "nan", "complete"}
    assert json.loads((result.folder / "study.json").read_text())["counts"]["failed"] == sum(
        r["state"] == "failed" for r in rows)


def test_the_pruning_callback_ends_the_whole_fit_and_the_run_still_finishes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(storage=storage, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    good.report(0.95, 1)
    study.tell(good, 0.95)
    trial = study.ask()
    recipe = load_recipe("digits-mlp", ["train.optimizer.lr=1e-5"], epochs=3)
    result = run(recipe, out=tmp_path / "pruned", callbacks=[Pruning(trial, "val_accuracy")])
    assert result.summary["epochs_run"] == 1 and len(result.history) == 1
    assert "pruned by the study after epoch 1 (val_accuracy 0.1)" in result.summary["notes"]
    assert RunDir.open(result.run_dir).verify()["files"]  # finished, bundled, tested
    assert result.summary["test_accuracy"] == 36 / 359
    assert study.trials[1].intermediate_values == {1: 0.1}


# ---- user mistakes: one `error:` line, exit code 2, nothing run ----------------------------------

TUNE = ("tune", "digits-mlp", "--trials", "2")


@pytest.mark.parametrize(("args", "message"), [
    ((*TUNE, "--space", "train.optimzer.lr=uniform(0, 1)"),
     "--space: field 'tune': 'train.optimzer.lr' names no recipe field: there is no 'optimzer' in 'train' "
     "(did you mean 'optimizer'?)"),
    ((*TUNE, "--space", "train.optimizer.lr=gauss(0, 1)"), "--space: field 'tune.train.optimizer.lr': 'gauss' is not a "
     "distribution; use one of uniform(low, high), loguniform(low, high), int(low, high[, step]), logint(low, high), "
     "choice(a, b, ...)"),
    ((*TUNE, "--space", "train.batch_size=choice(0, 32)"), "--space: field 'tune': train.batch_size: choice(0, 32) can "
     "draw 0, which the recipe refuses (field 'train.batch_size' got 0: input should be greater than or equal to 1)"),
    ((*TUNE, "--space", "lr"), "--space expects FIELD=DISTRIBUTION (e.g. 'train.optimizer.lr=loguniform(1e-4, 1e-2)'), "
     "got 'lr'"),
    ((*TUNE, "--space", "model.dropot=uniform(0, 0.5)"), "tune: unknown field 'model.dropot' for model 'mlp' "
     "(did you mean 'dropout'?); allowed: hidden, dropout, activation"),
    (("tune", "digits-cnn", "--trials", "2"), "recipe 'digits-cnn' has no tune section; give the search space with "
     "--space FIELD=DISTRIBUTION, e.g. --space 'train.optimizer.lr=loguniform(1e-4, 1e-2)'"),
    ((*TUNE, "--metric", "test_accuracy"), "--metric test_accuracy is measured on the test split, which a study must "
     "not choose on (it would overfit it); use val_accuracy"),
    ((*TUNE, "--metric", "val_acc"), "--metric val_acc is not a per-epoch metric (did you mean 'val_accuracy'?); choose "
     "val_accuracy, val_loss, train_accuracy, train_loss (a study never chooses on the test split)"),
    ((*TUNE, "--direction", "minimize"), "--direction minimize would look for the worst val_accuracy; use maximize "
     "(or leave --direction out)"),
    ((*TUNE, "--metric", "val_loss", "--direction", "down"), "--direction must be maximize or minimize, got 'down'"),
    ((*TUNE, "--pruner", "medain"), "--pruner must be one of median, hyperband, none, got 'medain' (did you mean "
     "'median'?)"),
    (("tune", "digits-mlp", "--trials", "0"), "--trials must be 1 or more, got 0"),
    (("tune", "digits-mlp"), "Missing option '--trials'"),
    ((*TUNE, "--jobs", "0"), "--jobs must be 1 or more, got 0"),
    ((*TUNE, "--timeout", "10x"), "--timeout: '10x' is not a duration; use a positive number with s, m or h, e.g. 10m"),
    ((*TUNE, "--epochs", "0"), "recipe 'digits-mlp' trains no epoch; a trial needs at least one (--epochs)"),
    ((*TUNE, "--study", "../up"), "--study '../up' must be a folder name: letters, digits, '.', '_' or '-' (starting "
     "with a letter or digit)"),
    ((*TUNE, "--storage", "no-url"), "--storage 'no-url' is not a database URL; use e.g. sqlite:///study.db or "
     "postgresql://user@host/dbname"),
])
def test_a_mistake_is_one_error_line_before_any_trial(args, message, run_cli):
    code, out, err = run_cli(*args)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {message}"] or (
        message.startswith("Missing") and err.startswith(f"error: {message}") and len(err.splitlines()) == 1)
    assert not Path("runs").exists()


def test_tune_refuses_to_run_under_torchrun(monkeypatch, run_cli):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_cli(*TUNE) == (2, "", "error: dlkit tune runs each trial in one process; start it without torchrun "
                                 "(--jobs J runs trials side by side)\n")


def test_a_storage_that_cannot_be_opened_is_one_line_without_its_password(run_cli):
    code, out, err = run_cli(*TUNE, "--storage", "postgresql://me:s3cret@127.0.0.1:1/db")
    assert code == 2 and len(err.splitlines()) == 1 and "s3cret" not in err
    assert err.startswith("error: --storage postgresql://me:***@127.0.0.1:1/db needs a database driver") or (
        err.startswith("error: cannot open --storage postgresql://me:***@127.0.0.1:1/db: "))
    assert not Path("runs").exists()


def test_a_study_refuses_other_settings_and_a_folder_of_another_studys_trials(run_cli):
    assert run_cli(*TUNE[:-1], "1", "--epochs", "1", "--quiet")[:2] == (0, "runs/digits-mlp\n")
    db = Path("runs/digits-mlp/study.db").resolve()
    code, _, err = run_cli(*TUNE, "--epochs", "1", "--space", "train.optimizer.lr=loguniform(1e-5, 1e-1)")
    assert (code, err) == (2, f"error: study 'digits-mlp' in sqlite:///{db} was started with other settings: its "
                              "search space is train.optimizer.lr: loguniform(0.0001, 0.01); train.batch_size: "
                              "choice(20, 32, 64, 128); model.dropout: uniform(0.0, 0.5); run it with the same recipe "
                              "and options, or start another with --study NAME\n")
    code, _, err = run_cli(*TUNE, "--epochs", "2")
    assert (code, err) == (2, f"error: study 'digits-mlp' in sqlite:///{db} was started with other settings: its recipe "
                              "has train.epochs = 1 (here 2); run it with the same recipe and options, or start another "
                              "with --study NAME\n")
    code, _, err = run_cli(*TUNE, "--epochs", "1", "--metric", "val_loss")
    assert code == 2 and err.startswith(f"error: study 'digits-mlp' in sqlite:///{db} was started with other settings: "
                                        "it is to maximize; its metric is val_accuracy; run it")
    db.unlink()  # the study is gone, its trials are not
    code, _, err = run_cli(*TUNE, "--epochs", "1")
    assert (code, err) == (2, f"error: runs/digits-mlp holds trials (trial-0) of a study that study 'digits-mlp' in "
                              f"sqlite:///{db} is not; choose another --study NAME or move that folder away\n")


def test_the_command_prints_the_table_the_best_trial_and_its_files(run_cli):
    code, out, err = run_cli(*TUNE, "--epochs", "1", "--study", "cli")
    assert code == 0, err
    lines = out.splitlines()
    study = json.loads(Path("runs/cli/study.json").read_text())
    best = study["best"]
    assert lines[0] == "| trial | train.optimizer.lr | train.batch_size | model.dropout | val_accuracy | state | seconds |"
    assert lines[2].startswith(f"| 0 (as given) | 0.001 | 20 | 0 | {study['trials'][0]['value']:.4f} | complete | ")
    assert lines[-4] == (f"best: trial {best['trial']}, val_accuracy {best['value']:.4f}, test_accuracy "
                         f"{best['test']['test_accuracy']:.4f} (runs/cli/trial-{best['trial']})")
    assert lines[-3:] == ["best recipe runs/cli/best.yaml (dlkit run runs/cli/best.yaml trains it again)",
                          "report runs/cli/study.html", "runs/cli"]
    trial_lines = [line for line in err.splitlines() if line.startswith("trial ")]
    assert re.fullmatch(rf"trial 0: train.optimizer.lr=0.001, train.batch_size=20, model.dropout=0 -> val_accuracy "
                        rf"{study['trials'][0]['value']:.4f} \(\d+\.\d s\)", trial_lines[0]), trial_lines[0]
    assert len(trial_lines) == 2
    assert yaml.safe_load(Path("runs/cli/best.yaml").read_text())["train"]["epochs"] == 1


@pytest.mark.parametrize("args", [("list",), ("--help",), ("tune", "--help")], ids=" ".join)
def test_startup_list_and_help_import_neither_optuna_nor_torch(args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlkit", *args], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "dlkit.cli" in imported and {"optuna", "torch", "sqlalchemy", "matplotlib"} & imported == set()
    if args[0] == "tune":
        options = proc.stdout.split("Options:")[1]
        assert not re.search(r"<[a-z\[\] ]+>", options) and max(len(line) for line in proc.stdout.splitlines()) <= 80
        assert "  --trials N              The study's budget: trials over every process that\n" in options
