"""The `dlkit` command end to end, as a user runs it: a subprocess, plain output, one-line errors."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

DIGIT_CLASSES = [str(i) for i in range(10)]
RESULT_KEYS = {"input", "label", "confidence", "probabilities"}


def dlkit_cli(*args: object, cwd: Path) -> tuple[int, str, str]:
    """Run `python -m dlkit ARGS` in `cwd`; return (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dlkit", *map(str, args)], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "NO_COLOR": "1"}, timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


def ok(*args: object, cwd: Path) -> str:
    """stdout of a command that must succeed cleanly."""
    rc, out, err = dlkit_cli(*args, cwd=cwd)
    assert rc == 0, err
    assert "Traceback" not in out + err
    return out


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def predictions(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.strip().splitlines()]


def check_result(result: dict, classes: list[str]) -> None:
    """The schema of one prediction line: label, its confidence, probabilities over every class."""
    assert set(result) == RESULT_KEYS
    probs = result["probabilities"]
    assert list(probs) == classes
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert result["label"] in classes
    assert result["label"] == max(probs, key=probs.get)
    assert result["confidence"] == probs[result["label"]]


# ---- runs shared by the module: each recipe trained once, through the CLI, concurrently ----------------

QUIET_RUNS = {"mlp": ("digits-mlp", 1), "cnn": ("digits-cnn", 2), "lstm": ("breast-cancer-lstm", 2)}


@pytest.fixture(scope="module")
def quiet_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """key -> (run dir, stdout) of `dlkit run RECIPE --epochs N --quiet --out DIR`."""
    root = tmp_path_factory.mktemp("cli-runs")
    with ThreadPoolExecutor(max_workers=len(QUIET_RUNS)) as pool:
        futures = {key: pool.submit(ok, "run", recipe, "--epochs", epochs, "--quiet", "--out", root / key, cwd=root)
                   for key, (recipe, epochs) in QUIET_RUNS.items()}
        return {key: (root / key, future.result()) for key, future in futures.items()}


@pytest.fixture(scope="module")
def mlp_run(quiet_runs) -> tuple[Path, str]:
    return quiet_runs["mlp"]


@pytest.fixture(scope="module")
def cnn_run(quiet_runs) -> Path:
    return quiet_runs["cnn"][0]


@pytest.fixture(scope="module")
def lstm_run(quiet_runs) -> Path:
    return quiet_runs["lstm"][0]


# ---- list / describe --------------------------------------------------------------------------------

def test_list_shows_recipes_models_and_datasets(tmp_path):
    lines = ok("list", cwd=tmp_path).splitlines()
    assert [line for line in lines if not line.startswith(" ")] == ["recipes:", "models:", "datasets:"]
    cnn = next(line for line in lines if line.split()[0] == "digits-cnn")
    assert "S0.1" in cnn and "test_accuracy 0.99" in cnn and "S0.1 CNN on sklearn's handwritten digits" in cnn
    lstm = next(line for line in lines if line.split()[0] == "breast-cancer-lstm")
    assert "test_accuracy 0.97, test_f1 0.96, test_roc_auc 0.99" in lstm


@pytest.mark.parametrize("kind, expected", [
    ("recipes", {"breast-cancer-lstm", "digits-cnn", "digits-mlp"}),
    ("models", {"lstm", "mlp", "seed_cnn"}),
    ("datasets", {"breast_cancer", "csv_table", "digits"}),
])
def test_list_one_kind(tmp_path, kind, expected):
    lines = ok("list", kind, cwd=tmp_path).splitlines()
    assert lines[0] == f"{kind}:"
    assert all(line.startswith("  ") for line in lines[1:])
    names = {line.split()[0] for line in lines[1:]}
    assert expected <= names
    if kind == "models":
        mlp = next(line for line in lines if line.split()[0] == "mlp")
        assert re.fullmatch(r"\s+mlp\s+args: hidden, dropout, activation", mlp)


LIGHT_COMMANDS = [("--version",), ("--help",), ("list", "recipes"), ("list", "models"), ("list", "datasets"),
                  ("list",), ("run", "--help"), ("ui", "--help"), ("track", "sync", "--help")]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_neither_torch_nor_sklearn_nor_mlflow(tmp_path, args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlkit", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "dlkit.cli" in imported  # the log is read right
    assert {"torch", "sklearn", "matplotlib", "mlflow"} & imported == set()


def test_version(tmp_path):
    import dlkit

    assert ok("--version", cwd=tmp_path) == f"dlkit {dlkit.__version__}\n" == "dlkit 0.1.0\n"


def test_the_listing_index_equals_the_registries():
    """`dlkit list` reads names, arguments and descriptions from the source; the registries are the truth."""
    from dlkit.catalog import declared_datasets, declared_models
    from dlkit.data import DATASETS
    from dlkit.models import MODELS, model_args

    assert [d.name for d in declared_models()] == MODELS.names()
    assert {d.name: list(d.args) for d in declared_models()} == {n: model_args(n) for n in MODELS.names()}
    assert [d.name for d in declared_datasets()] == DATASETS.names()
    assert {d.name: d.description for d in declared_datasets()} == {n: DATASETS.get(n).description for n in DATASETS}


def test_the_index_reads_descriptions_given_as_literals_or_constants(tmp_path, monkeypatch):
    from dlkit import registry

    folder = tmp_path / "dlkit" / "fake"
    folder.mkdir(parents=True)
    (folder / "one.py").write_text(
        'ABOUT = "Ten digits, one constant"\n'
        '@register_dataset("b", description=ABOUT)\ndef load_b(cfg, seed): ...\n'
        '@register_dataset("a", shape=None, description="Literal" " joined")\ndef load_a(cfg, seed): ...\n'
        '@register_model("m")\ndef m(num_classes=2, input_shape=(1,), width=4, *, depth=2): ...\n')
    monkeypatch.setattr(registry, "__file__", str(tmp_path / "dlkit" / "registry.py"))
    registry.declared.cache_clear()
    try:
        assert registry.declared("dlkit.fake", "register_dataset") == (
            registry.Declared("a", "dlkit.fake.one", ("cfg", "seed"), "Literal joined"),
            registry.Declared("b", "dlkit.fake.one", ("cfg", "seed"), "Ten digits, one constant"))
        assert registry.declared("dlkit.fake", "register_model") == (
            registry.Declared("m", "dlkit.fake.one", ("width", "depth"), None),)
    finally:
        registry.declared.cache_clear()


def help_text(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dlkit", *args, "--help"], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_shows_what_options_mean_not_their_types():
    text = help_text("run")
    for tag in ("<bool>", "<list[str]>", "<int range>", "[x>=1]", "<int>", "<str>  ", "<path>"):
        assert tag not in text.split("Options:")[1], tag
    assert "  --set FIELD=VALUE       Override a recipe field: FIELD=VALUE (repeatable).\n" in text
    assert "  --seeds N               Run N seeds (the recipe's, then the next ones) and\n" in text
    assert "  -q, --quiet             No progress output.\n" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for command in ("train", "describe", "evaluate", "predict", "report", "explain", "compare", "list"):
        options = help_text(command).split("Options:")[1]
        assert not re.search(r"<[a-z\[\] ]+>", options), (command, options)


def test_describe_prints_the_layer_table(tmp_path):
    lines = ok("describe", "digits-cnn", cwd=tmp_path).splitlines()
    assert lines[0] == "recipe digits-cnn: model seed_cnn, input (1, 28, 28), 10 outputs"
    assert "Total params: 225,034" in lines
    assert "Trainable params: 225,034" in lines
    assert "Non-trainable params: 0" in lines
    conv = next(line for line in lines if line.startswith("features.0.conv (Conv2d)"))
    assert conv.split()[-1] == "320"  # 3*3*1*32 + 32


def test_describe_json(tmp_path):
    info = json.loads(ok("describe", "digits-mlp", "--json", cwd=tmp_path))
    assert info["recipe"] == "digits-mlp" and info["model"] == "mlp"
    assert info["input_shape"] == [1, 28, 28] and info["num_outputs"] == 10
    assert info["params"] == info["trainable_params"] == 109_386
    assert sum(row["params"] for row in info["rows"]) == info["params"]
    linear = [row for row in info["rows"] if row["kind"] == "Linear"]
    assert [row["params"] for row in linear] == [784 * 128 + 128, 128 * 64 + 64, 64 * 10 + 10]
    assert linear[-1]["output_shape"] == [None, 10]


# ---- run / train ------------------------------------------------------------------------------------

def test_run_quiet_prints_only_the_run_dir(mlp_run):
    out, stdout = mlp_run
    assert stdout.splitlines() == [str(out)]
    assert read_json(out / "summary.json")["epochs_run"] == 1
    assert not (out / "report.html").exists()  # the suite runs with DLKIT_REPORT=0


def test_run_prints_one_plain_line_per_epoch_and_options_take_effect(tmp_path):
    out = tmp_path / "mine"
    stdout = ok("run", "digits-mlp", "--epochs", 2, "--seed", 3, "--set", "train.batch_size=64",
                "--set", "model.dropout=0.25", "--out", out, "--report", cwd=tmp_path)
    lines = stdout.splitlines()
    assert len(lines) == 5, stdout  # no progress bar, no escape codes: stdout is a pipe
    for n, line in enumerate(lines[:2], start=1):
        assert re.fullmatch(rf"epoch {n}/2  train_loss \S+  train_accuracy \S+  val_loss \S+  "
                            r"val_accuracy \S+  lr 0\.001  seconds \S+", line), line
    summary = read_json(out / "summary.json")
    assert lines[2] == (f"test_accuracy {summary['test_accuracy']:.4f}  test_f1 {summary['test_f1']:.4f}"
                        f"  test_roc_auc {summary['test_roc_auc']:.4f}  (claimed test_accuracy 0.994, S2.3)")
    assert lines[3] == f"report {out / 'report.html'}"
    assert (out / "report.html").is_file() and (out / "plots" / "curves.png").is_file()
    assert lines[4] == str(out)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["seed"] == 3 and recipe["train"]["epochs"] == 2 and recipe["train"]["batch_size"] == 64
    assert recipe["model"] == {"name": "mlp", "hidden": [128, 64], "dropout": 0.25}
    assert summary["seed"] == 3 and summary["epochs_run"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_weights_none_with_a_frozen_base_runs_with_one_warning(tmp_path):
    rc, out, err = dlkit_cli("run", "digits-mlp", "--epochs", 1, "--set", "model.weights=none", "--set",
                             "train.freeze=base", "--quiet", "--out", "r", cwd=tmp_path)
    warning = ("model.weights is none (random initialisation) but train.freeze: base: the head trains on random "
               "features; set model.weights (e.g. imagenet) or train.freeze: none")
    assert (rc, out, err) == (0, "r\n", f"warning: {warning}\n")
    assert read_json(tmp_path / "r" / "summary.json")["notes"][0] == warning
    recipe = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    assert "weights" not in recipe["model"] and recipe["data"]["normalize"] == "scale"


def test_train_on_a_registered_dataset(tmp_path):
    stdout = ok("train", "--model", "mlp", "--data", "digits", "--epochs", 1, "--quiet", cwd=tmp_path)
    run_dir = tmp_path / last_line(stdout)
    assert re.fullmatch(r"runs/mlp-digits-\d{8}-\d{6}(-\d+)?", last_line(stdout))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["data"]["name"] == "digits" and recipe["model"]["name"] == "mlp"
    assert recipe["train"]["epochs"] == 1 and recipe["train"]["optimizer"]["name"] == "adam"
    summary = read_json(run_dir / "summary.json")
    assert summary["recipe"] == "mlp-digits" and summary["n_test"] == 359 and summary["epochs_run"] == 1


def test_train_on_a_csv_file_then_predict_a_row(tmp_path):
    rng = np.random.default_rng(0)
    centers = {"owl": [0, 0, 0, 0], "cat": [4, 4, 0, 0], "dog": [0, 4, 4, 4]}
    with open(tmp_path / "animals.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "c", "d", "kind"])
        for i in range(180):
            kind = list(centers)[i % 3]
            writer.writerow([*(np.array(centers[kind]) + rng.normal(0, 1, 4)).round(3), kind])
    stdout = ok("train", "--model", "mlp", "--data", "animals.csv", "--epochs", 10, "--lr", 0.01, "-q",
                cwd=tmp_path)
    run_dir = tmp_path / last_line(stdout)
    summary = read_json(run_dir / "summary.json")
    assert summary["recipe"] == "mlp-animals"
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 180
    assert summary["test_accuracy"] >= 0.9
    bundle = read_json(run_dir / "bundle.json")
    assert bundle["classes"] == ["cat", "dog", "owl"]
    assert bundle["preprocessing"]["feature_names"] == ["a", "b", "c", "d"]
    (result,) = predictions(ok("predict", run_dir, "0,4,4,4", cwd=tmp_path))
    check_result(result, ["cat", "dog", "owl"])
    assert result["label"] == "dog" and result["input"] == "0,4,4,4"
    # the CSV moves: evaluate and report say how to find it, and take --data
    moved = tmp_path / "archive" / "animals.csv"
    moved.parent.mkdir()
    (tmp_path / "animals.csv").rename(moved)
    rc, out, err = dlkit_cli("evaluate", run_dir, cwd=tmp_path)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.endswith("(as the run recorded its data.path; if the data moved, pass --data PATH)\n")
    metrics = json.loads(ok("evaluate", run_dir, "--data", moved, cwd=tmp_path))
    assert metrics["test_accuracy"] == summary["test_accuracy"] and metrics["n_test"] == summary["n_test"]
    assert ok("report", run_dir, "--data", "archive/animals.csv", cwd=tmp_path).strip() == str(run_dir / "report.html")
    assert (run_dir / "plots" / "confusion_counts.png").is_file()


# ---- evaluate / predict / compare ----------------------------------------------------------------------

def test_evaluate_prints_the_summarys_test_metrics(tmp_path, lstm_run):
    metrics = json.loads(ok("evaluate", lstm_run, cwd=tmp_path))
    summary = read_json(lstm_run / "summary.json")
    assert metrics["recipe"] == "breast-cancer-lstm" and metrics["n_test"] == summary["n_test"] == 114
    tested = {k for k in summary if k.startswith("test_")}
    assert tested == {"test_accuracy", "test_loss", "test_f1", "test_precision", "test_recall", "test_roc_auc",
                      "test_ece"}  # two classes: no top-k
    assert {k: metrics[k] for k in tested} == {k: summary[k] for k in tested}  # one pass, the same weights
    assert metrics["latency_ms"] > 0 and summary["latency_ms"] > 0


def _save_grey(pixels: np.ndarray, path: Path, mode: str = "L") -> Path:
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(path)
    return path


def test_predict_digit_images_dark_on_light_and_light_on_dark(tmp_path, cnn_run):
    digit = np.rint(load_digits().images[7] * 255 / 16)  # an 8x8 "7", ink 0..16
    white_on_black = _save_grey(digit, tmp_path / "white_on_black.png")
    ink_on_paper = _save_grey(255 - digit, tmp_path / "ink_on_paper.png", mode="RGB")
    results = predictions(ok("predict", cnn_run, white_on_black, ink_on_paper, cwd=tmp_path))
    assert [r["input"] for r in results] == [str(white_on_black), str(ink_on_paper)]
    for r in results:
        check_result(r, DIGIT_CLASSES)
    # a light background is inverted and RGB turned grey, so both files are the same digit to the model
    a, b = (r["probabilities"] for r in results)
    assert max(abs(a[c] - b[c]) for c in DIGIT_CLASSES) < 1e-4


def test_predict_a_test_split_digit_gets_its_label(tmp_path, cnn_run):
    from dlkit.data import load_data
    from dlkit.predict import Predictor
    from dlkit.rundir import RunDir

    recipe = RunDir.open(cnn_run).recipe()
    test = load_data(recipe.data, recipe.seed).test
    scored = Predictor.from_run(cnn_run).predict_tensor(test.x)
    # the test digit the model is surest of, among those it gets right
    right = [(r["confidence"], i) for i, r in enumerate(scored) if r["label"] == str(int(test.y[i]))]
    confidence, i = max(right)
    assert confidence > 0.9
    png = _save_grey(np.rint(255 * (1 - test.x[i, 0].numpy())), tmp_path / "digit.png")  # dark ink on white
    (result,) = predictions(ok("predict", cnn_run, png, cwd=tmp_path))
    check_result(result, DIGIT_CLASSES)
    assert result["label"] == str(int(test.y[i]))


def test_predict_many_inputs_reports_a_bad_one_in_place_and_exits_1(tmp_path, cnn_run):
    digit = np.rint(load_digits().images[7] * 255 / 16)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        _save_grey(digit, folder / name)
    (folder / "notes.txt").write_text("not an image")  # skipped: only image files count
    (folder / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    single = _save_grey(digit, tmp_path / "seven.png")
    rc, out, err = dlkit_cli("predict", cnn_run, "scans", "missing.png", "empty", single, cwd=tmp_path)
    assert rc == 1 and "Traceback" not in out + err
    assert err == 'error: 3 of 6 inputs could not be predicted; see their "error" lines\n'
    results = predictions(out)
    # the folder's images in name order, in the folder's place
    assert [r["input"] for r in results] == ["scans/a.png", "scans/b.png", "scans/broken.png", "missing.png", "empty",
                                             str(single)]
    for r in (results[0], results[1], results[5]):
        check_result(r, DIGIT_CLASSES)
        assert r["probabilities"] == results[0]["probabilities"]  # the same digit three times
    expect = "expected an image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a .npy array in [0, 1]"
    assert results[2] == {"input": "scans/broken.png", "error": "scans/broken.png: not a readable image "
                          f"(cannot identify image file 'scans/broken.png'); {expect}"}
    assert results[3] == {"input": "missing.png", "error": f"missing.png: file not found; {expect}"}
    assert results[4] == {"input": "empty", "error": "empty: folder holds no image files (.png, .jpg, .jpeg, .bmp, "
                          ".gif, .tif, .tiff, .webp, .npy); give image files or a folder of them"}


def test_predictor_raises_on_a_bad_input_unless_asked_to_report_it(tmp_path, cnn_run):
    from dlkit.errors import InputError
    from dlkit.predict import Predictor

    predictor = Predictor.from_run(cnn_run)
    good = str(_save_grey(np.rint(load_digits().images[7] * 255 / 16), tmp_path / "good.png"))  # not blank: no note
    with pytest.raises(InputError, match="^nope.png: file not found"):
        predictor.predict([good, "nope.png"])
    reported = predictor.predict([good, "nope.png"], errors="report")
    assert [set(r) for r in reported] == [RESULT_KEYS, {"input", "error"}]


def test_predict_table_rows_from_csv_and_inline(tmp_path, lstm_run):
    data = load_breast_cancer()
    names = list(data.feature_names)
    with open(tmp_path / "all.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(data.data.tolist())
    # the same first 3 rows with the columns in reverse order: columns are matched by name
    with open(tmp_path / "reversed.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names[::-1])
        writer.writerows(row[::-1] for row in data.data[:3].tolist())
    inline = ",".join(repr(v) for v in data.data[0].tolist())
    results = predictions(ok("predict", lstm_run, "all.csv", "reversed.csv", inline, cwd=tmp_path))
    assert len(results) == 569 + 3 + 1
    assert [r["input"] for r in results[:2]] == ["all.csv:1", "all.csv:2"]
    assert results[-1]["input"] == inline
    for r in results:
        check_result(r, ["malignant", "benign"])
    # the same rows in a batch of 3 (and of 1) as in the batch of 569: float32 sums depend on the batch's
    # make-up by about 1e-7 (README, Prediction), so the printed 6th decimal may differ by one
    same = [(results[569 + i], results[i]) for i in range(3)] + [(results[-1], results[0])]
    for again, first in same:
        assert again["label"] == first["label"]
        assert again["probabilities"] == pytest.approx(first["probabilities"], abs=1.5e-6)
    # raw rows get the training split's scaling: the whole data set is mostly classified right
    labels = [r["label"] for r in results[:569]]
    accuracy = np.mean([label == data.target_names[t] for label, t in zip(labels, data.target)])
    assert accuracy >= 0.85


def test_compare_groups_runs_by_recipe_in_the_format_asked(tmp_path, lstm_run, cnn_run):
    lines = ok("compare", lstm_run, cnn_run, lstm_run, cwd=tmp_path).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["recipe", "n", "accuracy"] and len(lines) == 4  # the repeated run counts once
    lstm = read_json(lstm_run / "summary.json")
    assert lines[2].split("|")[3].strip() == f"{lstm['test_accuracy']:.4f}"
    table = ok("compare", lstm_run, cnn_run, "--format", "csv", cwd=tmp_path).splitlines()
    assert table[0].startswith("recipe,n,seeds,accuracy_mean") and len(table) == 3
    assert ok("compare", lstm_run, "--format", "html", cwd=tmp_path).startswith("<table")


def test_compare_keeps_apart_runs_whose_recipes_differ_in_more_than_the_seed(tmp_path, lstm_run):
    # the same run with its recipe.yaml saying 1 epoch and another seed: a run made with --epochs 1
    other = shutil.copytree(lstm_run, tmp_path / "short")
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["train"]["epochs"], recipe["seed"] = 1, 5
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (other / "summary.json").write_text(json.dumps({**read_json(other / "summary.json"), "seed": 5}))
    lines = ok("compare", lstm_run, other, cwd=tmp_path).splitlines()
    accuracy = f"{read_json(lstm_run / 'summary.json')['test_accuracy']:.4f}"
    assert [[c.strip() for c in line.split("|")[1:4]] for line in lines[2:4]] == [
        ["breast-cancer-lstm (train.epochs=2)", "1", accuracy], ["breast-cancer-lstm (train.epochs=1)", "1", accuracy]]
    assert lines[4:] == ["", "- runs of breast-cancer-lstm differ in train.epochs: kept apart"]
    recipe["train"]["epochs"] = 2  # now only the seed differs: one row over two runs
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    lines = ok("compare", lstm_run, other, cwd=tmp_path).splitlines()
    assert len(lines) == 3 and [c.strip() for c in lines[2].split("|")[1:3]] == ["breast-cancer-lstm", "2"]
    assert lines[2].split("|")[3].strip() == f"{accuracy} ± 0.0000"


def test_compare_per_run_prints_a_markdown_table(tmp_path, lstm_run, cnn_run):
    lines = ok("compare", lstm_run, cnn_run, "--per-run", cwd=tmp_path).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["recipe", "seed", "test_accuracy", "test_f1", "test_roc_auc", "claimed", "params", "train_s"]
    assert re.fullmatch(r"\|(-+\|)+", lines[1])
    assert len({len(line) for line in lines}) == 1  # aligned columns
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    for row, path in zip(rows, (lstm_run, cnn_run)):
        summary = read_json(path / "summary.json")
        assert row["recipe"] == summary["recipe"]
        assert row["test_accuracy"] == f"{summary['test_accuracy']:.4f}"
        assert row["params"] == f"{summary['params']:,}"
    assert rows[0]["recipe"] == "breast-cancer-lstm" and rows[0]["claimed"] == "accuracy 0.97, f1 0.96, roc_auc 0.99"
    cnn_auc = read_json(cnn_run / "summary.json")["test_roc_auc"]
    assert rows[1]["recipe"] == "digits-cnn" and rows[1]["test_roc_auc"] == f"{cnn_auc:.4f}"
    assert rows[1]["params"] == "225,034"


# ---- user errors: one line on stderr, exit code 2, no traceback ----------------------------------------
# Each case runs in its own folder; the subprocesses run concurrently, since most of each one's time
# is importing torch. "{mlp}" / "{lstm}" stand for the module's trained runs.

@dataclass(frozen=True)
class UserError:
    id: str
    args: tuple[str, ...]
    message: str  # must appear in the one stderr line


USER_ERRORS = [
    UserError("recipe-typo", ("run", "digits-cnm"), "unknown recipe 'digits-cnm' (did you mean 'digits-cnn'?)"),
    UserError("set-unknown-field", ("run", "digits-mlp", "--set", "train.bogus=1"),
              "unknown field 'train.bogus'; allowed here: epochs"),
    UserError("set-bad-literal", ("run", "digits-mlp", "--set", "train.epochs=abc"), "field 'train.epochs' got 'abc'"),
    UserError("set-bad-choice", ("run", "digits-mlp", "--set", "train.optimizer.name=adamm"),
              "field 'train.optimizer.name' got 'adamm' (did you mean 'adam'?)"),
    UserError("set-no-equals", ("run", "digits-mlp", "--set", "train.epochs"), "--set expects FIELD=VALUE"),
    UserError("set-unknown-dataset", ("run", "digits-mlp", "--set", "data.name=nope"), "unknown dataset 'nope'"),
    UserError("negative-epochs", ("run", "digits-mlp", "--epochs", "-1"), "--epochs must be 0 or more, got -1"),
    UserError("epochs-not-int", ("run", "digits-mlp", "--epochs", "abc"), "Invalid value for '--epochs'"),
    UserError("train-unknown-model", ("train", "--model", "mpl", "--data", "digits"),
              "unknown model 'mpl' (did you mean 'mlp'?)"),
    UserError("train-unknown-dataset", ("train", "--model", "mlp", "--data", "nope"),
              "unknown dataset 'nope'; available: "),
    UserError("train-model-data-mismatch", ("train", "--model", "seed_cnn", "--data", "breast_cancer"),
              "a CNN needs images"),
    UserError("recipe-file-missing", ("run", "nope.yaml"), "recipe file nope.yaml not found"),
    UserError("recipe-file-bad-yaml", ("run", "bad.yaml"), "recipe file bad.yaml is not valid YAML at line 2"),
    UserError("unknown-device", ("run", "digits-mlp", "--device", "tpu"), "field 'train.device' got 'tpu'"),
    UserError("predict-no-run", ("predict", "missing-run", "x.png"), "run directory missing-run not found"),
    UserError("predict-incomplete-run", ("predict", "incomplete", "digit.png"),
              "incomplete is not a finished run (missing bundle.json)"),
    UserError("predict-missing-input", ("predict", "{mlp}", "nofile.png"), "nofile.png: file not found"),
    UserError("predict-garbage-image", ("predict", "{mlp}", "garbage.png"), "garbage.png: not a readable image"),
    UserError("predict-empty-folder", ("predict", "{mlp}", "taken"), "taken: folder holds no image files (.png, "),
    UserError("predict-csv-wrong-width", ("predict", "{lstm}", "wrong.csv"),
              "wrong.csv: expected 30 values per row (mean radius, ...), got 29"),
    UserError("predict-inline-short", ("predict", "{lstm}", "1,2,3"), "input '1,2,3': expected 30 values per row"),
    UserError("explain-not-an-image-model", ("explain", "{lstm}", "x.png"),
              "dlkit explain draws Grad-CAM over images; the model of"),
    UserError("compare-bad-format", ("compare", "{lstm}", "--format", "xlsx"),
              "unknown table format 'xlsx'; choose md, csv or html"),
    UserError("evaluate-no-run", ("evaluate", "missing-run"), "run directory missing-run not found"),
    UserError("evaluate-incomplete-run", ("evaluate", "incomplete"), "incomplete is not a finished run"),
    UserError("unknown-option", ("run", "digits-mlp", "--bogus"), "No such option: --bogus"),
    UserError("missing-argument", ("run",), "Missing argument 'RECIPE'"),
    UserError("predict-no-input", ("predict", "{mlp}"), "Missing argument 'INPUT...'"),
    UserError("out-not-empty", ("run", "digits-mlp", "--epochs", "1", "--out", "taken"),
              "--out taken already exists and is not an empty folder"),
    UserError("seeds-below-one", ("run", "digits-mlp", "--seeds", "0"), "--seeds must be 1 or more, got 0"),
    UserError("list-unknown-kind", ("list", "wrongthing"),
              "cannot list 'wrongthing'; choose recipes, models, datasets or all"),
]
if not torch.cuda.is_available():  # on a GPU machine `--device cuda` would train
    USER_ERRORS.append(UserError("no-cuda", ("run", "digits-mlp", "--device", "cuda"),
                                 "device 'cuda' is not available"))


def _bad_inputs(folder: Path, mlp_run: Path) -> None:
    """Broken or unsuitable inputs, a --out folder already taken and a run missing its bundle."""
    (folder / "bad.yaml").write_text("name: x\ndata: name: digits\n")
    (folder / "garbage.png").write_bytes(b"\x00garbage, not a PNG" * 10)
    _save_grey(np.zeros((8, 8)), folder / "digit.png")
    (folder / "wrong.csv").write_text("\n".join(",".join(["1.5"] * 29) for _ in range(2)) + "\n")
    (folder / "taken").mkdir()
    (folder / "taken" / "keep.txt").write_text("keep me")
    shutil.copytree(mlp_run, folder / "incomplete")
    (folder / "incomplete" / "bundle.json").unlink()


@pytest.fixture(scope="module")
def user_error_outputs(tmp_path_factory, mlp_run, lstm_run) -> dict[str, tuple[Path, int, str, str]]:
    """Every case's (folder, exit code, stdout, stderr), run concurrently."""
    root = tmp_path_factory.mktemp("user-errors")
    runs = {"mlp": str(mlp_run[0]), "lstm": str(lstm_run)}
    folders = {}
    for case in USER_ERRORS:
        folders[case.id] = root / case.id
        folders[case.id].mkdir()
        _bad_inputs(folders[case.id], mlp_run[0])
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {case.id: pool.submit(dlkit_cli, *(a.format(**runs) for a in case.args), cwd=folders[case.id])
                   for case in USER_ERRORS}
        return {key: (folders[key], *future.result()) for key, future in futures.items()}


@pytest.mark.parametrize("case", USER_ERRORS, ids=lambda case: case.id)
def test_user_error_is_one_line_exit_2(user_error_outputs, case):
    folder, rc, out, err = user_error_outputs[case.id]
    assert "Traceback" not in out + err
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("error: "), err
    assert case.message in err, err
    assert out == ""
    # nothing was created or changed: no run folder, the taken --out folder is as it was
    assert not (folder / "runs").exists()
    assert [p.name for p in (folder / "taken").iterdir()] == ["keep.txt"]
    assert (folder / "taken" / "keep.txt").read_text() == "keep me"
