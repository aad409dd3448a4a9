"""The run report on real runs of offline recipes: which plots each kind of run gets, the self-contained
page, evaluation.json against summary.json, token importance with a known answer, reloading, errors."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from dlkit.data import load_data
from dlkit.data.text import OOV, TextPrep
from dlkit.errors import RunDirError
from dlkit.evaluate.explain_text import mask_id, occlusion_importance, token_names
from dlkit.evaluate.report import build_report, evaluate_run_dir, load_run, write_plots, write_report
from dlkit.evaluate.report_html import SECTIONS
from dlkit.predict import Predictor
from dlkit.rundir import RunDir
from dlkit.runner import run

CLASSIFICATION = {"curves", "confusion_counts", "confusion_normalized", "roc", "pr", "reliability",
                  "class_distribution"}
IMAGES = {"samples", "confident_mistakes"}
PLOTS = {
    "digits-cnn": CLASSIFICATION | IMAGES | {"gradcam"},  # a conv model: Grad-CAM
    "breast-cancer-lstm": CLASSIFICATION,  # tabular rows: no image grids, no Grad-CAM
    "tiny-text-lstm": CLASSIFICATION | {"token_importance"},
    "scratch-linreg": {"loss_curve", "fit_line"},  # regression: no confusion, ROC or reliability
    # 8x8 digits through an mlp: images, no conv layer to explain; the NumPy and PyTorch loss curves
    "scratch-mlp": CLASSIFICATION | IMAGES | {"numpy_vs_torch"},
}
RUNS = {"digits-cnn": {"epochs": 1}, "breast-cancer-lstm": {"epochs": 2}, "tiny-text-lstm": {"epochs": 2},
        "scratch-linreg": {"fields": {"description": "F from C <script>alert('x')</script> & <b>co</b>"}},
        "scratch-mlp": {"epochs": 2}}
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished run per recipe, few epochs, its report written at the end of the run."""
    root = tmp_path_factory.mktemp("runs")
    return {name: run(name, out=root / name, report=True, **kw).run_dir for name, kw in RUNS.items()}


def decoded_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after decoding all of it."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def section(page: str, name: str) -> str:
    """The HTML between a section's heading and the next heading."""
    return page.split(f"<h2>{name}</h2>", 1)[1].split("<h2>", 1)[0]


def copy_run(src: Path, dst: Path, keep: tuple[str, ...] = ("recipe.yaml", "bundle.json", "model.safetensors",
                                                             "summary.json", "metrics.jsonl", "status.json")) -> Path:
    """A copy of a run directory holding only the files named in `keep`."""
    dst.mkdir()
    for name in keep:
        shutil.copy2(src / name, dst / name)
    return dst


@pytest.mark.parametrize("name", list(RUNS))
def test_each_kind_of_run_gets_the_plots_that_apply_and_only_those(runs, name):
    pngs = sorted((runs[name] / "plots").glob("*.png"))
    assert {p.stem for p in pngs} == PLOTS[name]
    for p in pngs:
        width, height = decoded_size(p.read_bytes())
        assert width >= 300 and height >= 200


@pytest.mark.parametrize("name", list(RUNS))
def test_report_is_one_self_contained_page_with_every_section_plot_and_claim(runs, name):
    page = (runs[name] / "report.html").read_text(encoding="utf-8")
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert re.findall(r"<h2>(.*?)</h2>", page) == list(SECTIONS)
    images = DATA_URI.findall(page)
    assert len(images) == len(list((runs[name] / "plots").glob("*.png"))) == page.count("<img ")
    for data in images:
        decoded_size(base64.b64decode(data, validate=True))
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    assert f"<h1>{name}</h1>" in page
    assert "<pre>name: " + name in section(page, "Recipe")
    assert summary["recipe"] == name
    claims = section(page, "Claim vs ours")
    for claim in summary["expect"]["claims"]:
        flagged = claim["status"] != "met"
        row = f'<tr class="unmet"><td>{claim["metric"]}</td>' if flagged else f'<tr><td>{claim["metric"]}</td>'
        assert row in claims
        assert (f"✗ {claim['status']}" if flagged else "✓ met") in claims
    environment = section(page, "Environment")
    assert "<td>torch</td>" in environment and f"<td>{summary['device']}</td>" in environment
    bundle = json.loads((runs[name] / "bundle.json").read_text())
    assert bundle["data_fingerprint"] in section(page, "Data")
    assert summary["data_source"] and html.escape(summary["data_source"]) in section(page, "Data")


def test_an_unmet_claim_is_flagged_and_text_is_escaped(runs):
    digits = (runs["digits-cnn"] / "report.html").read_text(encoding="utf-8")
    # one epoch on 1,258 digits is far from S0.1's 99% on MNIST
    assert '<p class="flag">✗ 1 of 1 claims not met.</p>' in section(digits, "Claim vs ours")
    assert '<tr class="unmet"><td>test_accuracy</td><td class="num">0.99</td>' in digits
    linreg = (runs["scratch-linreg"] / "report.html").read_text(encoding="utf-8")
    assert "<p>F from C &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;co&lt;/b&gt;</p>" in linreg
    assert '<p class="ok">✓ all 2 claims met.</p>' in linreg
    assert "No per-class metrics: a regression run has no classes." in linreg


def test_the_report_says_which_weights_were_tested_and_the_claims_training_set(runs):
    summary = json.loads((runs["digits-cnn"] / "summary.json").read_text())
    page = (runs["digits-cnn"] / "report.html").read_text(encoding="utf-8")
    assert summary["tested_weights"] == "last (epoch 1)"
    assert "<tr><td>weights tested</td><td>last (epoch 1)</td></tr>" in section(page, "Summary")
    assert summary["expect"]["n_train"] == 60000
    line = f"trained on {summary['n_train']:,} of the claim's 60,000 examples"
    assert summary["expect"]["training_set"] == line
    assert f"<p>Training set: {html.escape(line)}.</p>" in section(page, "Claim vs ours")
    lat = {k: summary[k] for k in ("latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_passes")}
    assert lat["latency_ms_p10"] <= lat["latency_ms"] <= lat["latency_ms_p90"] and lat["latency_passes"] >= 9
    assert (f"<tr><td>latency (ms per example, batch of 1)</td><td>{lat['latency_ms']:.4g} median "
            f"(p10 {lat['latency_ms_p10']:.4g}, p90 {lat['latency_ms_p90']:.4g}; {lat['latency_passes']} passes)</td></tr>"
            in section(page, "Summary"))


@pytest.mark.parametrize("name", ["digits-cnn", "breast-cancer-lstm", "tiny-text-lstm", "scratch-mlp"])
def test_evaluation_json_and_summary_come_from_the_same_single_test_pass(runs, name):
    ev = json.loads((runs[name] / "evaluation.json").read_text())
    summary = json.loads((runs[name] / "summary.json").read_text())
    n = summary["n_test"]
    assert ev["n"] == n and sum(map(sum, ev["confusion"])) == n
    assert [sum(row) for row in ev["confusion"]] == ev["support"] == summary["class_counts"]["test"]
    same = {"accuracy": "test_accuracy", "log_loss": "test_loss", "macro_f1": "test_f1",
            "macro_precision": "test_precision", "macro_recall": "test_recall", "roc_auc": "test_roc_auc",
            "ece": "test_ece"}
    assert {k: ev[k] for k in same} == {k: summary[v] for k, v in same.items()}
    assert {f"test_top{k}_accuracy": v for k, v in ev["top_k"].items()} == {
        k: v for k, v in summary.items() if re.fullmatch(r"test_top\d+_accuracy", k)}
    assert len(ev["top_k"]) == (2 if len(ev["support"]) > 5 else 1 if len(ev["support"]) > 3 else 0)
    # and the accuracy is what the stored model predicts now
    recipe = RunDir.open(runs[name]).recipe()
    data = load_data(recipe.data, recipe.seed)
    predicted = Predictor.from_run(runs[name]).model.eval()(data.test.inputs())
    labels = (predicted.reshape(-1) > 0).long() if predicted.shape[1] == 1 else predicted.argmax(1)
    assert (labels == data.test.y.long()).sum().item() == round(summary["test_accuracy"] * n)


def test_regression_has_no_evaluation_json(runs):
    assert evaluate_run_dir(runs["scratch-linreg"]) is None
    assert not (runs["scratch-linreg"] / "evaluation.json").exists()


def test_report_from_the_run_dir_equals_report_from_the_objects_in_memory(runs):
    path = runs["digits-cnn"]
    from_disk = json.loads((path / "evaluation.json").read_text())
    recipe = RunDir.open(path).recipe()
    model, data = Predictor.from_run(path).model, load_data(recipe.data, recipe.seed)
    assert build_report(path, model=model, data=data) == path / "report.html"
    assert json.loads((path / "evaluation.json").read_text()) == from_disk
    assert {p.stem for p in (path / "plots").glob("*.png")} == PLOTS["digits-cnn"]


def test_missing_optional_pieces_are_said_so_and_nothing_crashes(runs, tmp_path):
    bare = copy_run(runs["scratch-mlp"], tmp_path / "bare")
    page = write_report(bare).read_text(encoding="utf-8")
    assert re.findall(r"<h2>(.*?)</h2>", page) == list(SECTIONS)
    assert "No plots: run build_report" in section(page, "Plots")
    assert "no evaluation.json" in section(page, "Per-class metrics")
    assert "data:image/png" not in page


def test_numpy_vs_torch_loss_plot_from_both_engines_losses_per_epoch(runs, tmp_path):
    rows = RunDir.open(runs["scratch-mlp"]).history()
    # float64 both, same start, same batches: the two training losses agree to rounding every epoch
    assert [row["torch_train_loss"] for row in rows] == pytest.approx([row["train_loss"] for row in rows], rel=1e-9)
    numpy_only = copy_run(runs["scratch-mlp"], tmp_path / "numpy-only")
    lines = [json.dumps({k: v for k, v in row.items() if k != "torch_train_loss"}) for row in rows]
    (numpy_only / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    names = {p.stem for p in write_plots(numpy_only)}
    assert names == PLOTS["scratch-mlp"] - {"numpy_vs_torch"}
    assert not (numpy_only / "evaluation.json").exists()  # write_plots draws; only evaluate/build write metrics


def test_plots_of_a_10k_test_set_take_seconds(runs):
    run_dir, model, data = load_run(runs["digits-cnn"])
    n, test = 10_000, data.test
    idx = torch.arange(n) % len(test)
    big = replace(data, test=replace(test, x=test.x[idx], y=test.y[idx]))
    grids = ("samples", "confident_mistakes", "gradcam")
    sizes = [decoded_size((run_dir.path / "plots" / f"{g}.png").read_bytes()) for g in grids]
    started = time.perf_counter()
    paths = write_plots(run_dir.path, model, big)
    assert time.perf_counter() - started < 30  # measured 3.4 s on one free core
    assert {p.stem for p in paths} == PLOTS["digits-cnn"]
    # the grids stay 5 x 5 (Grad-CAM 2 x 4) however large the test set: as with the 359 real test digits
    assert [decoded_size((run_dir.path / "plots" / f"{g}.png").read_bytes()) for g in grids] == sizes
    build_report(run_dir.path)  # the other tests read the report of the real test split


class KeywordModel(nn.Module):
    """A binary text model that adds one score per token id: 'great' (id 5) +4, 'awful' (id 6) -1, others 0."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Embedding(10, 1)
        with torch.no_grad():
            self.score.weight.zero_()
            self.score.weight[5] = 4.0
            self.score.weight[6] = -1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.score(ids).sum(1)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_token_importance_finds_the_deciding_word_and_gives_ignored_words_zero():
    ids = torch.tensor([[2, 5, 3, 6, 0, 0], [3, 6, 2, 0, 0, 0]])
    first, second = occlusion_importance(KeywordModel(), ids, "binary", pad_id=0, occlude_with=OOV)
    # "x great y awful": logit 3, positive; occluding "great" leaves -1, occluding "awful" leaves 4
    assert (first.ids, first.label) == ([2, 5, 3, 6], 1)
    assert first.confidence == pytest.approx(sigmoid(3))
    assert first.scores == pytest.approx([0, sigmoid(3) - sigmoid(-1), 0, sigmoid(3) - sigmoid(4)], abs=1e-6)
    assert max(range(4), key=lambda i: first.scores[i]) == 1
    assert first.scores[0] == first.scores[2] == 0.0 and first.scores[3] < 0
    # "y awful x": logit -1, negative; "awful" decides it
    assert (second.ids, second.label) == ([3, 6, 2], 0)
    assert second.scores == pytest.approx([0, sigmoid(1) - 0.5, 0], abs=1e-6)
    long = occlusion_importance(KeywordModel(), torch.full((1, 100), 5), "binary", 0, OOV)[0]
    assert len(long.scores) == 60  # capped: a figure of more tokens is unreadable


def test_token_importance_of_a_trained_text_lstm_scores_every_word(runs):
    path = runs["tiny-text-lstm"]
    _, model, data = load_run(path)
    tokenizer = TextPrep.from_dict(data.preprocessing).tokenizer
    assert mask_id(tokenizer) == OOV
    scored = occlusion_importance(model, data.test.x, data.task, tokenizer.pad_id, mask_id(tokenizer))
    for row, s in zip(data.test.x, scored):
        real = row[row != 0].tolist()
        assert s.ids == real and len(s.scores) == len(real)
        assert all(math.isfinite(v) and abs(v) <= 1 for v in s.scores)
        assert 0.5 <= s.confidence <= 1
    assert token_names(tokenizer, scored[1].ids)[0] == "terrible"  # "Terrible customer service, never again"


@pytest.mark.parametrize("entry", [evaluate_run_dir, write_plots, write_report, build_report])
def test_a_missing_or_unfinished_run_dir_is_one_clear_error(runs, tmp_path, entry):
    missing = tmp_path / "nope"
    with pytest.raises(RunDirError) as err:
        entry(missing)
    assert str(err.value) == f"run directory {missing} not found; pass the folder `dlkit run` printed"
    unfinished = copy_run(runs["scratch-linreg"], tmp_path / "unfinished", ("recipe.yaml", "bundle.json",
                                                                              "model.safetensors"))
    with pytest.raises(RunDirError) as err:
        entry(unfinished)
    assert str(err.value) == f"{unfinished} is not a finished run (missing summary.json, status.json); re-run the recipe"


def test_data_that_changed_since_training_are_refused(runs, tmp_path):
    moved = copy_run(runs["scratch-linreg"], tmp_path / "moved")
    recipe = moved / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("seed: 0", "seed: 1", 1))  # other generated pairs
    with pytest.raises(RunDirError) as err:
        build_report(moved)
    assert str(err.value) == (f"the data loaded for {moved} differ from the data it was trained on "
                              "(files changed?); evaluate on the original data")


def recipe_shown(page: str) -> dict:
    """The recipe the page's Recipe section shows, parsed back."""
    import yaml

    return yaml.safe_load(html.unescape(section(page, "Recipe").split("<pre>", 1)[1].split("</pre>", 1)[0]))


def test_the_recipe_dump_shows_only_the_settings_that_apply_to_the_kind_of_input(runs):
    pages = {name: (runs[name] / "report.html").read_text(encoding="utf-8")
             for name in ("digits-cnn", "breast-cancer-lstm", "tiny-text-lstm")}
    image, tabular, tokens = (recipe_shown(p) for p in pages.values())
    assert "text" not in image["data"] and image["data"]["augment"]["hflip"] is False
    assert image["train"]["channels_last"] is True
    for shown in (tabular, tokens):
        assert not {"augment", "image_size", "channels", "bad_files"} & set(shown["data"])
        assert "channels_last" not in shown["train"]
    assert "text" not in tabular["data"] and tabular["data"]["normalize"] == "standard"
    assert tokens["data"]["text"]["max_len"] > 0 and "normalize" not in tokens["data"]
    notes = {name: re.findall(r'<p class="missing">Not shown: (.*?)</p>', section(p, "Recipe"))
             for name, p in pages.items()}
    assert notes == {
        "digits-cnn": ["data.text (no effect on image data)."],
        "breast-cancer-lstm": [("data.text, data.augment, data.bad_files, train.channels_last (no effect on tabular "
                                "data).")],
        "tiny-text-lstm": [("data.augment, data.normalize, data.bad_files, train.channels_last (no effect on tokens "
                            "data).")],
    }
    # the Data section follows the same rule
    assert "data.bad_files" not in section(pages["breast-cancer-lstm"], "Data")
    assert "data.normalize" not in section(pages["tiny-text-lstm"], "Data")
    assert "data.normalize" in section(pages["digits-cnn"], "Data")


@pytest.mark.parametrize(("weights", "shown"), [
    (None, "Seed CNN (random weights, frozen) on digits"),
    ("imagenet", "Seed CNN (ImageNet, frozen) on digits"),
])
def test_a_run_from_random_weights_does_not_claim_imagenet(runs, tmp_path, weights, shown):
    import yaml

    copy = copy_run(runs["digits-cnn"], tmp_path / "copy")
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["description"] = "Seed CNN (ImageNet, frozen) on digits"
    recipe["train"]["freeze"] = "base"
    if weights is not None:
        recipe["model"]["weights"] = weights
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    page = write_report(copy).read_text(encoding="utf-8")
    assert page.split("<h2>", 1)[0].split("<h1>digits-cnn</h1>\n", 1)[1] == (
        f"<p>{shown}</p>\n" + ("" if weights else
                               '<p class="flag">This run starts from random weights (model.weights: none), not the '
                               "ImageNet weights its recipe was written for; the description above says so.</p>\n"))
    assert ("ImageNet, frozen" in page) is (weights is not None)
