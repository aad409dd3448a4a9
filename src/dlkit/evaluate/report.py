"""The run report: the test split evaluated in one streaming pass, every plot that applies, one HTML page.

`build_report(run_dir)` reads only the run directory (the model from its bundle, the data from its
recipe, checked against the data fingerprint); a caller that still holds the trained model and its
data passes them and nothing is reloaded. The page (report_html) embeds every plot, so it can be
mailed or archived as one file.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from dlkit.data import DataBundle
from dlkit.data.bundle import TensorSplit
from dlkit.data.text import TextPrep
from dlkit.errors import RunDirError, RunInterrupted
from dlkit.evaluate import plots
from dlkit.evaluate.attention import GRADCAM, explains_images, heat_maps
from dlkit.evaluate.explain_text import MAX_TOKENS, mask_id, occlusion_importance, token_names
from dlkit.evaluate.gradcam import NO_EVIDENCE, evidence, overlay
from dlkit.evaluate.predictions import TestPredictions, predict_test
from dlkit.evaluate.report_html import PLOT_CAPTIONS, write_report
from dlkit.evaluate.retest import load_run
from dlkit.evaluate.stream import Evaluation
from dlkit.files import write_json
from dlkit.rundir import RunDir

MAX_CAM_IMAGES = 8
MAX_TEXTS = 4


def evaluate_run_dir(run_dir: str | Path, model: nn.Module | None = None,
                     data: DataBundle | None = None) -> Evaluation | None:
    """Test-split metrics of a run, written to evaluation.json; None (nothing written) for regression."""
    predictions = _evaluate(*load_run(run_dir, model, data))
    return predictions.evaluation if predictions is not None else None


def write_plots(run_dir: str | Path, model: nn.Module | None = None, data: DataBundle | None = None,
                evaluation: Evaluation | None = None) -> list[Path]:
    """Every plot that applies to the run, as PNGs in run_dir/plots/; a given `evaluation` is the one plotted."""
    run, model, data = load_run(run_dir, model, data)
    predictions = _predictions(run, model, data)
    if predictions is not None and evaluation is not None:
        predictions = replace(predictions, evaluation=evaluation)
    return _write_plots(run, model, data, predictions)


def build_report(run_dir: str | Path, model: nn.Module | None = None, data: DataBundle | None = None,
                 predictions: TestPredictions | None = None, *, data_path: str | Path | None = None,
                 data_dir: str | Path | None = None) -> Path:
    """evaluation.json, plots/ and report.html for a run, from one pass over the test split.

    A caller that has just tested the model passes its `predictions` (with the model and data)
    and the test split is not run again. `data_path` / `data_dir`: where the run's data are now,
    when they moved (checked against the data fingerprint all the same)."""
    run, model, data = load_run(run_dir, model, data, data_path=data_path, data_dir=data_dir)
    plots_folder(run)
    _write_plots(run, model, data, _evaluate(run, model, data, predictions))
    return write_report(run.path)


def _predictions(run: RunDir, model: nn.Module, data: DataBundle) -> TestPredictions | None:
    """The test predictions at the recipe's evaluation batch size; None for regression."""
    if data.task == "regression":
        return None
    return predict_test(model, data, run.recipe().train.eval_batch_size)


def _evaluate(run: RunDir, model: nn.Module, data: DataBundle,
              predictions: TestPredictions | None = None) -> TestPredictions | None:
    """The test predictions (those given, else made now), their metrics written to evaluation.json."""
    if predictions is None:
        predictions = _predictions(run, model, data)
    if predictions is not None:
        write_json(run.path / "evaluation.json", predictions.evaluation.to_dict())
    return predictions


def _write_plots(run: RunDir, model: nn.Module, data: DataBundle, predictions: TestPredictions | None) -> list[Path]:
    """Save each figure that applies; the report's own PNGs from an earlier report are removed first."""
    folder = plots_folder(run)
    for name in PLOT_CAPTIONS:
        (folder / f"{name}.png").unlink(missing_ok=True)
    return [plots.save(fig, folder / f"{name}.png") for name, fig in _figures(run, model, data, predictions)]


def plots_folder(run: RunDir) -> Path:
    """run/plots, refused in one line when something else (a file) has that name."""
    folder = run.path / "plots"
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is a file, not a folder; move it away: the report writes its plots there")
    return folder


def _figures(run: RunDir, model: nn.Module, data: DataBundle,
             predictions: TestPredictions | None) -> Iterator[tuple[str, Figure]]:
    """(name, figure) for every plot that applies, made one at a time."""
    history, summary = run.history(), run.summary()
    if predictions is None:
        yield from _regression_figures(history, summary, data)
    else:
        if history:
            yield "curves", plots.figure_curves(history, summary.get("stages"))
        yield from _metric_figures(predictions.evaluation, data.classes)
        splits = {"train": data.train, "val": data.val, "test": data.test}
        counts = {k: s.class_counts(len(data.classes)) for k, s in splits.items() if s is not None and len(s)}
        yield "class_distribution", plots.figure_class_distribution(counts, data.classes)
    torch_losses = [row.get("torch_train_loss") for row in history]
    if history and None not in torch_losses:
        yield "numpy_vs_torch", plots.figure_loss_curve(
            {"NumPy": [row["train_loss"] for row in history], "PyTorch": torch_losses}, ylabel="training loss",
            title="NumPy vs PyTorch: training loss")
    if predictions is not None and data.input_kind == "image":
        yield from _image_figures(model, data, predictions)
    if predictions is not None and data.input_kind == "tokens":
        yield "token_importance", _token_figure(model, data)


def _regression_figures(history: list[dict], summary: dict, data: DataBundle) -> Iterator[tuple[str, Figure]]:
    """Loss per epoch, and the learned line when the run learned one weight and one bias."""
    losses = {split: [row[f"{split}_loss"] for row in history if f"{split}_loss" in row] for split in ("train", "val")}
    losses = {split: values for split, values in losses.items() if values}
    if losses:
        every = np.concatenate([np.asarray(v, dtype=float) for v in losses.values()])
        wide = bool((every > 0).all() and every.max() > 100 * every.min())  # gradient descent from far away
        yield "loss_curve", plots.figure_loss_curve(losses, ylabel="MSE", log_y=wide)
    if "weight" in summary and "bias" in summary and tuple(data.input_shape) == (1,):
        names = data.preprocessing.get("feature_names") or ["x"]
        yield "fit_line", plots.figure_fit_line(data.train.x, data.train.y, summary["weight"], summary["bias"],
                                                data.test.x, data.test.y, xlabel=str(names[0]), ylabel="target")


def _metric_figures(ev: Evaluation, classes: list[str]) -> Iterator[tuple[str, Figure]]:
    """Confusion matrices, ROC and PR curves (those defined) and the reliability diagram."""
    yield "confusion_counts", plots.figure_confusion(ev.confusion, classes)
    yield "confusion_normalized", plots.figure_confusion(ev.confusion, classes, normalize=True)
    names = {str(i): c for i, c in enumerate(classes)} | {"positive": classes[-1]}
    roc = {k: c for k, c in ev.roc.items() if c["auc"] is not None}
    if roc:
        yield "roc", plots.figure_roc(roc, names)
    pr = {k: c for k, c in ev.pr.items() if c["average_precision"] is not None}
    if pr:
        yield "pr", plots.figure_pr(pr, names)
    yield "reliability", plots.figure_reliability(ev.reliability, ev.ece)


def _image_figures(model: nn.Module, data: DataBundle, predictions: TestPredictions) -> Iterator[tuple[str, Figure]]:
    """Sample predictions, the most confident mistakes and heat-map overlays (Grad-CAM for conv models,
    attention rollout for Vision Transformers)."""
    true = data.test.y.long().cpu().numpy()
    pred, conf = predictions.predicted, predictions.confidence

    def grid(idx: np.ndarray, title: str) -> Figure:
        images = _display(_inputs(data.test, idx)).numpy()
        return plots.figure_samples(images, true[idx], pred[idx], conf[idx], data.classes, title)

    yield "samples", grid(np.arange(min(plots.MAX_GRID, len(true))), "Sample test predictions")
    wrong = np.flatnonzero(pred != true)
    if len(wrong):
        worst = wrong[np.argsort(-conf[wrong], kind="stable")[: plots.MAX_GRID]]
        yield "confident_mistakes", grid(worst, "Most confident mistakes")
    if explains_images(model):
        idx = np.arange(min(MAX_CAM_IMAGES, len(true)))
        x = _inputs(data.test, idx)
        method, cams = heat_maps(model, x)
        images = _display(x)
        overlays = [overlay(img, heat) for img, heat in zip(images, cams.heatmaps)]
        captions = [f"{data.classes[t]} / {data.classes[p]} ({cams.probabilities[i, p]:.0%})"
                    + ("" if evidence(cams.heatmaps[i]) else f", {NO_EVIDENCE}")
                    for i, (t, p) in enumerate(zip(true[idx], cams.predicted.tolist()))]
        name = "gradcam" if method == GRADCAM else "attention_rollout"
        yield name, plots.figure_gradcam_grid(overlays, captions, f"{method} (true / predicted)")


def _inputs(split: TensorSplit, idx: np.ndarray) -> Tensor:
    """The model inputs of the examples at `idx`, on the CPU."""
    x = split.x[torch.as_tensor(idx, device=split.x.device)]
    return (split.transform(x) if split.transform is not None else x).float().cpu()


def _display(images: Tensor) -> Tensor:
    """Images stretched to [0, 1] each, so that normalised inputs show as pictures."""
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(1e-12)


def _token_figure(model: nn.Module, data: DataBundle) -> Figure:
    """Token importance of the first few test texts, preferring those short enough to read, one under another."""
    tokenizer = TextPrep.from_dict(data.preprocessing).tokenizer
    ids = data.test.x.cpu()
    long_first = ((ids != tokenizer.pad_id).sum(1) > MAX_TOKENS).int()
    rows = ids[torch.argsort(long_first, stable=True)[:MAX_TEXTS]]
    scored = occlusion_importance(model, rows, data.task, tokenizer.pad_id, mask_id(tokenizer))
    figures = [plots.figure_token_importance(token_names(tokenizer, s.ids), s.scores, data.classes[s.label],
                                             s.confidence) for s in scored]
    return _stacked(figures)


def _stacked(figures: list[Figure]) -> Figure:
    """One figure showing the rendered `figures` one under another, pixel for pixel at the save DPI."""
    pictures = []
    for fig in figures:
        fig.set_dpi(plots.DPI)
        fig.canvas.draw()
        pictures.append(np.asarray(fig.canvas.buffer_rgba()))
    width = max(p.shape[1] for p in pictures)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pictures]
    stacked = np.concatenate(padded)
    out = plots.new_figure(width / plots.DPI, len(stacked) / plots.DPI, layout=None)
    out.figimage(stacked, origin="upper")
    return out


def report_after_run(run_dir: Path, model: nn.Module, data: DataBundle, predictions: TestPredictions | None) -> Path:
    """The report of a run just finished, from the predictions its test pass made. The run is complete
    before this starts: Ctrl-C here loses nothing, and says how to write the report again."""
    try:
        return build_report(run_dir, model, data, predictions)
    except KeyboardInterrupt as exc:
        raise RunInterrupted(f"interrupted while writing the report; the run itself is finished in {run_dir} "
                             f"(`dlkit report {run_dir}` writes the report)", exc) from None
