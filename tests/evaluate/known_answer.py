"""The known answer behind the explanation tests (Grad-CAM, attention rollout): 1x32x32 noise images
whose class is *what* a small pattern shows, the pattern placed anywhere, so a map that explains a
trained model must peak on the pattern. Loaded by path through the `known_answer` fixture (tests run
under --import-mode=importlib)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH = 6  # the pattern's side


def patterns(k: int) -> Tensor:
    """The first k of four 6x6 patterns, one a class: horizontal stripes, vertical stripes, a checkerboard,
    a diagonal band."""
    i = torch.arange(PATCH)
    lines = (i % 2 == 0).float()
    return torch.stack([lines[:, None].expand(PATCH, PATCH), lines[None, :].expand(PATCH, PATCH),
                        ((i[:, None] + i) % 2 == 0).float(), ((i[:, None] - i).abs() <= 1).float()])[:k]


def patterned(n: int, generator: torch.Generator, shapes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """n noise images, each with one of `shapes` anywhere: images, labels, each pattern's top-left corner."""
    y = torch.randint(0, len(shapes), (n,), generator=generator)
    x = torch.rand(n, 1, 32, 32, generator=generator) * 0.3
    corners = torch.randint(0, 32 - PATCH + 1, (n, 2), generator=generator)
    for k, (row, col) in enumerate(corners.tolist()):
        x[k, 0, row:row + PATCH, col:col + PATCH] = shapes[y[k]]
    return x, y, corners


def peaks_inside(heatmaps: Tensor, corners: Tensor) -> Tensor:
    """Per image: whether the heat map's hottest pixel lies inside the pattern at `corners`."""
    flat = heatmaps.flatten(1).argmax(1)
    row, col = flat // heatmaps.shape[2], flat % heatmaps.shape[2]
    top, left = corners[:, 0], corners[:, 1]
    return (row >= top) & (row < top + PATCH) & (col >= left) & (col < left + PATCH)


@dataclass
class Learned:
    """A model trained on patterned images, and the images it is judged on."""

    model: nn.Module
    x: Tensor
    y: Tensor
    corners: Tensor
    untrained: float  # the share of maps peaking on the pattern before training
    accuracy: float  # after training, on x


def learn(make: Callable[[], nn.Module], classes: int, maps: Callable[[nn.Module, Tensor], Tensor], *,
          examples: int, steps: int, lr: float) -> Learned:
    """A model made by `make` (seeded) trained to tell `classes` patterns apart (Adam, batches of 32 fresh
    images); `maps` gives its heat maps (N, H, W), measured once before training too."""
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model = make()
    shapes = patterns(classes)
    x, y, corners = patterned(examples, data, shapes)
    untrained = peaks_inside(maps(model, x), corners).float().mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        xb, yb, _ = patterned(32, data, shapes)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return Learned(model, x, y, corners, untrained, accuracy)
