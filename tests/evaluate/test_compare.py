"""The results table over hand-made run folders: statistics over seeds, grouping, claims and the three formats."""
from __future__ import annotations

import copy
import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from dlkit.errors import ConfigError, RunDirError
from dlkit.evaluate.compare import Stat, compare_rows, compare_runs, compare_table, load_runs, markdown_table, render
from dlkit.rundir import REQUIRED, RunDir

MNIST_CLAIM = {"source": "S0.1", "claims": [{"metric": "test_accuracy", "claimed": 0.99}]}


def make_run(root: Path, name: str, recipe: str = "mnist-cnn", seed: int = 0, accuracy: float | None = 0.9,
             settings: dict | None = None, **fields) -> Path:
    """A finished run folder as RunDir.open checks it, with the summary fields a test chooses and a
    recipe.yaml of its name, seed and `settings`."""
    path = root / name
    path.mkdir()
    resolved = {"name": recipe, "seed": seed, **copy.deepcopy(settings or {})}
    (path / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    (path / "bundle.json").write_text(json.dumps({"format": "dlkit-bundle/1"}), encoding="utf-8")
    (path / "model.safetensors").write_bytes(b"")
    summary = {"recipe": recipe, "seed": seed, "params": 1234, "train_seconds": 2.0, **copy.deepcopy(fields)}
    if accuracy is not None:
        summary["test_accuracy"] = accuracy
        for claim in summary.get("expect", {}).get("claims", []):
            claim["achieved"] = accuracy
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (path / "status.json").write_text(json.dumps({"state": "finished"}), encoding="utf-8")
    assert sorted(p.name for p in path.iterdir()) == sorted(REQUIRED)
    return path


def seeds(root: Path, recipe: str, accuracies: list[float], **fields) -> list[Path]:
    """One run per accuracy, seeds 0, 1, 2, ..."""
    return [make_run(root, f"{recipe}-{i}", recipe, seed=i, accuracy=a, **fields)
            for i, a in enumerate(accuracies)]


def md_rows(text: str) -> list[dict[str, str]]:
    """The data rows of a markdown table, keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


# ---- statistics over seeds -----------------------------------------------------------------------------

def test_three_seeds_give_mean_sample_std_and_a_t_interval(tmp_path):
    table = compare_table(seeds(tmp_path, "mnist-cnn", [0.90, 0.92, 0.94]))
    (row,) = table.rows
    acc = row.metrics["accuracy"]
    assert row.n == acc.n == 3 and row.seeds == (0, 1, 2)
    assert acc.mean == pytest.approx(0.92) and acc.std == pytest.approx(0.02)
    # 0.92 ± t(0.975, 2) * 0.02 / sqrt(3) = 0.92 ± 4.3027 * 0.011547
    assert [round(x, 4) for x in acc.ci] == [0.8703, 0.9697]
    assert md_rows(render(table, "md"))[0]["accuracy"] == "0.9200 ± 0.0200 [0.8703, 0.9697]"


def test_two_seeds_have_no_interval_and_one_run_shows_its_value(tmp_path):
    two = compare_table(seeds(tmp_path, "two", [0.90, 0.92])).rows[0].metrics["accuracy"]
    assert two.ci is None and two.std == pytest.approx(0.0141421, abs=1e-6)
    one = compare_table(seeds(tmp_path, "one", [0.9876])).rows[0].metrics["accuracy"]
    assert one.std is None and one.ci is None
    rows = md_rows(compare_runs(seeds(tmp_path, "both", [0.90, 0.92]) + seeds(tmp_path, "single", [0.9876])))
    assert [r["accuracy"] for r in rows] == ["0.9100 ± 0.0141", "0.9876"]
    assert [r["n"] for r in rows] == ["2", "1"]


def test_a_metric_a_run_lacks_is_skipped_and_all_missing_is_a_dash(tmp_path):
    runs = [make_run(tmp_path, "a", seed=0, test_f1=0.80, latency_ms=0.5, train_seconds=1.0),
            make_run(tmp_path, "b", seed=1, test_f1=0.90, train_seconds=3.0),
            make_run(tmp_path, "c", seed=2, accuracy=None, latency_ms=1.5, train_seconds=5.0)]
    (row,) = compare_table(runs).rows
    assert row.n == 3 and row.metrics["accuracy"].n == 2 and row.metrics["f1"].n == 2
    assert row.metrics["roc_auc"] is None
    assert row.latency_ms == pytest.approx(1.0) and row.train_seconds == pytest.approx(3.0)
    (cells,) = md_rows(render(compare_table(runs), "md"))
    assert cells["F1"] == "0.8500 ± 0.0707" and cells["ROC-AUC"] == "-"
    assert cells["latency (ms/ex)"] == "1" and cells["train time (s)"] == "3.0" and cells["params"] == "1,234"
    (bare,) = md_rows(compare_runs([make_run(tmp_path, "bare", "bare", accuracy=None)]))
    assert bare["accuracy"] == bare["latency (ms/ex)"] == bare["claimed"] == bare["vs claim"] == "-"


# ---- the seed's claim ----------------------------------------------------------------------------------

def test_claim_is_met_within_one_point_and_otherwise_below_by_points(tmp_path):
    below = md_rows(compare_runs(seeds(tmp_path, "mnist-cnn", [0.90, 0.92, 0.94], expect=MNIST_CLAIM)))[0]
    assert below["claimed"] == "0.99 (S0.1)" and below["vs claim"] == "below by 7.0 points"
    near = {"source": "S0.1", "claims": [{"metric": "test_accuracy", "claimed": 0.93}]}  # 0.92 is one point off
    assert md_rows(compare_runs(seeds(tmp_path, "near", [0.91, 0.93], expect=near)))[0]["vs claim"] == "met"


def test_a_validation_claim_says_so_and_an_unmeasured_one_is_not_measured(tmp_path):
    val = {"source": "S1.8", "claims": [{"metric": "val_accuracy", "claimed": 0.9194}]}
    run = make_run(tmp_path, "vgg", "catsdogs-vgg16-features", accuracy=None, expect=val)
    (row,) = compare_table([run]).rows
    assert row.claim.metric == "val_accuracy" and row.claim.achieved is None
    (cells,) = md_rows(render(compare_table([run]), "md"))
    assert cells["claimed"] == "0.9194 val (S1.8)" and cells["vs claim"] == "not measured"


# ---- grouping ------------------------------------------------------------------------------------------

def test_runs_group_by_recipe_in_first_seen_order(tmp_path):
    runs = [make_run(tmp_path, "b0", "b-recipe", 0, 0.5), make_run(tmp_path, "a0", "a-recipe", 0, 0.7),
            make_run(tmp_path, "b1", "b-recipe", 1, 0.6)]
    table = compare_table(runs)
    assert [(r.recipe, r.n, r.seeds) for r in table.rows] == [("b-recipe", 2, (0, 1)), ("a-recipe", 1, (0,))]
    assert table.rows[0].metrics["accuracy"].mean == pytest.approx(0.55) and table.notes == []


def test_the_same_run_given_twice_counts_once(tmp_path, monkeypatch):
    run = make_run(tmp_path, "r", seed=3)
    monkeypatch.chdir(tmp_path)
    assert len(load_runs([run, Path("r"), f"{run}/", tmp_path / "r" / ".." / "r"])) == 1
    (row,) = compare_table([run, "r"]).rows
    assert row.n == 1 and row.seeds == (3,)


def test_runs_sharing_a_seed_are_noted_not_refused(tmp_path):
    runs = [make_run(tmp_path, "x", seed=0, accuracy=0.9), make_run(tmp_path, "y", seed=0, accuracy=0.9),
            make_run(tmp_path, "z", seed=1, accuracy=0.9, params=99)]
    table = compare_table(runs)
    assert table.rows[0].n == 3
    assert table.notes == ["2 runs of mnist-cnn share seed 0",
                           "runs of mnist-cnn differ in params (1,234, 99); showing the first"]
    assert render(table, "md").splitlines()[-3:] == ["", f"- {table.notes[0]}", f"- {table.notes[1]}"]


def test_runs_whose_recipes_differ_in_more_than_the_seed_are_kept_apart(tmp_path):
    # three seeds of digits-cnn at 2 epochs and one run made with --epochs 1: not four seeds
    runs = seeds(tmp_path, "digits-cnn", [0.97, 0.98, 0.99], settings={"train": {"epochs": 2, "batch_size": 32}})
    runs.append(make_run(tmp_path, "short", "digits-cnn", seed=3, accuracy=0.80,
                         settings={"train": {"epochs": 1, "batch_size": 32}}))
    table = compare_table(runs)
    assert [(r.label, r.n, r.seeds) for r in table.rows] == [("digits-cnn (train.epochs=2)", 3, (0, 1, 2)),
                                                             ("digits-cnn (train.epochs=1)", 1, (3,))]
    assert table.notes == ["runs of digits-cnn differ in train.epochs: kept apart"]
    lines = render(table, "md").splitlines()
    assert [(r["recipe"], r["n"], r["accuracy"]) for r in md_rows("\n".join(lines))] == [
        ("digits-cnn (train.epochs=2)", "3", "0.9800 ± 0.0100 [0.9552, 1.0000]"),
        ("digits-cnn (train.epochs=1)", "1", "0.8000")]
    assert lines[-2:] == ["", "- runs of digits-cnn differ in train.epochs: kept apart"]
    rows = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert [(r["recipe"], r["variant"], r["n"], r["seeds"]) for r in rows] == [
        ("digits-cnn", "train.epochs=2", "3", "0 1 2"), ("digits-cnn", "train.epochs=1", "1", "3")]
    page = render(table, "html")
    assert '<td class="col-recipe">digits-cnn (train.epochs=1)</td>' in page
    assert '<td class="note" colspan="10">runs of digits-cnn differ in train.epochs: kept apart</td>' in page
    # the per-run table stays one row per run
    assert [r["seed"] for r in compare_rows(runs)] == ["0", "1", "2", "3"]


def test_only_the_seed_may_differ_and_every_differing_field_is_named(tmp_path):
    base = {"data": {"name": "digits", "augment": {"hflip": False}}, "model": {"name": "seed_cnn"},
            "train": {"stages": [{"epochs": 2}, {"epochs": 3}]}}
    other = copy.deepcopy(base)
    other["data"]["augment"]["hflip"] = True
    other["model"]["weights"] = "imagenet"
    other["train"]["stages"][1]["epochs"] = 1
    runs = [make_run(tmp_path, "a", seed=0, settings=base), make_run(tmp_path, "b", seed=7, settings=base),
            make_run(tmp_path, "c", seed=0, settings=other)]
    table = compare_table(runs)
    assert [(r.label, r.seeds) for r in table.rows] == [
        ("mnist-cnn (data.augment.hflip=false, train.stages.1.epochs=3, +1 more)", (0, 7)),
        ("mnist-cnn (data.augment.hflip=true, train.stages.1.epochs=1, +1 more)", (0,))]
    # fields in the order first seen; one only some runs set counts as null in the others
    differ = "data.augment.hflip, train.stages.1.epochs, model.weights"
    assert table.notes == [f"runs of mnist-cnn differ in {differ}: kept apart"]  # no shared-seed note: own seeds
    three = compare_table(runs[:2] + [make_run(tmp_path, "d", seed=1, settings={**base, "model": {"name": "x"}})])
    assert [r.label for r in three.rows] == ["mnist-cnn (model.name=seed_cnn)", "mnist-cnn (model.name=x)"]


@pytest.mark.parametrize(("content", "problem"), [
    ("name: [unclosed\n", "is not valid YAML at line 2; re-run the recipe"),
    ("- just\n- a list\n", "holds no recipe mapping; re-run the recipe"),
])
def test_a_recipe_yaml_that_cannot_be_read_is_one_error_naming_it(tmp_path, content, problem):
    good, bad = make_run(tmp_path, "good"), make_run(tmp_path, "bad")
    (bad / "recipe.yaml").write_text(content, encoding="utf-8")
    with pytest.raises(RunDirError) as err:
        compare_runs([good, bad])
    assert str(err.value) == f"{bad / 'recipe.yaml'} {problem}"
    assert len(compare_rows([good, bad])) == 2  # the per-run table reads summaries only


# ---- formats -------------------------------------------------------------------------------------------

def test_markdown_has_one_column_count_and_width_on_every_line(tmp_path):
    runs = seeds(tmp_path, "mnist-cnn", [0.90, 0.92, 0.94], expect=MNIST_CLAIM, latency_ms=0.0123)
    lines = compare_runs(runs + [make_run(tmp_path, "l", "breast-cancer-lstm", test_roc_auc=0.99)]).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["recipe", "n", "accuracy", "F1", "ROC-AUC", "claimed", "vs claim", "params",
                      "train time (s)", "latency (ms/ex)"]
    assert re.fullmatch(r"\|(-+:?\|)+", lines[1])
    assert {line.count("|") for line in lines} == {len(header) + 1}
    assert len({len(line) for line in lines}) == 1
    assert md_rows("\n".join(lines))[0]["latency (ms/ex)"] == "0.0123"


def test_csv_reads_back_to_the_same_numbers(tmp_path):
    runs = seeds(tmp_path, "mnist-cnn", [0.90, 0.92, 0.94], expect=MNIST_CLAIM, latency_ms=0.25)
    runs.append(make_run(tmp_path, "l", 'lstm, "quoted"', seed=7, accuracy=0.98, test_roc_auc=0.995))
    table = compare_table(runs)
    text = render(table, "csv")
    assert text.endswith("\r\n") and "±" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["recipe"] for r in rows] == ["mnist-cnn", 'lstm, "quoted"']
    cnn, lstm = rows
    acc = table.rows[0].metrics["accuracy"]
    assert cnn["n"] == "3" and cnn["seeds"] == "0 1 2"
    assert [float(cnn[f"accuracy_{k}"]) for k in ("mean", "std", "ci_low", "ci_high")] == [acc.mean, acc.std, *acc.ci]
    assert cnn["f1_mean"] == cnn["roc_auc_std"] == ""
    assert (cnn["claim_metric"], float(cnn["claimed"]), cnn["claim_source"]) == ("test_accuracy", 0.99, "S0.1")
    assert cnn["claim_status"] == "below" and float(cnn["claim_gap_points"]) == 7.0
    assert int(cnn["params"]) == 1234 and float(cnn["train_seconds_mean"]) == 2.0
    assert float(cnn["latency_ms_mean"]) == 0.25
    assert float(lstm["roc_auc_mean"]) == 0.995 and lstm["accuracy_std"] == lstm["accuracy_ci_low"] == ""
    assert lstm["claim_status"] == lstm["latency_ms_mean"] == ""


class Strict(HTMLParser):
    """Records start tags and checks every element closes in order."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)
        self.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open.pop() == tag

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_one_balanced_table_with_escaped_cells(tmp_path):
    runs = [make_run(tmp_path, "evil", "<b>bold</b> & co"), make_run(tmp_path, "evil2", "<b>bold</b> & co")]
    text = render(compare_table(runs), "html")
    assert text.startswith('<table class="dlkit-compare">') and text.endswith("</table>")
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text and "http" not in text and "<script" not in text
    parser = Strict()
    parser.feed(text)
    parser.close()
    assert parser.open == [] and "b" not in parser.tags
    assert parser.tags[:3] == ["table", "thead", "tr"] and parser.tags.count("th") == 10
    assert {"tbody", "tfoot"} <= set(parser.tags)  # the shared seed goes to the footer
    assert "<b>bold</b> & co" in parser.text and "2 runs of <b>bold</b> & co share seed 0" in parser.text
    assert '<th class="col-accuracy num">accuracy</th>' in text


def test_html_marks_the_claim_status_for_styling(tmp_path):
    text = compare_runs(seeds(tmp_path, "mnist-cnn", [0.90], expect=MNIST_CLAIM), fmt="html")
    assert '<td class="col-status status-below">below by 9.0 points</td>' in text


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown table format 'xlsx'; choose md, csv or html"):
        compare_runs([make_run(tmp_path, "r")], fmt="xlsx")


# ---- errors and the per-run table ----------------------------------------------------------------------

def test_a_missing_or_incomplete_run_is_refused_with_rundirs_message(tmp_path):
    good = make_run(tmp_path, "good")
    missing = tmp_path / "nope"
    incomplete = make_run(tmp_path, "incomplete")
    (incomplete / "summary.json").unlink()
    for bad in (missing, incomplete):
        with pytest.raises(RunDirError) as expected:
            RunDir.open(bad)
        with pytest.raises(RunDirError) as got:
            compare_runs([good, bad])
        assert str(got.value) == str(expected.value)
    assert str(expected.value) == f"{incomplete} is not a finished run (missing summary.json); re-run the recipe"
    with pytest.raises(RunDirError, match=f"^run directory {re.escape(str(missing))} not found; pass the folder"):
        load_runs([missing])


def test_a_summary_without_a_recipe_is_refused(tmp_path):
    run = make_run(tmp_path, "r")
    (run / "summary.json").write_text(json.dumps({"seed": 0}), encoding="utf-8")
    expected = f"{run / 'summary.json'}: field 'recipe' is missing; re-run the recipe"
    with pytest.raises(RunDirError, match=f"^{re.escape(expected)}$"):
        compare_table([run])


def test_the_per_run_table_is_unchanged(tmp_path):
    runs = [make_run(tmp_path, "a", seed=0, expect=MNIST_CLAIM), make_run(tmp_path, "b", "other", seed=1)]
    lines = markdown_table(compare_rows(runs)).splitlines()
    assert lines[0].split("|")[1:-1] == [" recipe    ", " seed ", " test_accuracy ", " test_f1 ", " test_roc_auc ",
                                         " claimed       ", " params ", " train_s "]
    assert re.fullmatch(r"\|(-+\|)+", lines[1]) and len({len(line) for line in lines}) == 1
    assert lines[2] == "| mnist-cnn | 0    | 0.9000        | -       | -            | accuracy 0.99 | 1,234  | 2.0     |"


def test_an_interval_is_cut_at_the_ends_of_a_fraction() -> None:
    stat = Stat.of([0.0, 1.0, 1.0])
    assert stat.ci == (0.0, 1.0)  # t(0.975, 2) * 0.577 / sqrt(3) = 1.43 either side, cut at 0 and 1
    assert Stat.of([0.5, 0.6, 0.7]).ci == pytest.approx((0.3516, 0.8484), abs=1e-4)  # inside: unchanged
