"""Test metrics over a large test set: dlkit's MetricStream (batch by batch) vs. scikit-learn on all logits.

1,000,000 examples of 10 classes arrive in batches of 4,096 (logits of a fair classifier: noise plus
a margin on the true class, generated from one seed, so both ways see the same numbers). The
reference keeps every batch, concatenates them and calls scikit-learn (accuracy, macro F1, log
loss, macro one-vs-rest ROC-AUC, top-3 and top-5 accuracy), as a notebook does. Peak memory is the
Python heap's (tracemalloc: numpy and Python objects; torch's temporaries are per batch either way
and not counted). Prints one JSON line: seconds and peak MiB each way, their ratios, and the
largest difference of any metric (the stream's ROC-AUC is binned; the rest must agree to rounding).
"""
from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score, top_k_accuracy_score

from dlkit.evaluate.stream import MetricStream

N, CLASSES, BATCH, SEED = 1_000_000, 10, 4096, 0


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set as (logits, labels) batches, the same every call."""
    gen = torch.Generator().manual_seed(SEED)
    for start in range(0, N, BATCH):
        n = min(BATCH, N - start)
        y = torch.randint(0, CLASSES, (n,), generator=gen)
        logits = torch.randn(n, CLASSES, generator=gen) * 1.5
        logits[torch.arange(n), y] += 2.0
        yield logits, y


def streamed() -> dict[str, float]:
    stream = MetricStream("multiclass", CLASSES)
    for logits, y in batches():
        stream.update(logits, y)
    ev = stream.result()
    return {"accuracy": ev.accuracy, "f1": ev.macro_f1, "log_loss": ev.log_loss, "roc_auc": ev.roc_auc,
            "top3": ev.top_k[3], "top5": ev.top_k[5]}


def in_memory() -> dict[str, float]:
    kept = [(logits.numpy(), y.numpy()) for logits, y in batches()]
    logits = np.concatenate([k[0] for k in kept]).astype(np.float64)
    y = np.concatenate([k[1] for k in kept])
    del kept
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    labels = list(range(CLASSES))
    return {"accuracy": accuracy_score(y, pred), "f1": f1_score(y, pred, average="macro"),
            "log_loss": log_loss(y, probs, labels=labels),
            "roc_auc": roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels),
            "top3": top_k_accuracy_score(y, logits, k=3, labels=labels),
            "top5": top_k_accuracy_score(y, logits, k=5, labels=labels)}


def measured(fn: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float, float]:
    """fn's metrics, its seconds and its peak traced heap in MiB."""
    tracemalloc.start()
    started = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def main() -> None:
    ours, ours_s, ours_mb = measured(streamed)
    ref, ref_s, ref_mb = measured(in_memory)
    diff = {k: abs(ours[k] - ref[k]) for k in ours}
    print(json.dumps({
        "benchmark": "metric_stream", "examples": N, "classes": CLASSES, "batch": BATCH,
        "stream_seconds": round(ours_s, 2), "sklearn_seconds": round(ref_s, 2),
        "speedup": round(ref_s / ours_s, 2),
        "stream_peak_mib": round(ours_mb, 1), "sklearn_peak_mib": round(ref_mb, 1),
        "memory_ratio": round(ref_mb / ours_mb, 1),
        "max_metric_difference": {k: float(f"{v:.2g}") for k, v in diff.items()},
    }))


if __name__ == "__main__":
    main()
