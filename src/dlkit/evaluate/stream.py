"""Classification metrics computed batch by batch, in memory that does not grow with the test set.

A MetricStream keeps counts and sums only: the confusion matrix, top-k hits, calibration bins, the
exact sum of per-example log losses, and per-class histograms of one-vs-rest log-odds for ROC and
PR. Everything but ROC and PR equals scikit-learn on the whole data set, and no result depends on
the order of the examples or how they were cut into batches (counts are integers, float sums exact).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dlkit.errors import InputError

StreamTask = Literal["multiclass", "binary"]
LOGIT_RANGE = 20.0  # ROC/PR bins cover log-odds [-20, 20], i.e. p from 2e-9 to 1 - 2e-9
MAX_CURVE_POINTS = 512


def log_odds(logits: Tensor, task: StreamTask) -> Tensor:
    """One-vs-rest log-odds log(p / (1 - p)) in float64: every class's (N x C), or class 1's (N x 1) if binary."""
    z = logits.detach().cpu().double()
    if task == "binary":
        return z.reshape(-1, 1)
    shifted = z - z.max(1, keepdim=True).values
    e = shifted.exp()
    rest = e.sum(1, keepdim=True) - e  # the other classes' share; no cancellation, the top class adds 1
    top = shifted.argmax(1, keepdim=True)
    # the top class's rest is summed directly, so p near 1 keeps its log-odds
    rest.scatter_(1, top, e.scatter(1, top, 0.0).sum(1, keepdim=True))
    return shifted - rest.log()


def logit_bins(odds: Tensor, bins: int) -> Tensor:
    """Bin index 0..bins-1 of each log-odds: equal widths over [-20, 20], values beyond in the end bins."""
    scaled = (odds.clamp(-LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) * (bins / (2 * LOGIT_RANGE))
    return scaled.floor().long().clamp(0, bins - 1)


class ExactSum:
    """A running float sum held exactly as a few non-overlapping floats: order and batching cannot change it."""

    def __init__(self) -> None:
        self.parts: list[float] = []

    def add(self, values: np.ndarray) -> None:
        """Add every value, exactly."""
        terms = self.parts + values.tolist()
        parts: list[float] = []
        # each fsum is the correctly rounded remainder, so the parts shrink by 2^-53 until the sum is exact
        while (rest := math.fsum(terms + [-p for p in parts])) != 0.0:
            parts.append(rest)
        self.parts = parts

    @property
    def value(self) -> float:
        """The sum, correctly rounded."""
        return math.fsum(self.parts)


@dataclass
class Evaluation:
    """Test-set classification metrics as plain Python values (binary: classes 0 and 1)."""

    n: int
    accuracy: float
    log_loss: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    top_k: dict[int, float]
    ece: float
    reliability: list[dict[str, float]]  # non-empty calibration bins only
    roc: dict[str, dict[str, Any]]
    roc_auc: float | None
    pr: dict[str, dict[str, Any]]

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Flat scalars named as classification_metrics names them: accuracy, loss, f1, ..., ece."""
        out = {"accuracy": self.accuracy, "loss": self.log_loss, "f1": self.macro_f1,
               "precision": self.macro_precision, "recall": self.macro_recall}
        if self.roc_auc is not None:
            out["roc_auc"] = self.roc_auc
        out |= {f"top{k}_accuracy": v for k, v in self.top_k.items()}
        out["ece"] = self.ece
        return {prefix + name: value for name, value in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """Every field, ready for json.dumps."""
        return asdict(self)


class MetricStream:
    """Classification metrics accumulated batch by batch; memory depends on num_classes and bins, not on N.

    ROC and PR come from per-class histograms of one-vs-rest log-odds log(p / (1 - p)) over `bins`
    equal bins on [-20, 20] (values beyond go to the end bins), so confident models keep resolution
    near p = 0 and 1. AUC and average precision equal scikit-learn's on the binned scores (the bin
    index as the score) to float precision. Against the raw scores only examples sharing a bin can
    differ, which bounds the error by
        |AUC - AUC_raw| <= sum_b pos_b * neg_b / (2 * P * N)
        |AP - AP_raw|   <= sum_b (pos_b / P) * ln(M_b / (A_b + 1))
    with pos_b, neg_b the positives and negatives in bin b, P, N their totals, A_b the examples in
    higher bins and M_b = A_b + pos_b + neg_b. (AUC: a positive-negative pair in one bin counts 1/2
    instead of 0 or 1. AP: a bin's recall step is weighted by the precision at the bin's end instead
    of at each raw threshold, and each example added to the m before it moves precision by <= 1/m.)
    Both shrink with the bin width (40 / bins). With the default 8192 bins and scores spread over a
    few units of log-odds, the AUC bound is about 3e-4 and the AP bound about 3e-3. Actual differences
    are smaller: about 5e-5 for AUC, whose in-bin errors cancel, and up to a few 1e-4 for AP, biased
    low as positives tend to sit above negatives within a bin. The histograms take 128 KiB per class.
    """

    def __init__(self, task: StreamTask, num_classes: int, top_k: tuple[int, ...] = (3, 5), bins: int = 8192,
                 calibration_bins: int = 15) -> None:
        if task not in ("multiclass", "binary"):
            raise InputError(f"streaming metrics need task 'multiclass' or 'binary', not {task!r}")
        if num_classes < 2 or (task == "binary" and num_classes != 2):
            raise InputError(f"num_classes must be 2 for binary and at least 2 for multiclass, not {num_classes}")
        if bins < 2 or calibration_bins < 1 or any(k < 1 for k in top_k):
            raise InputError(f"need bins >= 2, calibration_bins >= 1 and every top_k >= 1; "
                             f"got {bins}, {calibration_bins}, {top_k}")
        self.task, self.num_classes, self.bins = task, num_classes, bins
        self.top_k = tuple(sorted({k for k in top_k if k < num_classes}))  # k >= C always hits
        self.n = 0
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.top_hits = dict.fromkeys(self.top_k, 0)
        self.loss_sum = ExactSum()
        self.bin_count = np.zeros(calibration_bins, np.int64)
        self.bin_correct = np.zeros(calibration_bins, np.int64)
        self.bin_confidence = [ExactSum() for _ in range(calibration_bins)]
        curves = 1 if task == "binary" else num_classes
        self.positives = np.zeros((curves, bins), np.int64)
        self.negatives = np.zeros((curves, bins), np.int64)

    def update(self, logits: Tensor, y: Tensor) -> None:
        """Add a batch: logits N x C (binary: N or N x 1, one sigmoid logit), any float dtype, and N labels."""
        z, y = self._checked(logits, y)  # float64: exact for fp16, bf16 and fp32 logits
        if len(y) == 0:
            return
        if self.task == "binary":
            pred = (z > 0).long()
            loss = F.binary_cross_entropy_with_logits(z, y.double(), reduction="none")
            confidence = torch.sigmoid(z.abs())  # max(p, 1 - p)
            is_positive = y.bool()[:, None]
        else:
            log_p = z.log_softmax(1)
            pred = log_p.argmax(1)
            loss = -log_p.gather(1, y[:, None]).squeeze(1)
            confidence = log_p.max(1).values.exp()
            is_positive = F.one_hot(y, self.num_classes).bool()
            self._count_top_k(z, y)
        c = self.num_classes
        self.n += len(y)
        self.confusion += np.bincount((y * c + pred).numpy(), minlength=c * c).reshape(c, c)
        self.loss_sum.add(loss.numpy())
        self._count_calibration(confidence.numpy(), (pred == y).numpy())
        flat = (logit_bins(log_odds(z, self.task), self.bins) + torch.arange(is_positive.shape[1]) * self.bins).numpy()
        # add.at costs N x classes per batch, where a bincount would touch all classes x bins
        np.add.at(self.positives.reshape(-1), flat[is_positive.numpy()], 1)
        np.add.at(self.negatives.reshape(-1), flat[~is_positive.numpy()], 1)

    def _checked(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch as float64 logits (binary: N) and long labels, or an InputError saying what is wrong."""
        c, shape = self.num_classes, tuple(logits.shape)
        z, y = logits.detach().cpu().double(), y.detach().cpu()
        if self.task == "binary":
            if z.dim() not in (1, 2) or (z.dim() == 2 and z.shape[1] != 1):
                raise InputError(f"binary logits must have shape (N,) or (N, 1), one sigmoid logit each; got {shape}")
            z = z.reshape(-1)
        elif z.dim() != 2 or z.shape[1] != c:
            raise InputError(f"logits have shape {shape} but num_classes is {c}; pass logits of shape (N, {c})")
        y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
        if y.dim() != 1 or len(y) != len(z):
            raise InputError(f"labels have shape {tuple(y.shape)} but logits have {len(z)} rows; "
                             "pass one label per row")
        if not torch.isfinite(z).all():
            raise InputError("logits contain NaN or infinity; check the model's outputs (fp16 overflow, say)")
        labels = y.long()
        bad = (labels != y) | (labels < 0) | (labels >= c)
        if bad.any():
            raise InputError(f"labels must be class indices 0..{c - 1}; got {y[bad][0].item()}")
        return z, labels

    def _count_top_k(self, z: Tensor, y: Tensor) -> None:
        """Count the examples whose true class ranks in the top k of their logits, for each k."""
        true_score = z.gather(1, y[:, None])
        after = torch.arange(self.num_classes) > y[:, None]
        # ties rank the higher class index first, as scikit-learn's top_k_accuracy_score does
        rank = (z > true_score).sum(1) + ((z == true_score) & after).sum(1)
        for k in self.top_k:
            self.top_hits[k] += int((rank < k).sum())

    def _count_calibration(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Add examples to the calibration bins (equal widths on [0, 1]) of their confidence."""
        bins = len(self.bin_count)
        which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
        self.bin_count += np.bincount(which, minlength=bins)
        self.bin_correct += np.bincount(which, weights=correct, minlength=bins).astype(np.int64)
        for b in np.unique(which):
            self.bin_confidence[b].add(confidence[which == b])

    def result(self) -> Evaluation:
        """The metrics of every example seen so far; updating afterwards goes on from there."""
        if self.n == 0:
            raise InputError("no examples yet: call update(logits, y) with at least one batch before result()")
        cm, n = self.confusion, self.n
        tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
        precision, recall, f1 = _ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, support + predicted)
        names = ["positive"] if self.task == "binary" else [str(c) for c in range(self.num_classes)]
        curves = [_curves(pos, neg) for pos, neg in zip(self.positives, self.negatives)]
        roc = {name: r for name, (r, _) in zip(names, curves)}
        undefined = [name for name, r in roc.items() if r["auc"] is None]
        if undefined:
            warnings.warn(f"roc_auc is undefined: class {', '.join(undefined)} lacks positive or negative "
                          "examples in the labels, so its AUC and average precision are None", stacklevel=2)
        if self.task == "multiclass":
            roc["macro"] = _macro_roc(list(roc.values()))
        return Evaluation(
            n=n, accuracy=float(tp.sum() / n), log_loss=self.loss_sum.value / n,
            precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(), support=support.tolist(),
            macro_precision=float(precision.mean()), macro_recall=float(recall.mean()), macro_f1=float(f1.mean()),
            weighted_f1=float((f1 * support).sum() / n), confusion=cm.tolist(),
            top_k={k: hits / n for k, hits in self.top_hits.items()},
            ece=self._ece(), reliability=self._reliability(),
            roc=roc, roc_auc=roc[names[0] if self.task == "binary" else "macro"]["auc"],
            pr={name: p for name, (_, p) in zip(names, curves)},
        )

    def _ece(self) -> float:
        """Expected calibration error over the confidence bins."""
        # ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|, where an example's confidence is its largest
        # class probability, bin b of B holds confidences in [b/B, (b+1)/B) (the last bin also 1.0),
        # accuracy_b is the fraction of bin b predicted right and confidence_b the bin's mean confidence
        gaps = [abs(int(right) - total.value) for right, total in zip(self.bin_correct, self.bin_confidence)]
        return sum(gaps) / self.n

    def _reliability(self) -> list[dict[str, float]]:
        """Mean confidence, accuracy and count of each non-empty confidence bin, for reliability diagrams."""
        bins = len(self.bin_count)
        return [{"bin_lower": b / bins, "bin_upper": (b + 1) / bins,
                 "confidence": self.bin_confidence[b].value / int(self.bin_count[b]),
                 "accuracy": int(self.bin_correct[b]) / int(self.bin_count[b]), "count": int(self.bin_count[b])}
                for b in np.flatnonzero(self.bin_count).tolist()]


def evaluate_stream(batches: Iterable[tuple[Tensor, Tensor]], task: StreamTask, num_classes: int,
                    **kw: Any) -> Evaluation:
    """Metrics over (logits, labels) batches, such as a model's outputs over a test split."""
    stream = MetricStream(task, num_classes, **kw)
    for logits, y in batches:
        stream.update(logits, y)
    return stream.result()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def _curves(pos: np.ndarray, neg: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """ROC curve with AUC, and PR curve with average precision, from one class's histograms (None if undefined)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return {"fpr": [], "tpr": [], "auc": None}, {"precision": [], "recall": [], "average_precision": None}
    filled = (pos + neg)[::-1] > 0  # thresholds from the highest bin down, empty bins skipped
    p, q = pos[::-1][filled], neg[::-1][filled]
    tps, fps = np.cumsum(p), np.cumsum(q)
    # trapezoid rule: a positive above a negative counts 1, one in the same bin 1/2
    auc = float(np.sum(q * (2 * (tps - p) + p))) / (2 * n_pos * n_neg)
    # step rule: each bin's recall step times the precision at its threshold
    average_precision = float(np.sum(p * tps / (tps + fps))) / n_pos
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    step = np.diff(np.stack([fps, tps]), axis=1)
    corner = np.r_[True, step[0, :-1] * step[1, 1:] != step[1, :-1] * step[0, 1:], True]  # drop collinear points
    fpr, tpr = _thin(fps[corner] / n_neg, tps[corner] / n_pos)
    recall, precision = _thin(tps / n_pos, np.r_[1.0, tps[1:] / (tps[1:] + fps[1:])])
    return ({"fpr": fpr, "tpr": tpr, "auc": auc},
            {"precision": precision, "recall": recall, "average_precision": average_precision})


def _macro_roc(rocs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one-vs-rest curves averaged over a shared FPR grid; AUC is the mean AUC (None if any is undefined)."""
    defined = [r for r in rocs if r["auc"] is not None]
    if not defined:
        return {"fpr": [], "tpr": [], "auc": None}
    grid = np.unique(np.concatenate([r["fpr"] for r in defined]))
    tprs = []
    for r in defined:
        fpr, tpr = np.array(r["fpr"]), np.array(r["tpr"])
        top = np.r_[fpr[1:] != fpr[:-1], True]  # the highest TPR at each FPR, so interp sees rising x
        tprs.append(np.interp(grid, fpr[top], tpr[top]))
    fpr, tpr = _thin(np.r_[0.0, grid], np.r_[0.0, np.mean(tprs, axis=0)])
    auc = None if len(defined) < len(rocs) else float(np.mean([r["auc"] for r in rocs]))
    return {"fpr": fpr, "tpr": tpr, "auc": auc}


def _thin(*columns: np.ndarray) -> list[list[float]]:
    """At most MAX_CURVE_POINTS evenly spaced rows of parallel columns, keeping the first and last."""
    keep = np.unique(np.linspace(0, len(columns[0]) - 1, MAX_CURVE_POINTS).round().astype(np.int64))
    return [column[keep].tolist() for column in columns]
