"""Tables of numeric features: sklearn's breast cancer set and the user's own CSV files."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlkit.config import DataCfg
from dlkit.data import register_dataset
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.data.inputs import csv_records
from dlkit.data.preprocess import TablePrep
from dlkit.data.split import stratified_split, stratified_subset
from dlkit.errors import DataError

CSV_HINT = "pass --data PATH to a CSV with a header row and the label in the last column"


@register_dataset("breast_cancer", description="scikit-learn's Wisconsin diagnostic breast cancer table (569 rows, 30 features)")
def load_breast_cancer_bundle(cfg: DataCfg, seed: int) -> DataBundle:
    """Breast Cancer Wisconsin (569 x 30); class 0 "malignant", 1 "benign", as sklearn codes them."""
    from sklearn.datasets import load_breast_cancer  # here, not at import: `dlkit describe` needs no scikit-learn

    data = load_breast_cancer()
    source = "scikit-learn load_breast_cancer: Breast Cancer Wisconsin (Diagnostic), 569 x 30"
    return table_bundle(
        data.data, data.target, list(data.target_names), list(data.feature_names), cfg, seed, source
    )


@register_dataset("csv_table", description="your table: a CSV with a header row, the label last (--data FILE.csv)")
def load_csv_table(cfg: DataCfg, seed: int) -> DataBundle:
    """A CSV at `cfg.path`: a header row, numeric feature columns, and the label in the LAST column.

    Classes are the label column's distinct values, sorted (numerically when all are numbers).
    """
    if cfg.path is None:
        raise DataError(f"data set csv_table needs a file; {CSV_HINT}")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {cfg.path} not found; {CSV_HINT}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {cfg.path} cannot be read as UTF-8 text ({exc}); {CSV_HINT}") from None
    try:
        rows = csv_records(text)
    except ValueError as exc:
        raise DataError(f"data file {cfg.path}: {exc}; {CSV_HINT}") from None
    if len(rows) < 2:
        raise DataError(f"data file {cfg.path} is empty or has only a header; {CSV_HINT}")
    header = [c.strip() for c in rows[0][1]]
    if len(header) < 2:
        raise DataError(f"data file {cfg.path} has {len(header)} column; {CSV_HINT}")
    features, labels = [], []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(
                f"data file {cfg.path}: line {line} has {len(row)} values but the header has {len(header)}"
            )
        features.append([_number(cell, cfg.path, line, name) for cell, name in zip(row[:-1], header)])
        labels.append(row[-1].strip())
    classes = sorted(set(labels), key=_label_key(labels))
    if len(classes) < 2:
        raise DataError(
            f"data file {cfg.path}: the label column '{header[-1]}' holds one class ('{classes[0]}'); "
            "classifying needs 2 or more (the label is the last column)"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    source = f"CSV file {path.name}: {len(y)} rows, {len(header) - 1} features, label column '{header[-1]}'"
    return table_bundle(np.array(features), y, classes, header[:-1], cfg, seed, source)


def table_bundle(
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    feature_names: list[str],
    cfg: DataCfg,
    seed: int,
    source: str,
) -> DataBundle:
    """A DataBundle from rows (N, F) and integer labels: split, subset and scale by train statistics.

    `normalize`: "standard" -> (x - mean) / std, "scale" -> min-max to the train range, "none" -> raw.
    Two classes make a binary task (y float 0/1); more make a multiclass one (y int64).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64).ravel()
    if len(classes) < 2:
        raise DataError(f"data set '{cfg.name}' has {len(classes)} class; classifying needs 2 or more")
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise DataError(f"data set '{cfg.name}': {len(feature_names)} feature names for x of {x.shape}")
    if cfg.test_split <= 0:
        raise DataError(f"data set '{cfg.name}' has no official test split; set data.test_split > 0")
    fractions = (1.0 - cfg.val_split - cfg.test_split, cfg.val_split, cfg.test_split)
    tr, va, te = stratified_split(y, fractions, seed)
    if cfg.subset is not None:
        tr = tr[stratified_subset(y[tr], cfg.subset, seed)]
    prep = _fit_prep(x[tr], list(feature_names), cfg.normalize)
    binary = len(classes) == 2
    splits = {}
    for name, idx in (("train", tr), ("val", va), ("test", te)):
        labels = torch.from_numpy(y[idx].copy())
        features = prep.apply(torch.from_numpy(x[idx]).float())
        splits[name] = TensorSplit(features, labels.float() if binary else labels.long())
    counts = {name: s.class_counts(len(classes)) for name, s in splits.items()}
    return DataBundle(
        train=splits["train"],
        val=splits["val"] if len(splits["val"]) else None,
        test=splits["test"],
        classes=list(classes),
        input_shape=(x.shape[1],),
        task="binary" if binary else "multiclass",
        input_kind="tabular",
        preprocessing=prep.to_dict(),
        meta={"source": source, "class_counts": counts, "seed": seed},
    )


def _fit_prep(x_train: np.ndarray, names: list[str], normalize: str) -> TablePrep:
    """The scaling spec fitted on the training rows only (a constant column divides by 1)."""
    if normalize == "none":
        return TablePrep(names, None, None, method="none")
    if normalize == "imagenet":
        raise DataError("data.normalize=imagenet is for images; use standard, scale or none for a table")
    if normalize == "scale":
        lo, hi = x_train.min(axis=0), x_train.max(axis=0)
        return TablePrep(names, lo.tolist(), (hi - lo).tolist(), method="minmax")
    return TablePrep(names, x_train.mean(axis=0).tolist(), x_train.std(axis=0).tolist())


def _number(cell: str, path: str, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(
            f"data file {path}: line {line}, column '{column}' holds '{cell.strip()}', not a number; "
            "feature columns must be numeric (the label is the last column)"
        )
    return value


def _label_key(labels: list[str]) -> Callable[[str], Any]:
    """Sort labels numerically when every one is a number, else as text."""
    try:
        [float(label) for label in labels]
    except ValueError:
        return str
    return float


@register_dataset("celsius", description="generated Celsius -> Fahrenheit pairs with noise (S2.1)")
def load_celsius(cfg: DataCfg, seed: int) -> DataBundle:
    """S2.1's 160 generated (Celsius, Fahrenheit) pairs, f = 1.8 c + 32 + N(0, 1), split at random
    (seeded) into train / val / test by `val_split` and `test_split`; inputs are raw degrees."""
    from dlkit.synthetic import celsius_pairs

    c, f = celsius_pairs(n=cfg.subset or 160, seed=seed)
    order = np.random.default_rng(seed).permutation(len(c))
    n_test, n_val = round(len(c) * cfg.test_split), round(len(c) * cfg.val_split)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    splits = {k: TensorSplit(torch.tensor(c[i, None], dtype=torch.float32), torch.tensor(f[i], dtype=torch.float32))
              for k, i in parts.items()}
    return DataBundle(splits["train"], splits["val"] if n_val else None, splits["test"], [], (1,), "regression",
                      "tabular", TablePrep(["celsius"], None, None, method="none").to_dict(),
                      meta={"source": "generated: f = 1.8 c + 32 + N(0, 1), c uniform in [-40, 60]", "seed": seed})


@register_dataset("two_moons", description="generated two interleaved half circles (S2.2)")
def load_two_moons(cfg: DataCfg, seed: int) -> DataBundle:
    """Two interleaving half circles (500 points, noise 0.2), generated with NumPy: a small set a
    straight line cannot separate, for the from-scratch network."""
    from dlkit.synthetic import two_moons

    x, y = two_moons(n=cfg.subset or 500, noise=0.2, seed=seed)
    return table_bundle(x, y, ["upper", "lower"], ["x1", "x2"], cfg.model_copy(update={"subset": None}), seed,
                        "generated: two moons, 500 points, noise 0.2")
