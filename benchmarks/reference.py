"""The plain PyTorch training loop every benchmark measures dlkit against."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def plain_loop_seconds(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                       loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> float:
    """One fp32 epoch the way a notebook writes it (zero_grad, forward, loss, backward, step); seconds."""
    model.train()
    start = time.perf_counter()
    for xb, yb in loader:
        optimizer.zero_grad()
        loss(model(xb), yb).backward()
        optimizer.step()
    return time.perf_counter() - start
