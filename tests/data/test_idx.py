"""MNIST / Fashion-MNIST from generated IDX files in the official layout: parsing by header, every
kind of broken file as a one-line DataError, and the bundle a recipe gets."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.config import DataCfg
from dlkit.data import DataShape, data_shape, load_data
from dlkit.data.idx import FASHION_CLASSES, FILES, IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_pair
from dlkit.errors import DataError

N_TRAIN, N_TEST = 50, 20


def _idx_bytes(magic: int, arr: np.ndarray, dims: tuple[int, ...] | None = None) -> bytes:
    dims = arr.shape if dims is None else dims
    return struct.pack(f">I{len(dims)}I", magic, *dims) + arr.astype(np.uint8).tobytes()


def _images(n: int, seed: int) -> np.ndarray:
    """Random 28x28 'ink' with a dark 4-pixel border, as in MNIST (so invert="auto" keeps them)."""
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    x[:, 4:24, 4:24] = np.random.default_rng(seed).integers(0, 256, (n, 20, 20))
    return x


def write_idx_set(folder: Path) -> dict[str, np.ndarray]:
    """The four official files with small, known contents; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": _images(N_TRAIN, 1),
        "train-labels-idx1-ubyte.gz": np.arange(N_TRAIN) % 10,
        "t10k-images-idx3-ubyte.gz": _images(N_TEST, 2),
        "t10k-labels-idx1-ubyte.gz": (np.arange(N_TEST) * 3) % 10,
    }
    for name, arr in arrays.items():
        magic = IMAGES_MAGIC if "images" in name else LABELS_MAGIC
        (folder / name).write_bytes(gzip.compress(_idx_bytes(magic, arr)))
    return arrays


pytestmark = pytest.mark.usefixtures("never_download")


def test_read_idx_takes_sizes_from_the_header(tmp_path):
    x = np.arange(3 * 5 * 7).reshape(3, 5, 7)
    (tmp_path / "i.gz").write_bytes(gzip.compress(_idx_bytes(IMAGES_MAGIC, x)))
    got = read_idx(tmp_path / "i.gz", IMAGES_MAGIC)
    assert got.dtype == np.uint8 and got.shape == (3, 5, 7) and np.array_equal(got, x)


def _broken(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, message", [
    (gzip.compress(_idx_bytes(LABELS_MAGIC, np.zeros(4))), r"magic number 0x00000801, expected 0x00000803"),
    (gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((2, 4, 4)))[:-5]), r"truncated, payload .* ends after 27"),
    (gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((2, 4, 4)), dims=(3, 4, 4))), r"truncated"),
    (gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((2, 4, 4)), dims=(1, 4, 4))), r"more data than its header"),
    (gzip.compress(b"\x00\x00"), r"truncated, header ends after 2 of 4 bytes"),
    (gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((1, 1, 1)), dims=(70000, 70000, 70000))), r"header claims"),
    (b"this is not gzip at all", r"not a readable gzip file"),
    (gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((2, 4, 4))))[:-12], r"not a readable gzip file"),
])
def test_broken_files_are_one_line_errors_naming_the_file(tmp_path, data, message):
    path = _broken(tmp_path, "train-images-idx3-ubyte.gz", data)
    with pytest.raises(DataError, match=message) as err:
        read_idx(path, IMAGES_MAGIC)
    assert str(err.value).startswith("train-images-idx3-ubyte.gz: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("dims, message", [
    # 2^22 * 2^22 * 2^20 = 2^64: np.prod in int64 wraps it to 0, and np.empty then fails with a traceback
    ((1 << 22, 1 << 22, 1 << 20), "header claims (4194304, 4194304, 1048576) = 18,446,744,073,709,551,616 bytes, "
                                  "more than the 2,147,483,648 any IDX data set holds; it is corrupt, download it again"),
    ((0, 28, 28), "header claims (0, 28, 28), an empty data set; it is corrupt, download it again"),
    ((5, 0, 28), "header claims (5, 0, 28), an empty data set; it is corrupt, download it again"),
])
def test_headers_that_overflow_or_hold_nothing_are_refused_before_allocating(tmp_path, dims, message):
    path = _broken(tmp_path, "t.gz", gzip.compress(struct.pack(">4I", IMAGES_MAGIC, *dims)))
    with pytest.raises(DataError) as err:
        read_idx(path, IMAGES_MAGIC)
    assert str(err.value) == f"t.gz: {message}"


def test_image_and_label_counts_must_agree(tmp_path):
    images = _broken(tmp_path, "i.gz", gzip.compress(_idx_bytes(IMAGES_MAGIC, np.zeros((3, 2, 2)))))
    labels = _broken(tmp_path, "l.gz", gzip.compress(_idx_bytes(LABELS_MAGIC, np.zeros(4))))
    with pytest.raises(DataError, match=r"i\.gz holds 3 images but l\.gz holds 4 labels"):
        read_pair(images, labels, 10)
    labels = _broken(tmp_path, "l.gz", gzip.compress(_idx_bytes(LABELS_MAGIC, np.array([0, 1, 12]))))
    with pytest.raises(DataError, match=r"l\.gz: label 12 is outside 0\.\.9"):
        read_pair(images, labels, 10)


def test_mnist_loads_with_the_official_test_split_as_test(tmp_path):
    arrays = write_idx_set(tmp_path / "mnist")
    b = load_data(DataCfg(name="mnist", data_dir=str(tmp_path / "mnist"), verify=False), seed=0)
    assert len(b.train) == 45 and len(b.val) == 5 and len(b.test) == N_TEST  # val_split 0.1 of 50
    assert b.classes == [str(i) for i in range(10)] and b.input_shape == (1, 28, 28)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]).float()[:, None] / 255.0
    assert torch.equal(b.test.x, expected)
    assert b.test.y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert sorted(b.train.y.tolist() + b.val.y.tolist()) == sorted(arrays["train-labels-idx1-ubyte.gz"].tolist())
    assert b.preprocessing["invert"] == "auto" and "MNIST" in b.meta["source"]


def test_fashion_mnist_has_its_ten_names_and_channels_follow_the_recipe(tmp_path):
    write_idx_set(tmp_path / "f")
    cfg = DataCfg(name="fashion_mnist", data_dir=str(tmp_path / "f"), verify=False, channels=3, image_size=32)
    b = load_data(cfg, seed=0)
    assert b.classes == FASHION_CLASSES and b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    assert b.train.x.shape[1:] == (3, 32, 32) and b.input_shape == (3, 32, 32)
    assert torch.equal(b.train.x[:, 0], b.train.x[:, 2])  # grey copied to three channels
    assert data_shape(cfg) == DataShape((3, 32, 32), 10, "multiclass")


def test_the_source_says_official_only_when_the_digests_were_checked(tmp_path, monkeypatch):
    from dlkit.data import idx
    from dlkit.data.download import RemoteFile, sha256_file

    write_idx_set(tmp_path / "m")
    checked = tuple(RemoteFile(r.name, sha256_file(tmp_path / "m" / r.name), r.urls) for r in FILES["mnist"])
    monkeypatch.setitem(idx.FILES, "mnist", checked)
    tail = f" in {tmp_path / 'm'}, 50 train / {N_TEST} test images of 28x28 (official test split as test)"
    verified = load_data(DataCfg(name="mnist", data_dir=str(tmp_path / "m")), seed=0)
    assert verified.meta["source"] == "MNIST (LeCun, Cortes, Burges): official IDX files" + tail
    unverified = load_data(DataCfg(name="mnist", data_dir=str(tmp_path / "m"), verify=False), seed=0)
    assert unverified.meta["source"] == (
        "MNIST (LeCun, Cortes, Burges): IDX files (official format, not verified: data.verify=false)" + tail)


def test_verify_rejects_files_that_are_not_the_official_ones(tmp_path):
    write_idx_set(tmp_path / "m")
    with pytest.raises(DataError, match=r"sha256 mismatch for train-images-idx3-ubyte\.gz .*data\.verify=false"):
        load_data(DataCfg(name="mnist", data_dir=str(tmp_path / "m")), seed=0)


def test_missing_files_are_named_with_the_folder(tmp_path):
    write_idx_set(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=rf"mnist: t10k-labels-idx1-ubyte\.gz not found in {tmp_path / 'm'}"):
        load_data(DataCfg(name="mnist", data_dir=str(tmp_path / "m"), verify=False), seed=0)


def test_shapes_are_known_without_any_file(tmp_path):
    assert data_shape(DataCfg(name="mnist")) == DataShape((1, 28, 28), 10, "multiclass")
    assert data_shape(DataCfg(name="fashion_mnist", channels=3)) == DataShape((3, 28, 28), 10, "multiclass")
    assert data_shape(DataCfg(name="mnist", image_size=32)).input_shape == (1, 32, 32)
    assert not (tmp_path / "xdg").exists()


def test_the_tables_hold_the_official_names_digests_and_mirrors():
    for name in ("mnist", "fashion_mnist"):
        assert [r.name for r in FILES[name]] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
        assert all(len(r.sha256) == 64 and r.urls[0].endswith(r.name) for r in FILES[name])
    assert FILES["mnist"][0].sha256.startswith("440fcabf") and FILES["fashion_mnist"][0].sha256.startswith("3aede38d")
    assert FILES["mnist"][0].urls[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert FILES["mnist"][0].urls[1].startswith("https://storage.googleapis.com/cvdf-datasets/mnist/")


def test_fashion_mnist_and_imdb_have_a_second_source_for_the_same_bytes():
    from dlkit.data import imdb

    for remote in FILES["fashion_mnist"]:
        assert remote.urls == (f"https://storage.googleapis.com/tensorflow/tf-keras-datasets/{remote.name}",
                               f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{remote.name}")
    assert imdb.ARCHIVE.urls == ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                                 "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz")
