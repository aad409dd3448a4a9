"""Learnable generated data for benchmarks: handwritten digits jittered into MNIST-sized images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def digit_images(n: int, size: int = 28, seed: int = 0, part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (n, 1, size, size) in [0, 1] with labels, drawn from one half of sklearn's digits.

    Train and test draw from disjoint halves of the 1,797 scans, so test accuracy measures
    generalisation; random shifts and noise make every generated image different.
    """
    digits = load_digits()
    half = len(digits.target) // 2
    lo, hi = (0, half) if part == "train" else (half, len(digits.target))
    base = torch.tensor(digits.images[lo:hi], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target[lo:hi], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(base), (n,), generator=g)
    inner = size - 8
    x = F.interpolate(base[pick], size=(inner, inner), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    for dy in range(-3, 4):  # roll each group of images by its shift
        for dx in range(-3, 4):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp_(0, 1)
    return x, labels[pick]
