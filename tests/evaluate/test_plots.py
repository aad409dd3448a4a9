"""Report plots: each figure says what it should (titles, labels, legends, marks), and saves as a real PNG."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from dlkit.evaluate import plots

STAGES = [{"index": 0, "name": "head", "first_epoch": 1, "last_epoch": 3},
          {"index": 1, "name": "finetune", "first_epoch": 4, "last_epoch": 6}]


def history(n: int = 6, stage_of=lambda e: 0 if e <= 3 else 1, accuracy: bool = True, val: bool = True) -> list[dict]:
    """Per-epoch rows the way `fit` writes them, with a falling loss and a rising accuracy."""
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "stage": stage_of(e), "train_loss": 1.0 / e, "lr": 0.01}
        row |= {"val_loss": 1.2 / e} if val else {}
        row |= {"train_accuracy": 1 - 0.5 / e} | ({"val_accuracy": 1 - 0.6 / e} if val else {}) if accuracy else {}
        rows.append(row)
    return rows


def legend_texts(ax) -> list[str]:
    """The texts of an Axes' legend, in order."""
    return [t.get_text() for t in ax.get_legend().get_texts()]


def stage_lines(ax) -> list:
    """The dashed stage-boundary lines of an Axes."""
    return [line for line in ax.lines if line.get_gid() == "stage-boundary"]


def scored(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and scores that separate them fairly well (AUC near 0.85)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, y + rng.normal(0, 0.9, n)


def png_size(path) -> tuple[int, int]:
    """Width and height of a PNG, after decoding all of it."""
    with Image.open(path) as im:
        im.load()  # decodes the whole image, not just the header
        return im.size


# training curves

def test_curves_show_loss_and_accuracy_for_train_and_val_with_one_line_per_stage_change():
    fig = plots.figure_curves(history(), STAGES)
    loss, acc = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy"]
    assert {ax.get_xlabel() for ax in fig.axes} == {"epoch"}
    for ax in fig.axes:
        assert legend_texts(ax) == ["train", "val"]
        assert [line.get_xdata()[0] for line in stage_lines(ax)] == [3.5]  # between epochs 3 and 4
        assert [t.get_text().strip() for t in ax.texts] == ["head", "finetune"]
    train = next(line for line in loss.lines if line.get_label() == "train")
    np.testing.assert_allclose(train.get_ydata(), [1.0 / e for e in range(1, 7)])
    assert train.get_color() == plots.SPLIT_COLORS["train"]


def test_curves_count_every_stage_change_and_name_stages_without_a_stage_list():
    fig = plots.figure_curves(history(9, stage_of=lambda e: (e - 1) // 3))
    assert len(stage_lines(fig.axes[0])) == 2
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["stage 1", "stage 2", "stage 3"]
    named = plots.figure_curves(history(4, stage_of=lambda e: "warmup" if e == 1 else "main"))
    assert [line.get_xdata()[0] for line in stage_lines(named.axes[0])] == [1.5]


def test_curves_without_val_or_accuracy_show_train_loss_alone():
    fig = plots.figure_curves(history(3, stage_of=lambda e: 0, accuracy=False, val=False))
    (ax,) = fig.axes
    assert ax.get_title() == "Loss" and legend_texts(ax) == ["train"]
    assert stage_lines(ax) == [] and len(ax.texts) == 0


def test_curves_of_one_epoch_render(tmp_path):
    fig = plots.figure_curves(history(1), STAGES)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [1, 1]
    assert png_size(plots.save(fig, tmp_path / "curves.png")) == (1100, 440)


def test_curves_skip_nan_and_missing_val_loss(tmp_path):
    rows = history(4)
    rows[1]["val_loss"] = float("nan")
    rows[2]["val_loss"] = None
    del rows[3]["val_loss"]
    fig = plots.figure_curves(rows)
    val = next(line for line in fig.axes[0].lines if line.get_label() == "val")
    np.testing.assert_allclose(val.get_xdata(), [1])
    plots.save(fig, tmp_path / "curves.png")


# confusion matrix

def annotations(ax) -> np.ndarray:
    """The numbers written in a confusion matrix's cells, row by row."""
    return np.array([float(t.get_text()) for t in ax.texts])


def test_confusion_counts_annotate_every_cell_with_its_count():
    m = np.array([[50, 2, 0], [3, 40, 7], [0, 5, 45]])
    fig = plots.figure_confusion(m, ["cat", "dog", "bird"])
    ax = fig.axes[0]
    np.testing.assert_array_equal(annotations(ax).reshape(3, 3), m)
    assert ax.get_title() == "Confusion matrix"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]


def test_confusion_normalised_rows_sum_to_one_and_empty_rows_stay_zero():
    m = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    fig = plots.figure_confusion(m, ["a", "b", "c"], normalize=True)
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(shown.sum(axis=1), [1, 0, 1])
    np.testing.assert_allclose(annotations(ax).reshape(3, 3), shown, atol=0.005)
    assert annotations(ax)[0] == 0.8 and ax.get_title() == "Confusion matrix (row-normalised)"


def test_confusion_of_a_single_class(tmp_path):
    fig = plots.figure_confusion([[7]], ["only"])
    assert [t.get_text() for t in fig.axes[0].texts] == ["7"]
    plots.save(fig, tmp_path / "cm.png")


def test_confusion_of_100_classes_renders_without_annotations(tmp_path):
    m = np.random.default_rng(0).integers(0, 9, (100, 100)) + np.eye(100, dtype=int) * 50
    fig = plots.figure_confusion(m, [f"class_{i}" for i in range(100)])
    ax = fig.axes[0]
    assert len(ax.texts) == 0 and np.asarray(ax.images[0].get_array()).shape == (100, 100)
    assert len(ax.get_xticklabels()) == 34  # every third name, so they stay legible
    plots.save(fig, tmp_path / "cm.png")


def test_confusion_refuses_a_matrix_that_does_not_fit_the_classes():
    with pytest.raises(ValueError, match="3 classes must be 3x3"):
        plots.figure_confusion(np.ones((2, 2)), ["a", "b", "c"])


# ROC, precision-recall, reliability

def test_roc_names_curves_with_their_auc_and_draws_the_chance_line():
    y, s = scored()
    fpr, tpr, _ = roc_curve(y, s)
    auc = roc_auc_score(y, s)
    fig = plots.figure_roc({"1": {"fpr": fpr, "tpr": tpr, "auc": auc}}, class_names={"1": "dog"})
    ax = fig.axes[0]
    assert legend_texts(ax) == [f"dog (AUC {auc:.2f})", "chance"]
    assert ax.get_title() == "ROC curve"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("false positive rate", "true positive rate")
    chance = ax.lines[-1]
    assert list(chance.get_xdata()) == [0, 1] and list(chance.get_ydata()) == [0, 1]
    many = plots.figure_roc({str(k): {"fpr": fpr, "tpr": tpr, "auc": 0.875} for k in range(3)})
    assert many.axes[0].get_title() == "ROC curves"
    assert legend_texts(many.axes[0])[:3] == ["0 (AUC 0.88)", "1 (AUC 0.88)", "2 (AUC 0.88)"]


def test_pr_names_curves_with_their_average_precision():
    y, s = scored(1)
    precision, recall, _ = precision_recall_curve(y, s)
    ap = average_precision_score(y, s)
    fig = plots.figure_pr({"1": {"precision": precision, "recall": recall, "average_precision": ap}})
    ax = fig.axes[0]
    assert legend_texts(ax) == [f"1 (AP {ap:.2f})"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Precision-recall curve", "recall", "precision")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), precision)


def test_reliability_shows_accuracy_per_bin_the_diagonal_and_the_counts():
    edges = np.linspace(0, 1, 11)
    counts = [0, 0, 0, 0, 3, 12, 20, 31, 50, 87]
    bins = [{"bin_lower": lo, "bin_upper": hi, "count": c,
             "confidence": (lo + hi) / 2 if c else None, "accuracy": (lo + hi) / 2 - 0.05 if c else None}
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    fig = plots.figure_reliability(bins, ece=0.0423)
    top, bottom = fig.axes
    assert top.get_title() == "Reliability diagram (ECE 0.042)"
    assert legend_texts(top) == ["accuracy", "gap to mean confidence", "perfect calibration",
                                 "fewer than 10 examples"]
    assert [h.get_alpha() for h in top.get_legend().legend_handles] == [None, None, None, 0.25]
    accuracy_bars = top.containers[0]
    np.testing.assert_allclose([b.get_height() for b in accuracy_bars], [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    # the bin of 3 examples is faded, in the bars and in the histogram; the others are whole
    assert [b.get_alpha() for b in accuracy_bars] == [0.25, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [b.get_alpha() for b in bottom.patches][4:] == [0.35, 1.0, 1.0, 1.0, 1.0, 1.0]
    # the gap is a line from each bar's top to its bin's mean confidence, not a hatched patch over the bar
    assert not any(p.get_hatch() for p in top.patches)
    gap = top.collections[0]
    segments = [seg[:, 1].tolist() for seg in gap.get_segments()]
    np.testing.assert_allclose(segments, [[a, a + 0.05] for a in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)])
    assert [b.get_height() for b in bottom.patches] == counts
    assert (bottom.get_xlabel(), bottom.get_ylabel(), top.get_ylabel()) == ("confidence", "count", "accuracy")
    whole = plots.figure_reliability(bins[5:], ece=0.0423)
    assert "fewer than 10 examples" not in legend_texts(whole.axes[0])


@pytest.mark.parametrize("values, decimals", [
    ([0.875, 0.875], 2),
    ([0.81, 0.93, 0.5], 2),
    ([1.0, 0.99981, 0.99962, 0.9991, 1.0], 4),  # classes that all read "1.00" before
    ([1.0, 0.99981, 0.99975], 5),  # 0.9998 twice at 4
    ([0.999996], 6),  # short of 1: never printed as 1.00
    ([1.0, 1.0], 2),
    ([0.1234561, 0.1234569], 6),
    ([0.123456789, 0.123456788], 2),  # alike to 6 decimals (the most): the same value
    ([0.9, None, float("nan")], 2),
])
def test_scores_get_the_decimals_that_tell_them_apart(values, decimals):
    assert plots.score_decimals(values) == decimals


def test_roc_legend_of_ten_near_perfect_classes_tells_them_apart():
    y, s = scored()
    fpr, tpr, _ = roc_curve(y, s)
    aucs = [1.0, 0.99981, 0.99975, 0.9991, 1.0, 0.99999, 0.9998, 1.0, 0.9994, 0.99962]
    fig = plots.figure_roc({str(k): {"fpr": fpr, "tpr": tpr, "auc": a} for k, a in enumerate(aucs)})
    assert legend_texts(fig.axes[0])[:10] == [f"{k} (AUC {a:.5f})" for k, a in enumerate(aucs)]


# sample grids

def test_samples_caption_every_image_and_mark_exactly_the_mistakes_in_red():
    rng = np.random.default_rng(0)
    classes = [str(d) for d in range(10)]
    true, pred = [3, 1, 4, 1, 5, 9, 2], [3, 1, 4, 7, 5, 9, 0]
    fig = plots.figure_samples(rng.random((7, 1, 12, 12)), true, pred, [0.9, 0.8, 0.99, 0.51, 0.7, 0.6, 0.95],
                               classes, title="Most confident mistakes")
    assert fig.get_suptitle() == "Most confident mistakes"
    axes = fig.axes
    assert len(axes) == 10 and [ax.axison for ax in axes] == [True] * 7 + [False] * 3  # 2 rows of 5
    assert axes[3].get_title() == "1 / 7 (51%)"
    red = [to_rgb(ax.title.get_color()) == to_rgb(plots.MISTAKE_COLOR) for ax in axes[:7]]
    framed = [all(s.get_visible() for s in ax.spines.values()) for ax in axes[:7]]
    mistakes = [t != p for t, p in zip(true, pred)]
    assert red == mistakes and framed == mistakes
    assert to_rgb(axes[3].spines["left"].get_edgecolor()) == to_rgb(plots.MISTAKE_COLOR)
    assert axes[0].images[0].get_array().shape == (12, 12)


def test_samples_take_rgb_and_channel_less_images_and_show_at_most_25():
    rgb = plots.figure_samples(np.full((2, 3, 8, 8), 0.5), [0, 1], [0, 1], [1.0, 1.0], ["a", "b"])
    assert rgb.axes[0].images[0].get_array().shape == (8, 8, 3)
    many = plots.figure_samples(np.zeros((40, 8, 8)), [0] * 40, [0] * 40, [0.5] * 40, ["a"])
    assert len(many.axes) == 25 and all(ax.axison for ax in many.axes)


def test_samples_without_images_say_so_and_bad_shapes_are_refused(tmp_path):
    fig = plots.figure_samples(np.zeros((0, 1, 8, 8)), [], [], [], ["a"], title="Most confident mistakes")
    assert "no samples" in [t.get_text() for t in fig.texts] and fig.axes == []
    plots.save(fig, tmp_path / "none.png")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        plots.figure_samples(np.zeros((1, 2, 8, 8)), [0], [0], [1.0], ["a"])


# class distribution, token importance, fit line, loss curves, Grad-CAM grid

def test_class_distribution_groups_bars_per_split_and_pies_the_training_split():
    counts = {"train": [50, 30, 0, 20], "val": [10, 6, 1, 3], "test": [12, 5, 2, 1]}
    fig = plots.figure_class_distribution(counts, ["cat", "dog", "bird", "fish"])
    bars, pie = fig.axes
    assert legend_texts(bars) == ["train", "val", "test"]
    for container, split in zip(bars.containers, counts):
        assert [b.get_height() for b in container] == counts[split]
        assert to_rgb(container[0].get_facecolor()) == to_rgb(plots.SPLIT_COLORS[split])
    assert (bars.get_title(), bars.get_xlabel(), bars.get_ylabel()) == ("Class distribution", "class", "samples")
    assert pie.get_title() == "train split"
    assert len(pie.patches) == 3  # the empty class gets no wedge
    assert {"cat", "dog", "fish", "50%", "30%", "20%"} <= {t.get_text() for t in pie.texts}


def test_token_importance_shades_words_by_sign_and_size_and_wraps_long_text(tmp_path):
    tokens, scores = ["a", "truly", "awful", "$5", "movie"], [0.0, 0.5, -2.0, 0.1, 1.0]
    fig = plots.figure_token_importance(tokens, scores, label="negative", confidence=0.934)
    ax = fig.axes[0]
    assert ax.get_title() == "Prediction: negative (93%)"
    words = ax.texts
    assert [t.get_text() for t in words] == tokens
    shade = [np.array(to_rgb(t.get_bbox_patch().get_facecolor())) for t in words]
    assert np.allclose(shade[0], 1)  # no importance: white
    assert shade[2][0] > shade[2][1] and shade[1][1] > shade[1][0]  # red against, green for
    assert shade[2].min() < shade[1].min() < shade[3].min()  # stronger score, deeper colour
    short_height = fig.get_size_inches()[1]
    long = plots.figure_token_importance(["wonderful"] * 60, np.linspace(-1, 1, 60), "positive", 0.6)
    rows = sorted({t.get_position()[1] for t in long.axes[0].texts})
    assert len(rows) > 3 and long.get_size_inches()[1] > short_height
    plots.save(long, tmp_path / "tokens.png")
    renderer = long.canvas.get_renderer()
    assert max(t.get_window_extent(renderer).x1 for t in long.axes[0].texts) < long.bbox.width
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        plots.figure_token_importance(["a", "b"], [1.0], "x", 0.5)


def test_fit_line_labels_the_learned_line_with_its_values():
    x = np.linspace(-1, 1, 20)
    fig = plots.figure_fit_line(x, 2 * x + 1, np.array([2.0]), 1.0, x_test=[1.5, 2.0], y_test=[4.1, 5.0],
                                xlabel="celsius", ylabel="fahrenheit")
    ax = fig.axes[0]
    assert sorted(legend_texts(ax)) == ["test", "train", "y = 2x + 1"]  # order varies by version
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("celsius", "fahrenheit")
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xdata(), [-1, 2])
    np.testing.assert_allclose(line.get_ydata(), [-1, 5])
    assert sorted(legend_texts(plots.figure_fit_line(x, x, 0.5, -3.0).axes[0])) == ["train", "y = 0.5x - 3"]


def test_loss_curve_shows_each_named_series_and_skips_what_log_scale_cannot_show():
    fig = plots.figure_loss_curve({"NumPy": [1.0, 0.5, 0.25], "PyTorch": [1.0, float("nan"), 0.2]},
                                  title="NumPy vs PyTorch")
    ax = fig.axes[0]
    assert legend_texts(ax) == ["NumPy", "PyTorch"] and ax.get_title() == "NumPy vs PyTorch"
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [1, 3])
    log = plots.figure_loss_curve({"train": [1.0, 0.0, 0.1]}, ylabel="mse", log_y=True).axes[0]
    assert log.get_yscale() == "log" and log.get_ylabel() == "mse"
    np.testing.assert_allclose(log.lines[0].get_ydata(), [1.0, 0.1])
    assert log.lines[0].get_color() == plots.SPLIT_COLORS["train"]


def test_gradcam_grid_shows_each_overlay_with_its_caption():
    overlays = [np.full((16, 16, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    fig = plots.figure_gradcam_grid(overlays, [f"cat ({i})" for i in range(5)])
    assert len(fig.axes) == 8  # 2 rows of 4
    assert [ax.get_title() for ax in fig.axes[:5]] == [f"cat ({i})" for i in range(5)]
    assert [len(ax.images) for ax in fig.axes] == [1] * 5 + [0] * 3
    with pytest.raises(ValueError, match="5 overlays but 4 captions"):
        plots.figure_gradcam_grid(overlays, ["x"] * 4)


def test_long_gradcam_captions_wrap_inside_their_panel_and_the_figure():
    overlays = [np.zeros((28, 28, 3), dtype=np.uint8) for _ in range(6)]
    captions = ["American Staffordshire terrier / Staffordshire bullterrier (87%)",
                "golden retriever / golden retriever (99%)", "7 / 1 (51%)",
                "averyveryverylongclassnamewithoutspaces / x (3%)", "cat / dog (60%)", "a / b (50%)"]
    fig = plots.figure_gradcam_grid(overlays, captions)
    fig.canvas.draw()
    renderer, whole = fig.canvas.get_renderer(), fig.bbox
    boxes = []
    for ax, caption in zip(fig.axes, captions):
        text = ax.title.get_text()
        assert "".join(text.split()) == "".join(caption.split())  # every letter kept, in order
        assert max(len(line) for line in text.splitlines()) <= plots.CAPTION_CHARS
        box = ax.title.get_window_extent(renderer)
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1
        boxes.append(box)
    for i, a in enumerate(boxes):  # no caption runs into another
        assert not any(a.overlaps(b) for b in boxes[i + 1:])
    assert plots.wrap_caption("7 / 1 (51%)") == "7 / 1 (51%)"
    assert plots.wrap_caption("golden retriever / labrador (87%)") == "golden retriever /\nlabrador (87%)"


# saving

def test_save_writes_a_png_of_figure_size_times_dpi_and_leaves_no_temp_file(tmp_path):
    fig = plots.figure_loss_curve({"train": [1.0, 0.5]})
    out = plots.save(fig, tmp_path / "loss.png")
    assert out == tmp_path / "loss.png"
    assert png_size(out) == (660, 495)  # 6 x 4.5 inches at 110 dpi
    assert png_size(plots.save(fig, tmp_path / "small.png", dpi=50)) == (300, 225)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "small.png"]


def test_save_creates_missing_folders_and_replaces_an_existing_file(tmp_path):
    target = tmp_path / "report" / "plots" / "cm.png"
    plots.save(plots.figure_confusion([[3, 1], [0, 4]], ["a", "b"]), target)
    before = target.read_bytes()
    plots.save(plots.figure_confusion([[9, 0], [0, 9]], ["a", "b"]), target)
    assert target.read_bytes() != before and png_size(target) == (550, 440)
    assert [p.name for p in target.parent.iterdir()] == ["cm.png"]


def test_save_that_fails_leaves_no_temp_file(tmp_path):
    (tmp_path / "taken.png").mkdir()  # a folder where the file should go: os.replace fails
    with pytest.raises(OSError):
        plots.save(plots.figure_loss_curve({"train": [1.0]}), tmp_path / "taken.png")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"]


def test_torch_tensors_are_taken_as_they_come():
    torch = pytest.importorskip("torch")
    cm = plots.figure_confusion(torch.tensor([[3, 1], [0, 4]]), ["a", "b"])
    assert [t.get_text() for t in cm.axes[0].texts] == ["3", "1", "0", "4"]
    grid = plots.figure_samples(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 0]),
                                torch.tensor([0.9, 0.6]), ["a", "b"])
    assert [ax.get_title() for ax in grid.axes] == ["a / a (90%)", "b / a (60%)"]
