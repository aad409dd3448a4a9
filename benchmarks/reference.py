"""The plain PyTorch training loop every benchmark measures dlkit against."""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F


def plain_loop_seconds(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer) -> float:
    """One fp32 epoch the way a notebook writes it (zero_grad, forward, CE, backward, step); seconds."""
    model.train()
    start = time.perf_counter()
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return time.perf_counter() - start
