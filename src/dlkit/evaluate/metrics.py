"""Test-set metrics from a model's outputs, computed with scikit-learn."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score, roc_auc_score
from torch import Tensor

from dlkit.data.bundle import Task


def probabilities(logits: Tensor, task: Task) -> Tensor:
    """Class probabilities from logits: softmax, or (1 - p, p) from one sigmoid logit."""
    if task == "binary":
        p = torch.sigmoid(logits.reshape(-1).float())
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


def log_loss(logits: Tensor, y: Tensor, task: Task) -> float:
    """Mean cross-entropy of the true class: softmax over classes, or a sigmoid on one logit."""
    if task == "binary":
        return float(F.binary_cross_entropy_with_logits(logits.float().reshape(-1), y.reshape(-1).float()))
    return float(F.cross_entropy(logits.float(), y.long()))


def classification_metrics(logits: Tensor, y: Tensor, task: Task, prefix: str = "test_") -> dict[str, float]:
    """Loss, accuracy, macro F1 and (binary) ROC-AUC; MSE, MAE and R2 for regression."""
    if task == "regression":
        pred, true = logits.reshape(-1).numpy(), y.reshape(-1).float().numpy()
        return {f"{prefix}mse": float(np.mean((pred - true) ** 2)), f"{prefix}mae": float(mean_absolute_error(true, pred)),
                f"{prefix}r2": float(r2_score(true, pred))}
    probs = probabilities(logits, task).numpy()
    true = y.reshape(-1).long().numpy()
    pred = probs.argmax(1)
    labels = list(range(probs.shape[1]))
    out = {
        f"{prefix}accuracy": float(accuracy_score(true, pred)),
        f"{prefix}f1": float(f1_score(true, pred, average="macro", labels=labels, zero_division=0)),
        f"{prefix}loss": log_loss(logits, y, task),
    }
    if task == "binary" and len(np.unique(true)) == 2:
        out[f"{prefix}roc_auc"] = float(roc_auc_score(true, probs[:, 1]))
    return out
