"""Small seeded data sets generated with NumPy alone: S2.1's Celsius/Fahrenheit pairs, two moons, XOR.

The lowest layer (NumPy only, no torch), so both the data sets (`dlkit.data.tabular`) and the
from-scratch models (`dlkit.scratch`) use them. Features are float64; class labels are int64.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def celsius_pairs(
    n: int = 160,
    seed: int = 0,
    noise: float = 1.0,
    low: float = -40.0,
    high: float = 60.0,
) -> tuple[FloatArray, FloatArray]:
    """Return (celsius, fahrenheit), two 1-D arrays of length n.

    Celsius is uniform in [low, high]; fahrenheit = 1.8 * celsius + 32 + N(0, noise^2),
    so a perfect model has weight 1.8 and bias 32 and a mean squared error near noise^2.
    """
    rng = np.random.default_rng(seed)
    celsius = rng.uniform(low, high, size=n)
    fahrenheit = 1.8 * celsius + 32.0 + rng.normal(0.0, noise, size=n)
    return celsius, fahrenheit


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0) -> tuple[FloatArray, IntArray]:
    """Return (x, y): two interleaving half circles in 2-D, labels 0 (upper) and 1 (lower).

    The same maths as scikit-learn's make_moons: the upper moon is (cos t, sin t) and the
    lower moon is (1 - cos t, 0.5 - sin t) for t evenly spaced in [0, pi], plus N(0, noise^2).
    """
    rng = np.random.default_rng(seed)
    n_upper = n // 2
    n_lower = n - n_upper
    t_upper = np.linspace(0.0, np.pi, n_upper)
    t_lower = np.linspace(0.0, np.pi, n_lower)
    upper = np.stack([np.cos(t_upper), np.sin(t_upper)], axis=1)
    lower = np.stack([1.0 - np.cos(t_lower), 0.5 - np.sin(t_lower)], axis=1)
    x = np.concatenate([upper, lower]) + rng.normal(0.0, noise, size=(n, 2))
    y = np.concatenate([np.zeros(n_upper, dtype=np.int64), np.ones(n_lower, dtype=np.int64)])
    order = rng.permutation(n)
    return x[order], y[order]


def xor(n: int = 200, noise: float = 0.1, seed: int = 0) -> tuple[FloatArray, IntArray]:
    """Return (x, y): points around the four corners of the unit square; y = x0_bit XOR x1_bit.

    Each point picks a corner (a, b) with a, b in {0, 1}, sits at (a, b) + N(0, noise^2), and
    has label a XOR b, a set no straight line can separate.
    """
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 2, size=(n, 2))
    x = corners.astype(np.float64) + rng.normal(0.0, noise, size=(n, 2))
    y = (corners[:, 0] ^ corners[:, 1]).astype(np.int64)
    return x, y
