"""The test split run through a trained model once: streamed metrics, each example's prediction, and
the model's latency per example. `dlkit run`, `dlkit evaluate` and the report all test this way, so
their numbers agree.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dlkit.data import DataBundle
from dlkit.data.bundle import TensorSplit
from dlkit.engine.loop import predict_split
from dlkit.engine.runtime import eval_mode, model_device
from dlkit.evaluate.metrics import classification_metrics, probabilities
from dlkit.evaluate.stream import Evaluation, MetricStream

# Latency: LATENCY_WARMUP untimed single-example passes (oneDNN builds its kernels for batch 1 on the
# first ones), then at least LATENCY_MIN_REPEATS timed passes whatever they cost, and more up to
# LATENCY_REPEATS while within LATENCY_BUDGET_S. Under load a 2 s budget once left a single timed
# pass (3,040 ms in a report, 161 ms from `evaluate` on the same run); the median of nine or more
# is robust to such a pass, and p10 / p90 show the spread.
LATENCY_WARMUP = 5
LATENCY_MIN_REPEATS = 9
LATENCY_REPEATS = 50
LATENCY_BUDGET_S = 2.0

@dataclass
class TestPredictions:
    """The test split's metrics, with each example's predicted class and that class's probability."""

    __test__ = False  # a library class, not a pytest test class, whatever its name
    evaluation: Evaluation
    predicted: np.ndarray
    confidence: np.ndarray


@torch.no_grad()
def predict_test(model: nn.Module, data: DataBundle, batch_size: int = 512,
                 outputs: torch.Tensor | None = None) -> TestPredictions:
    """Metrics and predictions over the test split, batch by batch, the model in fp32 eval mode
    (`outputs`: the model's outputs for the test split, computed already by many processes).

    A class missing from the test split leaves its ROC-AUC undefined (None); `evaluation_notes` says so
    in words, instead of the stream's warning."""
    stream = MetricStream(data.task, len(data.classes))
    device = model_device(model)
    predicted, confidence = [], []
    with eval_mode(model):
        for start, (xb, yb) in zip(range(0, len(data.test), batch_size), data.test.batches(batch_size)):
            if outputs is None:
                logits = model(xb.to(device)).float().cpu()
            else:
                logits = outputs[start : start + batch_size]
            stream.update(logits, yb.cpu())
            conf, pred = probabilities(logits, data.task).max(1)
            predicted.append(pred.numpy())
            confidence.append(conf.numpy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="roc_auc is undefined")
        evaluation = stream.result()
    return TestPredictions(evaluation, np.concatenate(predicted), np.concatenate(confidence))


def evaluation_notes(predictions: TestPredictions | None, classes: list[str]) -> list[str]:
    """Run notes about the test: the classes whose ROC-AUC is undefined (no test examples of them, or only them)."""
    if predictions is None:
        return []
    names = {"positive": classes[-1]} | {str(i): c for i, c in enumerate(classes)}
    missing = [names[k] for k, curve in predictions.evaluation.roc.items() if k != "macro" and curve["auc"] is None]
    if not missing:
        return []
    return [f"ROC-AUC undefined for class {', '.join(missing)}: the test split lacks its positive or negative "
            "examples, so test_roc_auc is left out"]


def measure_test(model: nn.Module, data: DataBundle, batch_size: int = 512,
                 outputs: torch.Tensor | None = None) -> tuple[dict[str, Any], TestPredictions | None]:
    """The `test_*` metrics and the latency (`latency_ms`, its p10 / p90) a run adds to summary.json, and (classification) the
    predictions behind them.

    Classification: accuracy, log loss, macro precision / recall / F1, ROC-AUC (binary, or the
    macro one-vs-rest mean), top-3 / top-5 accuracy where there are more classes, ECE.
    Regression: MSE, MAE, R2.
    """
    if data.task == "regression":
        logits = outputs if outputs is not None else predict_split(model, data.test, device=model_device(model),
                                                                   batch_size=batch_size)
        metrics, predictions = classification_metrics(logits, data.test.y, data.task), None
    else:
        predictions = predict_test(model, data, batch_size, outputs)
        metrics = predictions.evaluation.metrics("test_")
    return metrics | (latency_stats(model, data.test) or {"latency_ms": None}), predictions


def latency_ms(model: nn.Module, split: TensorSplit) -> float | None:
    """Median milliseconds of one forward pass on a single example (see `latency_stats`)."""
    stats = latency_stats(model, split)
    return None if stats is None else stats["latency_ms"]


@torch.no_grad()
def latency_stats(model: nn.Module, split: TensorSplit,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float | int] | None:
    """Milliseconds of one forward pass on a single example (fp32, eval mode, the model's device):
    `latency_ms` (the median), `latency_ms_p10`, `latency_ms_p90` and `latency_passes`.

    Serving answers one request at a time, so this is the number a user waits for; None for an
    empty split. A CUDA device is synchronised around each pass so the time is the kernel's, not
    the launch's. `clock` is for tests.
    """
    if len(split) == 0:
        return None
    device = model_device(model)
    x = next(split.batches(1))[0].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    with eval_mode(model):
        for _ in range(LATENCY_WARMUP):
            model(x)
        started = clock()
        while len(times) < LATENCY_MIN_REPEATS or (
                len(times) < LATENCY_REPEATS and clock() - started < LATENCY_BUDGET_S):
            sync()
            t = clock()
            model(x)
            sync()
            times.append(clock() - t)
    p10, p50, p90 = np.percentile(np.array(times) * 1000, [10, 50, 90])
    return {"latency_ms": round(float(p50), 4), "latency_ms_p10": round(float(p10), 4),
            "latency_ms_p90": round(float(p90), 4), "latency_passes": len(times)}
