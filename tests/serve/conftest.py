"""Runs the serving tests share, trained once: a digit CNN (images), the breast-cancer LSTM (table rows)
and the tiny text LSTM (texts), one epoch each."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dlkit


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: dlkit.run(name, epochs=1, out=root / name, quiet=True, report=False).run_dir
            for name in ("digits-cnn", "breast-cancer-lstm", "tiny-text-lstm")}


@pytest.fixture(scope="session")
def digit_files(tmp_path_factory, runs) -> list[Path]:
    """Six real handwritten digits (sklearn's scans) as PNG pages, dark ink on white, at 56x56."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    files = []
    for i in range(6):
        page = 255 - np.kron(digits.images[i] / 16 * 255, np.ones((7, 7))).astype(np.uint8)
        path = folder / f"digit{i}.png"
        Image.fromarray(page).save(path)
        files.append(path)
    return files
