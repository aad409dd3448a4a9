"""Streaming metrics equal scikit-learn's: exactly for counts and log loss, within the documented
binning bound for ROC-AUC and average precision, and whatever the batch size or order."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from dlkit.errors import InputError
from dlkit.evaluate.metrics import classification_metrics
from dlkit.evaluate.stream import ExactSum, MetricStream, evaluate_stream, log_odds, logit_bins

EXACT = dict(rel=1e-12, abs=1e-15)  # "exact": equal up to float rounding
RAW = 1e-3  # binned AUC / AP against scikit-learn on the raw scores


def multiclass_data(c: int, n: int = 1500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 logits and labels that agree with them about half the time."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, c)) * 2).astype(np.float32)
    y = (z + rng.normal(size=(n, c)) * 3).argmax(1)
    return torch.from_numpy(z), torch.from_numpy(y)


def binary_data(n: int = 1500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One random float32 logit per example (N x 1) and float 0/1 labels that shift it by 2."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = (rng.normal(size=n) * 2 + (y - 0.5) * 2).astype(np.float32)
    return torch.from_numpy(z)[:, None], torch.from_numpy(y).float()


def softmax(z: torch.Tensor) -> np.ndarray:
    """Class probabilities in float64."""
    return torch.softmax(z.double(), 1).numpy()


def binning_bounds(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """The AUC and AP error bounds of MetricStream's docstring, from one class's histograms."""
    n_pos, n_neg = pos.sum(), neg.sum()
    above = np.cumsum((pos + neg)[::-1])[::-1] - (pos + neg)
    has = pos > 0  # only bins with positives take a recall step
    ap_bound = (pos[has] / n_pos * np.log((above + pos + neg)[has] / (above[has] + 1))).sum()
    return float((pos * neg).sum() / (2 * n_pos * n_neg)), float(ap_bound)


def check_curve(stream: MetricStream, z: torch.Tensor, k: int, positive: np.ndarray, raw: np.ndarray) -> None:
    """Curve k's AUC and AP: exact against scikit-learn on the binned scores, within bound and RAW on raw ones."""
    ev, key = stream.result(), "positive" if stream.task == "binary" else str(k)
    binned = logit_bins(log_odds(z, stream.task), stream.bins)[:, k].numpy()
    auc, ap = ev.roc[key]["auc"], ev.pr[key]["average_precision"]
    assert auc == pytest.approx(roc_auc_score(positive, binned), **EXACT)
    assert ap == pytest.approx(average_precision_score(positive, binned), **EXACT)
    auc_bound, ap_bound = binning_bounds(stream.positives[k], stream.negatives[k])
    assert abs(auc - roc_auc_score(positive, raw)) <= min(auc_bound, RAW)
    assert abs(ap - average_precision_score(positive, raw)) <= min(ap_bound, RAW)


def fed(task: str, c: int, z: torch.Tensor, y: torch.Tensor, **kw) -> MetricStream:
    """A stream fed all of z and y in one batch."""
    stream = MetricStream(task, c, **kw)
    stream.update(z, y)
    return stream


@pytest.mark.parametrize("c", [5, 10])
def test_multiclass_matches_sklearn(c):
    z, y = multiclass_data(c)
    stream = fed("multiclass", c, z, y)
    ev, probs, labels = stream.result(), softmax(z), list(range(c))
    pred = z.argmax(1).numpy()
    assert ev.n == 1500 and ev.accuracy == pytest.approx(accuracy_score(y, pred), **EXACT)
    assert ev.confusion == confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert ev.precision == pytest.approx(p.tolist(), **EXACT) and ev.recall == pytest.approx(r.tolist(), **EXACT)
    assert ev.f1 == pytest.approx(f.tolist(), **EXACT) and ev.support == s.tolist()
    macro = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    assert (ev.macro_precision, ev.macro_recall, ev.macro_f1) == pytest.approx(macro[:3], **EXACT)
    weighted = precision_recall_fscore_support(y, pred, labels=labels, average="weighted", zero_division=0)
    assert ev.weighted_f1 == pytest.approx(weighted[2], **EXACT)
    assert ev.log_loss == pytest.approx(log_loss(y, probs, labels=labels), abs=1e-6)
    assert set(ev.top_k) == ({3, 5} if c == 10 else {3})
    for k, value in ev.top_k.items():
        assert value == top_k_accuracy_score(y, z.numpy(), k=k, labels=labels)
    for k in range(c):
        check_curve(stream, z, k, (y == k).numpy(), probs[:, k])
    assert ev.roc_auc == ev.roc["macro"]["auc"] == pytest.approx(np.mean([ev.roc[str(k)]["auc"] for k in labels]))
    assert abs(ev.roc_auc - roc_auc_score(y, probs, multi_class="ovr", labels=labels)) <= RAW


def test_binary_matches_sklearn():
    z, y = binary_data()
    stream = fed("binary", 2, z, y)
    ev = stream.result()
    p1 = torch.sigmoid(z.double()).numpy()[:, 0]
    yi, pred = y.long().numpy(), (z[:, 0] > 0).long().numpy()
    assert ev.accuracy == pytest.approx(accuracy_score(yi, pred), **EXACT)
    assert ev.confusion == confusion_matrix(yi, pred, labels=[0, 1]).tolist()
    p, r, f, s = precision_recall_fscore_support(yi, pred, labels=[0, 1], zero_division=0)
    assert (ev.precision, ev.recall, ev.f1) == (pytest.approx(p.tolist(), **EXACT), pytest.approx(r.tolist(), **EXACT),
                                                pytest.approx(f.tolist(), **EXACT))
    assert ev.support == s.tolist() and ev.macro_f1 == pytest.approx(f.mean(), **EXACT)
    assert ev.log_loss == pytest.approx(log_loss(yi, np.c_[1 - p1, p1]), abs=1e-6)
    assert ev.top_k == {} and list(ev.roc) == list(ev.pr) == ["positive"]
    check_curve(stream, z, 0, yi, p1)
    assert ev.roc_auc == ev.roc["positive"]["auc"]


def test_top_k_ties_count_as_sklearn_does():
    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.integers(0, 3, (400, 6)).astype(np.float32))  # many ties
    y = torch.from_numpy(rng.integers(0, 6, 400))
    ev = fed("multiclass", 6, z, y, top_k=(1, 2, 3, 4, 5, 6)).result()
    assert list(ev.top_k) == [1, 2, 3, 4, 5]  # k = 6 always hits, so it is left out
    for k, value in ev.top_k.items():
        assert value == top_k_accuracy_score(y, z.numpy(), k=k, labels=list(range(6)))


@pytest.mark.parametrize("bins", [4, 64])
def test_the_documented_bound_holds_for_coarse_bins(bins):
    # few bins make the binning error large, so the bound is put to a real test
    rng, auc_share = np.random.default_rng(bins), []
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        z = torch.from_numpy(rng.normal(size=60) * 3 + y * 2)
        stream = fed("binary", 2, z, torch.from_numpy(y), bins=bins)
        ev = stream.result()
        auc_bound, ap_bound = binning_bounds(stream.positives[0], stream.negatives[0])
        assert abs(ev.pr["positive"]["average_precision"] - average_precision_score(y, z)) <= ap_bound
        auc_share.append(abs(ev.roc_auc - roc_auc_score(y, z)) / auc_bound)
    assert 0.5 < max(auc_share) <= 1  # the AUC error comes within 2x of its bound


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_batch_size_changes_nothing(task):
    z, y = multiclass_data(5, n=300, seed=1) if task == "multiclass" else binary_data(n=300, seed=1)
    c = 5 if task == "multiclass" else 2
    whole = evaluate_stream([(z, y)], task, c).to_dict()
    for size in (1, 7):
        assert evaluate_stream(zip(z.split(size), y.split(size)), task, c).to_dict() == whole
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))  # a shuffled loader: same too
    assert evaluate_stream(zip(z[order].split(7), y[order].split(7)), task, c).to_dict() == whole
    stream = MetricStream(task, c)
    stream.update(z[:100], y[:100])
    stream.result()  # reading midway leaves the stream going
    stream.update(z[100:], y[100:])
    assert stream.result().to_dict() == stream.result().to_dict() == whole


def test_exact_sum_ignores_order_and_batching():
    values = np.array([1e16, 1.0, -1e16, 3e-17, 0.1, 0.2])
    assert sum(values.tolist()) == pytest.approx(0.3)  # plain float addition loses the 1.0
    for batches in ([values], [values[::-1]], np.split(values, 6), [values[3:], values[:3]]):
        total = ExactSum()
        for batch in batches:
            total.add(batch)
        assert total.value == math.fsum(values) == pytest.approx(1.3)  # the correctly rounded sum


def test_ece_by_hand_binary():
    p = torch.tensor([0.9, 0.9, 0.7, 0.15, 0.55], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0, 0])
    ev = evaluate_stream([(torch.logit(p), y)], "binary", 2, calibration_bins=5)
    # confidences 0.9 0.9 0.7 0.85 0.55, right? 1 0 1 1 0; bins of 0.2: [0.4, 0.6) {0.55}, [0.6, 0.8) {0.7},
    # [0.8, 1] {0.9, 0.9, 0.85}: (|0 - 0.55| + |1 - 0.7| + 3 * |2/3 - 0.8833|) / 5 = 1.5 / 5
    assert ev.ece == pytest.approx(0.3, abs=1e-12)
    assert [(b["bin_lower"], b["bin_upper"], b["count"]) for b in ev.reliability] == [
        (0.4, 0.6, 1), (0.6, 0.8, 1), (0.8, 1.0, 3)]
    assert [b["accuracy"] for b in ev.reliability] == pytest.approx([0, 1, 2 / 3])
    assert [b["confidence"] for b in ev.reliability] == pytest.approx([0.55, 0.7, 2.65 / 3])
    # a bin holds its lower edge: confidence 0.5 goes to [0.5, 1.0] of two bins
    edge = evaluate_stream([(torch.zeros(2), torch.tensor([0, 1]))], "binary", 2, calibration_bins=2)
    assert edge.reliability == [{"bin_lower": 0.5, "bin_upper": 1.0, "confidence": 0.5, "accuracy": 0.5, "count": 2}]
    assert edge.ece == 0.0


def test_ece_by_hand_multiclass():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.1, 0.85], [0.45, 0.35, 0.2]], dtype=torch.float64)
    ev = evaluate_stream([(probs.log(), torch.tensor([0, 2, 2, 1]))], "multiclass", 3, calibration_bins=4)
    # confidence is the top probability: 0.6 right, 0.7 wrong, 0.85 right, 0.45 wrong; bins of 0.25:
    # {0.45}: 0.45, {0.6, 0.7}: 2 * |0.5 - 0.65|, {0.85}: 0.15 -> 0.9 / 4
    assert ev.ece == pytest.approx(0.225, abs=1e-12)
    assert [b["count"] for b in ev.reliability] == [1, 2, 1] and sum(b["count"] for b in ev.reliability) == ev.n


def test_reliability_counts_sum_to_n():
    z, y = multiclass_data(10, n=500)
    ev = evaluate_stream([(z, y)], "multiclass", 10)
    assert sum(b["count"] for b in ev.reliability) == 500
    gaps = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in ev.reliability) / 500
    assert ev.ece == pytest.approx(gaps, abs=1e-12)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: past the histogram's [-20, 20], so clipped
def test_perfect_separation_gives_auc_one(scale):
    y = torch.tensor([0, 1] * 50)
    z = (y * 2 - 1) * (torch.rand(100, generator=torch.Generator().manual_seed(0)) + 1) * scale
    ev = evaluate_stream([(z, y)], "binary", 2)
    assert ev.roc_auc == 1.0 and ev.pr["positive"]["average_precision"] == 1.0 and ev.accuracy == 1.0
    assert (ev.roc["positive"]["fpr"], ev.roc["positive"]["tpr"]) == ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])


def test_confident_scores_keep_resolution():
    # p between 1 - 1e-4 and 1 - 1e-7: equal-width bins on p would put nearly all of them in one bin
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 1000)
    z = torch.from_numpy(10 + y + rng.normal(size=1000))
    ev = evaluate_stream([(z, torch.from_numpy(y))], "binary", 2)
    assert roc_auc_score(y, z) < 0.8
    assert abs(ev.roc_auc - roc_auc_score(y, z)) <= RAW
    assert abs(ev.pr["positive"]["average_precision"] - average_precision_score(y, z)) <= RAW


def test_curves_are_thinned_for_plotting_and_keep_their_ends():
    z, y = multiclass_data(5, n=3000)
    ev = evaluate_stream([(z, y)], "multiclass", 5)
    for roc in ev.roc.values():
        assert 100 < len(roc["fpr"]) == len(roc["tpr"]) <= 512
        assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    for pr in ev.pr.values():
        assert 100 < len(pr["recall"]) == len(pr["precision"]) <= 512
        assert (pr["recall"][0], pr["precision"][0], pr["recall"][-1]) == (0, 1, 1)
    # the macro curve averages the class curves: its area is close to the mean AUC
    assert np.trapezoid(ev.roc["macro"]["tpr"], ev.roc["macro"]["fpr"]) == pytest.approx(ev.roc_auc, abs=2e-3)


def test_absent_class_leaves_roc_auc_undefined():
    z, y = multiclass_data(4, n=400)
    y[y == 3] = 0
    with pytest.warns(UserWarning, match=r"^roc_auc is undefined: class 3 lacks positive or negative examples"):
        ev = evaluate_stream([(z, y)], "multiclass", 4)
    assert ev.roc_auc is None and ev.roc["macro"]["auc"] is None and ev.roc["3"] == {"fpr": [], "tpr": [], "auc": None}
    assert ev.pr["3"]["average_precision"] is None and ev.roc["0"]["auc"] > 0.5
    assert ev.support[3] == 0 and ev.recall[3] == 0.0
    _, _, f, _ = precision_recall_fscore_support(y, z.argmax(1), labels=range(4), zero_division=0)
    assert ev.f1 == pytest.approx(f.tolist(), **EXACT)
    assert "test_roc_auc" not in ev.metrics() and len(ev.roc["macro"]["fpr"]) > 2
    assert json.loads(json.dumps(ev.to_dict()))["roc_auc"] is None
    with pytest.warns(UserWarning, match="class positive lacks"):
        one_class = evaluate_stream([(torch.tensor([1.0, -1.0, 2.0]), torch.ones(3))], "binary", 2)
    assert one_class.roc_auc is None and one_class.accuracy == 2 / 3 and one_class.recall == [0.0, 2 / 3]


@pytest.mark.parametrize(("task", "c", "logits", "y", "message"), [
    ("multiclass", 5, torch.zeros(4, 3), torch.zeros(4), r"logits have shape \(4, 3\) but num_classes is 5"),
    ("multiclass", 5, torch.zeros(4, 5), torch.zeros(3), r"labels have shape \(3,\) but logits have 4 rows"),
    ("binary", 2, torch.zeros(4, 2), torch.zeros(4), r"binary logits must have shape \(N,\) or \(N, 1\)"),
    ("multiclass", 5, torch.zeros(2, 5), torch.tensor([1, 7]), r"labels must be class indices 0..4; got 7"),
    ("binary", 2, torch.zeros(2), torch.tensor([0.5, 1.0]), r"labels must be class indices 0..1; got 0.5"),
    ("binary", 2, torch.tensor([0.0, float("nan")]), torch.zeros(2), "logits contain NaN or infinity"),
])
def test_bad_input_raises_a_one_line_input_error(task, c, logits, y, message):
    with pytest.raises(InputError, match=message) as caught:
        MetricStream(task, c).update(logits, y)
    assert "\n" not in str(caught.value)


def test_bad_arguments_and_no_data_raise_input_errors():
    with pytest.raises(InputError, match="task 'multiclass' or 'binary', not 'regression'"):
        MetricStream("regression", 1)
    with pytest.raises(InputError, match="num_classes must be 2 for binary"):
        MetricStream("binary", 3)
    with pytest.raises(InputError, match=r"no examples yet: call update\(logits, y\)"):
        MetricStream("multiclass", 3).result()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_equal_their_float32_cast(dtype):
    z, y = multiclass_data(5, n=200)
    half = z.to(dtype)
    assert evaluate_stream([(half, y)], "multiclass", 5) == evaluate_stream([(half.float(), y)], "multiclass", 5)


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_metrics_agree_with_the_in_memory_classification_metrics(task):
    z, y = multiclass_data(5) if task == "multiclass" else binary_data()
    ev = evaluate_stream([(z, y)], task, 5 if task == "multiclass" else 2)
    flat, memory = ev.metrics(prefix="val_"), classification_metrics(z, y, task, prefix="val_")
    assert flat["val_accuracy"] == pytest.approx(memory["val_accuracy"], **EXACT)
    assert flat["val_f1"] == pytest.approx(memory["val_f1"], **EXACT)
    assert flat["val_loss"] == pytest.approx(memory["val_loss"], abs=1e-6)
    expected = {"accuracy", "loss", "f1", "precision", "recall", "roc_auc", "ece"}
    expected |= {"top3_accuracy"} if task == "multiclass" else set()
    assert set(flat) == {f"val_{name}" for name in expected}
    if task == "binary":
        assert flat["val_roc_auc"] == pytest.approx(memory["val_roc_auc"], abs=RAW)
    assert json.loads(json.dumps(ev.to_dict()))["n"] == 1500
