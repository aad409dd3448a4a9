"""Every plot a run report shows, as matplotlib Figures saved to PNG.

No pyplot: each `figure_*` builds a `Figure` on its own Agg canvas, so plotting is thread-safe and
needs no display; `save` writes the PNG atomically. Inputs are plain lists or numpy arrays (CPU torch
tensors work too). Train, val and test keep the same colours in every plot.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from dlkit.files import write_atomic

DPI = 110
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
MISTAKE_COLOR = "#d62728"
STAGE_COLOR = "#555555"
MAX_ANNOTATED_CLASSES = 20  # above this, cell numbers in a confusion matrix are unreadable
MAX_GRID = 25  # sample grids show at most 5x5 images
# a reliability bin of fewer test examples says little (one mistake in three moves it 33 points): faded
MIN_BIN_COUNT = 10
SCORE_DECIMALS = (2, 6)  # legend scores: at least 2 decimals, more while distinct values would print alike


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """An empty Figure drawn by its own Agg canvas (no pyplot, no global state)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG at `path` atomically; missing parent folders are created."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def _color(series: str) -> str | None:
    """The fixed colour of a split ("train", "val", "test"); None lets matplotlib pick."""
    return SPLIT_COLORS.get(series.lower())


def _finite(x: Sequence[float], y: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs whose y is a finite number (None and NaN are dropped)."""
    y = np.array([np.nan if v is None else v for v in y], dtype=float)
    keep = np.isfinite(y)
    return np.asarray(x, dtype=float)[keep], y[keep]


def _grid(n: int, max_cols: int = 5) -> tuple[int, int]:
    """Rows and columns of a grid holding n panels, at most `max_cols` wide."""
    cols = max(1, min(max_cols, n))
    return max(1, math.ceil(n / cols)), cols


def _class_ticks(ax: Axes, classes: Sequence[str], axis: str = "x") -> None:
    """Class names as tick labels, rotated and thinned out so that many classes stay legible."""
    k = len(classes)
    step = max(1, math.ceil(k / 40))
    ticks = list(range(0, k, step))
    labels = [str(classes[i]) for i in ticks]
    size = 9 if k <= 20 else 7 if k <= 40 else 6
    if axis == "x":
        rotate = k > 8 or max((len(s) for s in labels), default=0) > 6
        ax.set_xticks(ticks, labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=size)
    else:
        ax.set_yticks(ticks, labels, fontsize=size)


def _stage_names(history: list[dict], stages: list[dict] | None) -> list[str]:
    """Each epoch's stage name: the `stages` entry's name for an index, else the value itself."""
    names = {s.get("index", i): s.get("name") for i, s in enumerate(stages or [])}
    out = []
    for row in history:
        s = row.get("stage")
        out.append(str(names.get(s) or (f"stage {s + 1}" if isinstance(s, int) else s)))
    return out


def figure_curves(history: list[dict], stages: list[dict] | None = None, title: str = "Training curves") -> Figure:
    """Loss (and accuracy, when recorded) per epoch for train and val, with dashed stage boundaries."""
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    metrics = ["loss"] + (["accuracy"] if any(f"{s}_accuracy" in r for r in history for s in ("train", "val")) else [])
    names = _stage_names(history, stages)
    starts = [i for i in range(1, len(history)) if names[i] != names[i - 1]]
    fig = new_figure(5 * len(metrics), 4)
    fig.suptitle(title)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for split in ("train", "val"):
            x, y = _finite(epochs, [r.get(f"{split}_{metric}") for r in history])
            if len(y):
                ax.plot(x, y, marker="o", markersize=3, color=_color(split), label=split)
        for i in starts:
            ax.axvline((epochs[i - 1] + epochs[i]) / 2, color=STAGE_COLOR, linestyle="--", linewidth=1,
                       gid="stage-boundary")
        # with more than one stage, each stage's name sits where it begins
        for i in [0, *starts] if starts else []:
            at = epochs[0] if i == 0 else (epochs[i - 1] + epochs[i]) / 2
            ax.text(at, 0.98, f" {names[i]}", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                    color=STAGE_COLOR, parse_math=False)
        ax.set_title(metric.capitalize())
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def figure_confusion(matrix: Any, classes: Sequence[str], normalize: bool = False,
                     title: str = "Confusion matrix") -> Figure:
    """A confusion matrix (rows true, columns predicted) as counts or row-normalised rates."""
    m = np.asarray(matrix, dtype=float)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"a confusion matrix for {k} classes must be {k}x{k}, got shape {m.shape}")
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = min(max(4.0, 0.45 * k + 2.5), 14.0)
    fig = new_figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else max(m.max(), 1))
    fig.colorbar(im, ax=ax, shrink=0.8)
    if k <= MAX_ANNOTATED_CLASSES:
        dark = 0.5 * (1 if normalize else max(m.max(), 1))
        size = 10 if k <= 10 else 7
        for i, j in np.ndindex(k, k):
            text = f"{m[i, j]:.2f}" if normalize else f"{int(round(m[i, j]))}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if m[i, j] > dark else "black")
    _class_ticks(ax, classes, "x")
    _class_ticks(ax, classes, "y")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (row-normalised)" if normalize else title, parse_math=False)
    return fig


def score_decimals(values: Sequence[float | None]) -> int:
    """The fewest decimals (2 to 6) that print distinct values distinctly and no value short of 1 as 1:
    ten classes at AUC 0.9998, 0.9991, 1.0 read `0.9998, 0.9991, 1.0000`, not `1.00` ten times."""
    least, most = SCORE_DECIMALS
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    distinct = len({round(v, most) for v in vals})
    for d in range(least, most + 1):
        shown = {f"{v:.{d}f}" for v in vals}
        if len(shown) == distinct and all(v >= 1.0 or f"{v:.{d}f}" != f"{1:.{d}f}" for v in vals):
            return d
    return most


def _curve_figure(curves: dict[str, dict], x_key: str, y_key: str, score: str, score_key: str,
                  class_names: dict[str, str] | None) -> tuple[Figure, Axes]:
    """One Axes with a labelled line per curve: `name (SCORE 0.87)`, with as many decimals as it takes
    to tell the curves' scores apart (`score_decimals`)."""
    fig = new_figure(6, 5)
    ax = fig.add_subplot()
    names = class_names or {}
    decimals = score_decimals([c[score_key] for c in curves.values()])
    for key, c in curves.items():
        ax.plot(np.asarray(c[x_key]), np.asarray(c[y_key]), linewidth=1.5,
                label=f"{names.get(key, key)} ({score} {float(c[score_key]):.{decimals}f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    return fig, ax


def figure_roc(curves: dict[str, dict], class_names: dict[str, str] | None = None) -> Figure:
    """ROC curves (one for binary, one per class otherwise) with AUC in the legend and a chance line."""
    fig, ax = _curve_figure(curves, "fpr", "tpr", "AUC", "auc", class_names)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve" if len(curves) == 1 else "ROC curves")
    ax.legend(loc="lower right", fontsize="small", ncols=1 + len(curves) // 12)
    return fig


def figure_pr(curves: dict[str, dict], class_names: dict[str, str] | None = None) -> Figure:
    """Precision-recall curves with average precision (AP) in the legend."""
    fig, ax = _curve_figure(curves, "recall", "precision", "AP", "average_precision", class_names)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall curve" if len(curves) == 1 else "Precision-recall curves")
    ax.legend(loc="lower left", fontsize="small", ncols=1 + len(curves) // 12)
    return fig


def figure_reliability(bins: list[dict], ece: float, min_count: int = MIN_BIN_COUNT) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, over a count histogram.

    The gap to each bin's mean confidence is a red line beside the bar's top, not a patch over it;
    bins of fewer than `min_count` examples are faded, since a few examples say little."""
    fig = new_figure(5.5, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lower = np.array([b["bin_lower"] for b in bins], dtype=float)
    width = np.array([b["bin_upper"] for b in bins], dtype=float) - lower
    count = np.array([b["count"] for b in bins], dtype=float)
    full = count > 0
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else np.nan for b in bins], dtype=float)
    conf = np.array([b["confidence"] if b["confidence"] is not None else np.nan for b in bins], dtype=float)
    bars = top.bar(lower[full], acc[full], width[full], align="edge", color=SPLIT_COLORS["train"], edgecolor="white")
    few = count[full] < min_count
    for bar, faded in zip(bars, few):
        bar.set_alpha(0.25 if faded else 1.0)
    centre = (lower + width / 2)[full]
    gap = top.vlines(centre, acc[full], conf[full], color=MISTAKE_COLOR, linewidth=2)
    top.hlines(conf[full], centre - width[full] / 4, centre + width[full] / 4, color=MISTAKE_COLOR, linewidth=2)
    gap.set_alpha([0.3 if f else 1.0 for f in few])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey")
    # the legend's own handles: taken from the bars, a faded first bin would fade the 'accuracy' swatch
    handles = [Patch(color=SPLIT_COLORS["train"], label="accuracy"),
               Line2D([], [], color=MISTAKE_COLOR, linewidth=2, label="gap to mean confidence"),
               Line2D([], [], color="grey", linestyle="--", label="perfect calibration")]
    if few.any():
        handles.append(Patch(color=SPLIT_COLORS["train"], alpha=0.25, label=f"fewer than {min_count} examples"))
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {ece:.3f})")
    top.legend(handles=handles, loc="upper left", fontsize="small")
    hist = bottom.bar(lower, count, width, align="edge", color="grey", edgecolor="white")
    for bar, c in zip(hist, count):
        bar.set_alpha(0.35 if 0 < c < min_count else 1.0)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    return fig


def _as_images(images: Any) -> np.ndarray:
    """Images (N,C,H,W) with C 1 or 3, or (N,H,W), as (N,H,W) or (N,H,W,3) floats in [0, 1]."""
    a = np.asarray(images)
    a = a / 255.0 if a.dtype == np.uint8 else a.astype(float)
    if a.ndim == 4:
        if a.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N,C,H,W) with 1 or 3 channels, got shape {a.shape}")
        a = a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)
    elif a.ndim != 3:
        raise ValueError(f"images must be (N,C,H,W) or (N,H,W), got shape {a.shape}")
    return np.clip(a, 0.0, 1.0)


def figure_samples(images: Any, true: Sequence[int], pred: Sequence[int], confidence: Sequence[float],
                   classes: Sequence[str], title: str = "Sample predictions") -> Figure:
    """A grid of up to 25 images captioned "true / pred (conf%)"; mistakes in red with a red frame."""
    imgs = _as_images(images)[:MAX_GRID]
    true, pred = np.asarray(true)[:MAX_GRID], np.asarray(pred)[:MAX_GRID]
    conf = np.asarray(confidence, dtype=float)[:MAX_GRID]
    rows, cols = _grid(len(imgs))
    fig = new_figure(2.1 * cols, 2.3 * rows + 0.4)
    fig.suptitle(title, parse_math=False)
    if not len(imgs):
        fig.text(0.5, 0.45, "no samples", ha="center", va="center", color="grey")
        return fig
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        if i >= len(imgs):
            ax.set_axis_off()
            continue
        wrong = true[i] != pred[i]
        ax.imshow(imgs[i], cmap="gray" if imgs[i].ndim == 2 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{classes[int(true[i])]} / {classes[int(pred[i])]} ({conf[i]:.0%})", fontsize=8,
                     color=MISTAKE_COLOR if wrong else "black", parse_math=False)
        for spine in ax.spines.values():
            spine.set_visible(bool(wrong))
            spine.set(color=MISTAKE_COLOR, linewidth=3)
    return fig


def figure_class_distribution(counts: dict[str, Sequence[int]], classes: Sequence[str]) -> Figure:
    """Samples per class as grouped bars per split, beside a pie chart of the training split."""
    k, splits = len(classes), list(counts)
    fig = new_figure(min(max(8.0, 0.2 * k * len(splits) + 5), 16), 4.5)
    bars, pie = fig.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / max(1, len(splits))
    for n, split in enumerate(splits):
        bars.bar(np.arange(k) + (n - (len(splits) - 1) / 2) * width, counts[split], width, label=split,
                 color=_color(split))
    _class_ticks(bars, classes, "x")
    bars.set_xlabel("class")
    bars.set_ylabel("samples")
    bars.set_title("Class distribution")
    bars.legend()
    shown = "train" if "train" in counts else splits[0]
    values = np.asarray(counts[shown], dtype=float)
    keep = values > 0
    if keep.any():
        labels = [str(c) for c in np.asarray(classes, dtype=object)[keep]] if k <= 12 else None
        pie.pie(values[keep], labels=labels, autopct="%1.0f%%" if k <= 12 else None, startangle=90,
                counterclock=False, textprops={"fontsize": 8})
    pie.set_title(f"{shown} split")
    return fig


def _token_color(score: float, scale: float) -> tuple[float, float, float]:
    """White blended towards green (positive) or red (negative) by |score| / scale."""
    base = np.array([0.10, 0.60, 0.20]) if score >= 0 else np.array([0.84, 0.15, 0.16])
    a = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    return tuple((1 - a) * np.ones(3) + a * base)


def figure_token_importance(tokens: Sequence[str], scores: Sequence[float], label: str, confidence: float,
                            width: float = 8.0) -> Figure:
    """The text as wrapped words, each shaded green (for the prediction) or red (against) by its score."""
    scores = np.asarray(scores, dtype=float)
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    fig = new_figure(width, 1.0, layout=None)
    # lay the words out in inches, measured with the font they will be drawn in
    font, size = FontProperties(size=12), 12
    renderer = fig.canvas.get_renderer()
    margin, gap, line_h = 0.3, 0.14, size * 2.0 / 72
    places, x, line = [], margin, 0
    for tok in tokens:
        w = renderer.get_text_width_height_descent(tok, font, ismath=False)[0] / fig.dpi
        if x + w > width - margin and x > margin:
            x, line = margin, line + 1
        places.append((x, margin + (line + 0.5) * line_h))
        x += w + gap
    text_h, title_h, note_h = 2 * margin + (line + 1) * line_h, 0.5, 0.35
    height = text_h + title_h + note_h
    fig.set_size_inches(width, height)
    ax = fig.add_axes((0, note_h / height, 1, text_h / height))
    ax.set_xlim(0, width)
    ax.set_ylim(text_h, 0)
    ax.set_axis_off()
    scale = float(np.max(np.abs(scores))) if len(scores) else 0.0
    for tok, s, (x, y) in zip(tokens, scores, places):
        color = _token_color(s, scale)
        ink = "white" if scale > 0 and abs(s) / scale > 0.6 else "black"
        ax.text(x, y, tok, fontproperties=font, va="center", ha="left", color=ink, parse_math=False,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": color, "edgecolor": "none"})
    ax.set_title(f"Prediction: {label} ({confidence:.0%})", parse_math=False)
    fig.text(0.5, note_h / height / 2, "green: supports the prediction   red: speaks against it",
             ha="center", va="center", fontsize=8, color="grey")
    return fig


def figure_fit_line(x: Any, y: Any, w: float, b: float, x_test: Any = None, y_test: Any = None,
                    xlabel: str = "x", ylabel: str = "y") -> Figure:
    """The data as points and the learned line y = w x + b, labelled with its values."""
    w, b = float(np.asarray(w).squeeze()), float(np.asarray(b).squeeze())
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    fig = new_figure(6, 4.5)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=18, color=SPLIT_COLORS["train"], label="train")
    every = [x]
    if x_test is not None and y_test is not None:
        x_test = np.asarray(x_test, dtype=float).ravel()
        ax.scatter(x_test, np.asarray(y_test, dtype=float).ravel(), s=18, color=SPLIT_COLORS["test"],
                   marker="s", label="test")
        every.append(x_test)
    span = np.concatenate(every)
    line = np.array([span.min(), span.max()]) if span.size else np.array([0.0, 1.0])
    ax.plot(line, w * line + b, color="black", linewidth=2,
            label=f"y = {w:.3g}x {'-' if b < 0 else '+'} {abs(b):.3g}")
    ax.set_xlabel(xlabel, parse_math=False)
    ax.set_ylabel(ylabel, parse_math=False)
    ax.set_title("Learned line")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def figure_loss_curve(losses: dict[str, Sequence[float]], ylabel: str = "loss", log_y: bool = False,
                      title: str = "Loss per epoch") -> Figure:
    """One or more named series over epochs 1..n, e.g. {"NumPy": [...], "PyTorch": [...]}."""
    fig = new_figure(6, 4.5)
    ax = fig.add_subplot()
    for n, (name, values) in enumerate(losses.items()):
        x, y = _finite(np.arange(1, len(values) + 1), values)
        if log_y:
            x, y = x[y > 0], y[y > 0]
        # a line style per series, so that two series that agree (NumPy vs PyTorch) stay both visible
        ax.plot(x, y, linestyle=("-", "--", ":", "-.")[n % 4], marker="o" if len(y) <= 30 else None, markersize=3,
                color=_color(name), label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel, parse_math=False)
    ax.set_title(title, parse_math=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


GRID_PANEL_INCHES = 2.6  # a Grad-CAM panel's width; captions wrap to it
CAPTION_CHARS = 24  # characters a 9-point line holds across one panel


def figure_gradcam_grid(overlays: Sequence[Any], captions: Sequence[str], title: str = "Grad-CAM") -> Figure:
    """Ready-made heat-map overlays (H,W,3 uint8) in a grid, each with its caption wrapped to the panel's
    width (a long class name would otherwise run into the next panel, or off the figure's edge)."""
    if len(overlays) != len(captions):
        raise ValueError(f"{len(overlays)} overlays but {len(captions)} captions")
    rows, cols = _grid(len(overlays), max_cols=4)
    wrapped = [wrap_caption(c) for c in captions]
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    fig = new_figure(GRID_PANEL_INCHES * cols, (2.4 + 0.17 * lines) * rows + 0.4)
    fig.suptitle(title, parse_math=False)
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        ax.set_axis_off()
        if i < len(overlays):
            ax.imshow(np.asarray(overlays[i]))
            ax.set_title(wrapped[i], fontsize=9, parse_math=False)
    return fig


def wrap_caption(caption: str, width: int = CAPTION_CHARS) -> str:
    """`caption` in lines of at most `width` characters, broken after ' / ' or at spaces where it can."""
    if len(caption) <= width:
        return caption
    lines: list[str] = []
    for part in caption.replace(" / ", " /\n").split("\n"):
        lines += textwrap.wrap(part, width, break_on_hyphens=False) or [""]
    return "\n".join(lines)
