"""`dlkit ensemble`: finished runs combined into a run of their own that predict, evaluate, compare, export
and serve read as any run; runs that differ are refused in one line naming what differs."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.datasets import load_digits

import dlkit
from dlkit.ensemble import EnsembleError, build_ensemble, members_table, shared_split
from dlkit.evaluate.compare import compare_rows, compare_table
from dlkit.evaluate.retest import evaluate_run, load_run
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe
from dlkit.rundir import RunDir
from dlkit.serve import create_app
from dlkit.serve.export import export_onnx
from dlkit.serve.onnx_backend import OnnxBackend

SHARED = ["data.split_seed=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """digits-mlp for one epoch: seeds 0, 1, 2 on one split; seed 3 on its own split; seed 0 on 400 of
    the same split's training examples (other data, the same test split)."""
    root = tmp_path_factory.mktemp("ensemble-runs")
    made = {f"seed{s}": dlkit.run("digits-mlp", epochs=1, seed=s, overrides=SHARED, out=root / f"seed{s}").run_dir
            for s in range(3)}
    made["own_split"] = dlkit.run("digits-mlp", epochs=1, seed=3, out=root / "own_split").run_dir
    made["subset"] = dlkit.run("digits-mlp", epochs=1, overrides=[*SHARED, "data.subset=400"], out=root / "subset").run_dir
    return made


@pytest.fixture(scope="module")
def members(runs) -> list[Path]:
    return [runs["seed0"], runs["seed1"], runs["seed2"]]


@pytest.fixture(scope="module")
def averaged(members, tmp_path_factory) -> Path:
    return build_ensemble(members, out=tmp_path_factory.mktemp("ens") / "mean").run_dir


def test_an_ensemble_is_a_finished_run_whose_bundle_names_every_member(averaged, members):
    run = RunDir.open(averaged)
    bundle = run.verify()  # every file it needs, sha256-checked
    assert bundle["model"]["name"] == "ensemble"
    assert [m["name"] for m in bundle["model"]["args"]["members"]] == ["mlp"] * 3
    assert bundle["data_fingerprint"] == RunDir.open(members[0]).bundle()["data_fingerprint"]
    recipe = run.recipe()
    assert recipe.name == "digits-mlp-ensemble" and recipe.model.method == "mean"
    summary = run.summary()
    assert summary["params"] == 3 * 109_386
    assert summary["train_seconds"] == pytest.approx(sum(RunDir.open(m).summary()["train_seconds"] for m in members))


def test_each_members_metrics_are_its_own_runs_and_the_ensemble_beats_their_mean_log_loss(averaged, members):
    summary = RunDir.open(averaged).summary()
    rows = summary["ensemble"]["members"]
    assert [Path(r["run"]) for r in rows] == members and [r["seed"] for r in rows] == [0, 1, 2]
    assert [r["weight"] for r in rows] == pytest.approx([1 / 3] * 3)
    for row, path in zip(rows, members):
        own = RunDir.open(path).summary()
        for key in ("test_accuracy", "test_loss", "test_ece", "test_f1"):
            assert row[key] == pytest.approx(own[key], abs=1e-9), key  # re-measured on the same split
    # -log is convex: the log loss of the mean probability is at most the members' mean log loss
    assert summary["test_loss"] <= summary["ensemble"]["member_mean"]["test_loss"]
    table = members_table(summary)
    assert "| digits-mlp seed 2 | 0.333 |" in table and "| **ensemble (mean)** | 1 |" in table


def test_evaluate_and_predict_reproduce_the_ensemble_from_its_bundle(averaged, members):
    summary = RunDir.open(averaged).summary()
    again = evaluate_run(averaged)
    for key in ("test_accuracy", "test_loss", "test_f1", "test_ece", "test_roc_auc"):
        assert again[key] == summary[key], key  # the rebuilt model computes the same bits
    _, _, data = load_run(members[0])
    x = data.test.x[:20]
    ours = Predictor.from_run(averaged).predict_tensor(x)
    theirs = [Predictor.from_run(m).predict_tensor(x) for m in members]
    for i, row in enumerate(ours):
        for c, p in row["probabilities"].items():
            assert p == pytest.approx(sum(t[i]["probabilities"][c] for t in theirs) / 3, abs=2e-6)


def test_a_weighted_vote_predicts_the_weighted_majority(members, tmp_path):
    path = build_ensemble(members, weights=[1, 1, 3], method="vote", out=tmp_path / "vote").run_dir
    assert RunDir.open(path).recipe().model.member_weights == [1.0, 1.0, 3.0]
    _, _, data = load_run(members[0])
    x = data.test.x
    with torch.no_grad():
        member_probs = torch.stack([Predictor.from_run(m).model(x).softmax(1) for m in members])
        ensemble = Predictor.from_run(path).model(x).softmax(1)
    votes = torch.zeros(len(x), 10)
    for probs, weight in zip(member_probs, [0.2, 0.2, 0.6]):
        votes[torch.arange(len(x)), probs.argmax(1)] += weight
    # member 2 has 0.6 of the say: its answer is the vote's, whatever the others say
    assert torch.equal(ensemble.argmax(1), member_probs[2].argmax(1))
    assert torch.allclose(ensemble, votes, atol=2e-3)  # vote shares, mixed with 0.1% of the mean probability
    summary = RunDir.open(path).summary()
    assert summary["test_accuracy"] == summary["ensemble"]["members"][2]["test_accuracy"]


def test_members_on_other_training_data_with_the_same_test_split_are_taken_with_a_note(runs, tmp_path):
    result = build_ensemble([runs["seed0"], runs["subset"]], out=tmp_path / "e")
    assert result.summary["notes"][0] == ("1 of 2 members were trained on other data than the first (their data "
                                          "fingerprints differ) but share its test split")
    assert result.summary["n_test"] == RunDir.open(runs["subset"]).summary()["n_test"] == 359


def edited(run: Path, where: Path, change) -> Path:
    """A copy of `run` with bundle.json changed by `change(bundle)` (bundle.json carries no digest of itself)."""
    shutil.copytree(run, where)
    bundle = json.loads((where / "bundle.json").read_text())
    change(bundle)
    (where / "bundle.json").write_text(json.dumps(bundle))
    return where


def test_runs_that_differ_are_refused_in_one_line_naming_what_differs(runs, tmp_path):
    first, second = runs["seed0"], runs["seed1"]
    letters = edited(second, tmp_path / "letters", lambda b: b.update(classes=list("abcdefghij")))
    small = edited(second, tmp_path / "small", lambda b: b["preprocessing"].update(size=[16, 16]))
    cases = [
        ([first], {}, "an ensemble needs at least two runs, got 1"),
        ([first, second, first], {}, f"{first} is given twice (also as {first}); give each run once"),
        ([first, second], {"weights": [1, 2, 3]}, "--weights must be 2 positive numbers, one per run, got 1,2,3"),
        ([first, second], {"weights": [1, 0]}, "--weights must be 2 positive numbers, one per run, got 1,0"),
        ([first, second], {"method": "median"}, "--method must be mean or vote, got 'median'"),
        ([first, letters], {}, f"cannot ensemble {letters} with {first}: their classes differ (['a', 'b', 'c'"),
        ([first, small], {}, f"cannot ensemble {small} with {first}: their preprocessing differ (size [16, 16] vs "
                             "[28, 28]); ensembles take runs of the same task, classes and inputs"),
        ([first, runs["own_split"]], {}, f"cannot ensemble {runs['own_split']} with {first}: their test splits differ "
                                         "(data fingerprint "),
    ]
    for paths, options, message in cases:
        with pytest.raises(EnsembleError) as info:
            build_ensemble(paths, out=tmp_path / "never", **options)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()


def test_compare_puts_the_ensemble_beside_its_members_seeds(averaged, members):
    table = compare_table([*members, averaged])
    assert [(row.label, row.n) for row in table.rows] == [("digits-mlp", 3), ("digits-mlp-ensemble", 1)]
    assert table.rows[1].metrics["accuracy"].mean == RunDir.open(averaged).summary()["test_accuracy"]
    assert [row["seed"] for row in compare_rows([members[0], averaged])] == ["0", "-"]  # an ensemble has no seed


def test_the_ensemble_exports_as_one_onnx_graph_and_serves(averaged, tmp_path):
    result = export_onnx(averaged)
    assert result.max_abs_diff <= 1e-4 and result.checked_on == "test split (256)"
    run = RunDir.open(averaged)
    assert "model.onnx" in run.verify()["files"]
    backend, predictor = OnnxBackend.from_run(run), Predictor.from_run(averaged)
    digits = load_digits()
    page = tmp_path / "seven.png"  # dark ink on white paper, as a user photographs a digit
    Image.fromarray((255 - digits.images[7] * 255 / 16).astype(np.uint8)).resize((56, 56)).save(page)
    expected = predictor.predict([str(page)])[0]
    x = torch.from_numpy(np.load(io.BytesIO(_npy(predictor, page))))
    assert torch.allclose(backend(x), predictor.model(x).detach(), atol=1e-4)
    with TestClient(create_app({"ens": averaged}, backend="onnx")) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.05)
        answer = client.post("/v1/models/ens/predict", files=[("files", (page.name, page.read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"][0]
    assert served["label"] == expected["label"]
    for c, p in expected["probabilities"].items():
        assert served["probabilities"][c] == pytest.approx(p, abs=1e-4)


def _npy(predictor: Predictor, page: Path) -> bytes:
    """The page prepared as the model reads it, as .npy bytes."""
    from dlkit.data.preprocess import prep_from_dict, read_input_noted

    x, _ = read_input_noted(str(page), prep_from_dict(predictor.bundle["preprocessing"]))
    out = io.BytesIO()
    np.save(out, x.numpy())
    return out.getvalue()


def test_shared_split_fixes_the_split_seed_once():
    recipe = load_recipe("digits-mlp", seed=4)
    assert shared_split(recipe).data.split_seed == 4
    assert shared_split(load_recipe("digits-mlp", SHARED, seed=4)).data.split_seed == 0


def test_cli_ensemble_prints_the_members_beside_the_ensemble_and_its_run_last(run_cli, members, tmp_path):
    code, out, err = run_cli("ensemble", *members, "--weights", "1,1,2", "--method", "vote", "--report", "--out",
                             tmp_path / "cli")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "| run | weight | accuracy | log loss | ECE | F1 |"
    assert lines[-4].startswith("| **ensemble (vote)** | 1 | **")
    assert lines[-3].startswith("test_accuracy ") and lines[-1] == str(tmp_path / "cli")
    assert lines[-2] == f"report {tmp_path / 'cli' / 'report.html'}"
    page = (tmp_path / "cli" / "report.html").read_text()
    assert "<h2>Ensemble members</h2>" in page and all(str(m) in page for m in members)


@pytest.mark.parametrize(("args", "message"), [
    (["ensemble", "A", "B", "--weights", "1,x"], "error: --weights takes numbers separated by commas (e.g. 1,1,2), "
                                                  "got '1,x'"),
    (["run", "digits-mlp", "--ensemble"], "error: --ensemble needs --seeds 2 or more, got --seeds 1"),
])
def test_cli_mistakes_are_one_error_line(run_cli, args, message):
    code, _, err = run_cli(*args)
    assert (code, err) == (2, message + "\n")


def test_run_seeds_ensemble_trains_the_seeds_on_one_split_and_ensembles_them(run_cli, tmp_path):
    code, out, err = run_cli("run", "digits-mlp", "--epochs", "1", "--seeds", "2", "--ensemble", "--quiet",
                             "--out", tmp_path / "d")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "d" / "ensemble")
    seeds = [RunDir.open(tmp_path / "d" / f"seed-{s}").recipe() for s in (0, 1)]
    assert [(r.seed, r.data.split_seed) for r in seeds] == [(0, 0), (1, 0)]
    summary = RunDir.open(tmp_path / "d" / "ensemble").summary()
    assert [Path(m["run"]) for m in summary["ensemble"]["members"]] == [tmp_path / "d" / "seed-0", tmp_path / "d" / "seed-1"]
