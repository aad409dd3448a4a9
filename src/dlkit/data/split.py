"""Seeded stratified splits: every class keeps its share of every part to within one example."""
from __future__ import annotations

import numpy as np

_EPS = 1e-9


def part_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """`n` cut in parts proportional to `fractions` (largest remainder; ties to the earlier part)."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    exact = np.asarray(fractions, dtype=np.float64) * n
    sizes = np.floor(exact + _EPS).astype(np.int64)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: n - int(sizes.sum())]] += 1
    return sizes.tolist()


def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Sorted index arrays, one per fraction, stratified by the labels `y` and seeded by `seed`.

    Part sizes are exactly `part_sizes(len(y), fractions)`; each class's count in each part is
    within one of its proportional share. A class with at least as many examples as there are
    non-empty parts gets one in each even where its share is below one (when another class can
    spare the place), which can move that class further than one from its share elsewhere.
    """
    return _split(np.asarray(y), part_sizes(len(y), fractions), seed)


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` examples of `y`, class proportions kept (all of them when n >= len)."""
    y = np.asarray(y)
    if n >= len(y):
        return np.arange(len(y))
    return _split(y, [n, len(y) - n], seed)[0]


def _split(y: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    if len(y) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in sizes]
    classes, inverse = np.unique(y, return_inverse=True)
    class_sizes = np.bincount(inverse.ravel(), minlength=len(classes))
    counts = allocate(class_sizes, np.asarray(sizes, dtype=np.int64))
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse.ravel() == c))
        bounds = np.concatenate([[0], np.cumsum(counts[c])])
        for k in range(len(sizes)):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def allocate(class_sizes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per-class, per-part counts summing to `class_sizes` by row and `sizes` by column.

    Each cell is within one of its proportional share: a controlled rounding, found by moving
    rounded-up units along augmenting paths, then `_top_up` for classes missing from a part.
    """
    exact = np.outer(class_sizes, sizes) / max(int(sizes.sum()), 1)
    counts = np.floor(exact + _EPS).astype(np.int64)
    col_left = sizes - counts.sum(axis=0)
    extra = np.zeros(counts.shape, dtype=bool)
    fractional = exact - counts > _EPS
    anywhere = np.ones_like(fractional)
    for c in range(len(class_sizes)):
        for _ in range(int(class_sizes[c] - counts[c].sum())):
            # rounding up a cell whose share is whole would still be within one; try it only second
            if not _augment(c, extra, col_left, fractional) and not _augment(c, extra, col_left, anywhere):
                free = np.flatnonzero(~extra[c])  # cannot hit every part size: let one part drift
                k = free[np.argmax((exact - counts)[c, free])]
                extra[c, k] = True
    counts += extra
    _top_up(counts, exact, sizes > 0)
    return counts


def _augment(c: int, extra: np.ndarray, col_left: np.ndarray, allowed: np.ndarray) -> bool:
    """Give row `c` one more unit, moving other rows' units along an alternating path if needed."""
    reached_from: dict[int, int] = {}  # column -> row that reached it
    held_by_row: dict[int, int] = {c: -1}  # row -> column it would give up
    frontier = [c]
    while frontier:
        nxt = []
        for r in frontier:
            for k in np.flatnonzero(allowed[r] & ~extra[r]).tolist():
                if k in reached_from:
                    continue
                reached_from[k] = r
                if col_left[k] > 0:
                    col_left[k] -= 1
                    while True:
                        r = reached_from[k]
                        extra[r, k] = True
                        if r == c:
                            return True
                        k = held_by_row[r]
                        extra[r, k] = False
                for r2 in np.flatnonzero(extra[:, k]).tolist():
                    if r2 not in held_by_row:
                        held_by_row[r2] = k
                        nxt.append(r2)
        frontier = nxt
    return False


def _top_up(counts: np.ndarray, exact: np.ndarray, active: np.ndarray) -> None:
    """Give each class one example in every non-empty part when it has enough examples to and
    another class can spare one there (swapped back elsewhere, so part sizes never change)."""
    for c in range(len(counts)):
        if counts[c].sum() < active.sum():
            continue
        for k in np.flatnonzero(active & (counts[c] == 0)):
            swaps = [
                (d, o)
                for d in np.flatnonzero(counts[c] >= 2)
                for o in np.flatnonzero(counts[:, k] >= 2)
            ]
            if not swaps:
                continue

            def worst(swap: tuple[int, int], c: int = c, k: int = k) -> float:
                d, o = swap
                return max(
                    abs(counts[c, d] - 1 - exact[c, d]),
                    abs(counts[o, k] - 1 - exact[o, k]),
                    abs(counts[o, d] + 1 - exact[o, d]),
                )

            d, o = min(swaps, key=worst)
            counts[c, d] -= 1
            counts[c, k] += 1
            counts[o, k] -= 1
            counts[o, d] += 1
