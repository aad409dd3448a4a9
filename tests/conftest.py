"""Shared test settings and data: every test runs in its own temporary working folder; MNIST in
its official IDX files, made from real handwritten digits."""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import dlkit
from dlkit.data.mnist_layout import mnist_layout

# Runs skip their report (plots + report.html, about 2 s each) unless a test asks for one with
# run(..., report=True) or `dlkit run --report`; tests/evaluate and the end-to-end tests check it.
os.environ["DLKIT_REPORT"] = "0"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    # runs/ and any other relative output land in the test's own folder
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_cli(capsys):
    """`run_cli(*args)`: `dlkit ARGS` in this process, as (exit code, stdout, stderr) of that call."""
    from dlkit import cli

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()  # what came before this call is not its output
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


MNIST_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def idx_file(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (0x801 labels / 0x803 images), big-endian sizes, bytes."""
    magic = 0x801 if array.ndim == 1 else 0x803
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def digit_images(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Real handwritten digits (sklearn's 8x8 scans) laid out in 28x28 uint8 frames as MNIST's are (the
    ink's box scaled to 20 pixels, centred by mass: dlkit's one `mnist_layout`)."""
    digits = _digits()
    idx = (np.arange(n) + offset) % len(digits.target)
    frames = np.stack([mnist_layout(digits.images[i] / 16.0) for i in idx])
    return np.round(frames * 255).astype(np.uint8), digits.target[idx].astype(np.uint8)


@functools.cache
def _digits():
    return load_digits()


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist")
    x, y = digit_images(1200, 0)
    xt, yt = digit_images(300, 1200)
    for name, arr in zip(MNIST_NAMES, (x, y, xt, yt)):
        idx_file(folder / name, arr)
    return folder


def _by_path(name: str, folder: Path) -> Any:
    """A test helper module loaded from its file (tests run under --import-mode=importlib)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def resume_check():
    """tests/resume_check.py (run stopped at a chosen step, resumed, compared bit for bit), loaded by path."""
    return _by_path("resume_check", Path(__file__).parent)


@pytest.fixture(scope="session")
def known_answer():
    """tests/evaluate/known_answer.py (a pattern anywhere in noise decides the class), loaded by path."""
    return _by_path("known_answer", Path(__file__).parent / "evaluate")


@pytest.fixture(name="digit_images")
def _digit_images():
    """The `digit_images` factory."""
    return digit_images


# ---- runs shared by the serving and tracking tests, trained once: a digit CNN (images), the breast-cancer
# LSTM (table rows) and the tiny text LSTM (texts), one epoch each ----------------------------------------

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
