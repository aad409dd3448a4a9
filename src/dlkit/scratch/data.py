"""Tiny data sets made with NumPy alone, for the from-scratch models, and the helpers that split and
encode them. The generators live in `dlkit.synthetic` (the data sets use them too) and are re-exported here.

Every function takes a seed, so the same call always gives the same numbers.
Features are float64; class labels are int64.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dlkit.synthetic import FloatArray, IntArray, celsius_pairs, two_moons, xor

__all__ = ["FloatArray", "IntArray", "celsius_pairs", "one_hot", "train_test_split", "two_moons", "xor"]


def train_test_split(
    x: NDArray, y: NDArray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Return (x_train, x_test, y_train, y_test), the same order as scikit-learn.

    A seeded random permutation of the rows; the last round(n * test_fraction) rows go to test.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
    n = len(x)
    n_test = int(round(n * test_fraction))
    order = np.random.default_rng(seed).permutation(n)
    train_rows, test_rows = order[: n - n_test], order[n - n_test :]
    return x[train_rows], x[test_rows], y[train_rows], y[test_rows]


def one_hot(y: NDArray, k: int) -> FloatArray:
    """Return an (n, k) float64 matrix with a 1 in column y[i] of row i and 0 elsewhere."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"one_hot wants a 1-D array of class indices, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"class indices must lie in [0, {k}), got {y.min()}..{y.max()}")
    encoded = np.zeros((len(y), k), dtype=np.float64)
    encoded[np.arange(len(y)), y] = 1.0
    return encoded
