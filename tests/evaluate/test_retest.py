"""Re-testing a finished run whose data moved: --data / --data-dir say where they are now, and the
data fingerprint still guards against other data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dlkit.errors import DataError, RunDirError
from dlkit.evaluate.report import build_report
from dlkit.evaluate.retest import evaluate_run, load_run
from dlkit.runner import run


def write_csv(path: Path, seed: int = 0) -> Path:
    """120 rows of two well separated classes: four features, the label last."""
    rng = np.random.default_rng(seed)
    rows = ["a,b,c,d,kind"]
    for i in range(120):
        kind = ("owl", "cat")[i % 2]
        centre = 0.0 if kind == "owl" else 3.0
        rows.append(",".join(f"{v:.3f}" for v in rng.normal(centre, 1.0, 4)) + f",{kind}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, where its CSV is now): an mlp trained one epoch on a CSV that was then moved."""
    root = tmp_path_factory.mktemp("moved")
    data = write_csv(root / "animals.csv")
    result = run("digits-mlp", epochs=1, out=root / "run", report=False,
                 overrides=["data.name=csv_table", f"data.path={data}"])
    moved = root / "elsewhere" / "animals.csv"
    moved.parent.mkdir()
    shutil.move(data, moved)
    return result.run_dir, moved


def test_a_moved_csv_is_named_with_the_option_that_finds_it(csv_run):
    run_dir, moved = csv_run
    with pytest.raises(DataError) as err:
        evaluate_run(run_dir)
    recorded = moved.parent.parent / "animals.csv"
    assert str(err.value) == (f"data file {recorded} not found; pass --data PATH to a CSV with a header row and the "
                              "label in the last column (as the run recorded its data.path; if the data moved, "
                              "pass --data PATH)")


def test_evaluate_and_report_take_the_datas_new_place(csv_run):
    run_dir, moved = csv_run
    metrics = evaluate_run(run_dir, data_path=moved)
    summary_accuracy = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    assert metrics["n_test"] == 24 and metrics["test_accuracy"] == summary_accuracy
    assert build_report(run_dir, data_path=moved) == run_dir / "report.html"
    assert (run_dir / "evaluation.json").is_file() and (run_dir / "plots" / "confusion_counts.png").is_file()
    # the run directory's recipe still says where the data were: the option is for this call only
    assert load_run(run_dir, data_path=moved)[0].recipe().data.path == str(moved.parent.parent / "animals.csv")


def test_other_data_at_the_new_place_are_still_refused(csv_run, tmp_path):
    run_dir, _ = csv_run
    other = write_csv(tmp_path / "other.csv", seed=1)
    with pytest.raises(RunDirError) as err:
        evaluate_run(run_dir, data_path=other)
    assert str(err.value) == (f"the data loaded for {run_dir} differ from the data it was trained on "
                              "(files changed?); evaluate on the original data")


def test_a_moved_data_dir_is_found_with_data_dir(mnist_dir, tmp_path):
    official = shutil.copytree(mnist_dir, tmp_path / "mnist")
    run_dir = run("digits-mlp", epochs=1, out=tmp_path / "run", report=False,
                  overrides=["data.name=mnist", f"data.data_dir={official}", "data.val_split=0.1", "data.verify=false"]).run_dir
    moved = shutil.move(official, tmp_path / "moved-mnist")
    with pytest.raises(DataError, match=r"\(as the run recorded its data.data_dir; if the data moved, pass "
                                        r"--data-dir DIR\)$"):
        evaluate_run(run_dir)
    metrics = evaluate_run(run_dir, data_dir=moved)
    assert metrics["n_test"] == 300
    assert metrics["test_accuracy"] == json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
