"""CIFAR-10 from a generated archive in the official layout (protocol-2 pickles with bytes keys in
cifar-10-batches-py/ inside a tar.gz): loading, verification before unpickling, and pickles that
try to run code."""
from __future__ import annotations

import io
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.config import DataCfg
from dlkit.data import DataShape, cifar, data_shape, load_data
from dlkit.data.download import RemoteFile, sha256_file
from dlkit.errors import DataError

PER_BATCH = 20
NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _batch(seed: int, label: bytes) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in (np.arange(PER_BATCH) + seed) % 10],
        b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(PER_BATCH)],
    }


def cifar_files(overrides: dict[str, bytes] | None = None) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Pickled batch files as the original was written (protocol 2, bytes keys), and their dicts."""
    dicts = {f"data_batch_{i}": _batch(i, f"training batch {i} of 5".encode()) for i in range(1, 6)}
    dicts["test_batch"] = _batch(9, b"testing batch 1 of 1")
    dicts["batches.meta"] = {b"num_cases_per_batch": PER_BATCH, b"label_names": NAMES, b"num_vis": 3072}
    files = {name: pickle.dumps(d, protocol=2) for name, d in dicts.items()}
    files.update(overrides or {})
    return files, dicts


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _Evil:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


pytestmark = pytest.mark.usefixtures("never_download")


def test_cifar10_loads_from_the_archive_with_the_official_test_split(tmp_path):
    files, dicts = cifar_files()
    write_archive(tmp_path / "d" / "cifar-10-python.tar.gz", files)
    b = load_data(DataCfg(name="cifar10", data_dir=str(tmp_path / "d"), verify=False), seed=0)
    assert len(b.train) + len(b.val) == 5 * PER_BATCH and len(b.val) == 10 and len(b.test) == PER_BATCH
    assert b.classes == [n.decode() for n in NAMES] and b.input_shape == (3, 32, 32)
    test = dicts["test_batch"]
    expected = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float() / 255.0
    assert torch.equal(b.test.x, expected) and b.test.y.tolist() == test[b"labels"]
    assert b.preprocessing["invert"] == "never" and "CIFAR-10" in b.meta["source"]


def test_a_verified_archive_loads_when_its_digest_is_the_known_one(tmp_path, monkeypatch):
    path = write_archive(tmp_path / "cifar-10-python.tar.gz", cifar_files()[0])
    monkeypatch.setattr(cifar, "ARCHIVE", RemoteFile(path.name, sha256_file(path), (), None))
    b = load_data(DataCfg(name="cifar10", data_dir=str(path), channels=1), seed=0)  # the file itself
    assert b.input_shape == (1, 32, 32) and len(b.test) == PER_BATCH
    n_train = 5 * PER_BATCH
    assert b.meta["source"] == (f"CIFAR-10 (Krizhevsky 2009): official python batches from {path}, {n_train} train / "
                                f"{PER_BATCH} test 32x32 RGB images (official test split as test)")
    unverified = load_data(DataCfg(name="cifar10", data_dir=str(path), verify=False), seed=0)
    assert unverified.meta["source"] == (
        f"CIFAR-10 (Krizhevsky 2009): python batches (official format, not verified: data.verify=false) from {path}, "
        f"{n_train} train / {PER_BATCH} test 32x32 RGB images (official test split as test)")


def test_a_tampered_archive_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    files, _ = cifar_files({"test_batch": pickle.dumps(_Evil(sentinel), protocol=2)})
    write_archive(tmp_path / "d" / "cifar-10-python.tar.gz", files)
    calls = []
    monkeypatch.setattr(cifar, "restricted_loads", lambda *a: calls.append(a))
    with pytest.raises(DataError, match=r"sha256 mismatch for cifar-10-python\.tar\.gz .*data\.verify=false"):
        load_data(DataCfg(name="cifar10", data_dir=str(tmp_path / "d")), seed=0)
    assert calls == [] and not sentinel.exists()


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    files, _ = cifar_files({"test_batch": pickle.dumps(_Evil(sentinel), protocol=2)})
    write_archive(tmp_path / "d" / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match=r"test_batch: refused to unpickle (posix|nt|os)\.system") as err:
        load_data(DataCfg(name="cifar10", data_dir=str(tmp_path / "d"), verify=False), seed=0)
    assert not sentinel.exists() and "\n" not in str(err.value)


@pytest.mark.parametrize("payload, refused", [
    (pickle.dumps(eval, protocol=2), "__builtin__.eval"),  # protocol 2 writes Python 2's module name
    (pickle.dumps(tarfile.TarFile, protocol=2), "tarfile.TarFile"),
    (b"\x80\x02cos\nsystem\nq\x00.", "os.system"),
    (b"\x80\x02ccopy_reg\n_reconstructor\nq\x00.", "copy_reg._reconstructor"),
])
def test_the_unpickler_admits_only_what_the_format_needs(payload, refused):
    with pytest.raises(DataError, match=f"x: refused to unpickle {refused}"):
        cifar.restricted_loads(payload, "x")


def test_the_unpickler_reads_arrays_lists_dicts_bytes_and_str():
    obj = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), b"b": [1, 2], b"c": b"", b"d": "s", b"e": {1: 2.5}}
    got = cifar.restricted_loads(pickle.dumps(obj, protocol=2), "x")
    assert np.array_equal(got[b"a"], obj[b"a"]) and got[b"a"].dtype == np.uint8
    assert {k: v for k, v in got.items() if k != b"a"} == {k: v for k, v in obj.items() if k != b"a"}


@pytest.mark.parametrize("payload, message", [
    (b"garbage", "not a readable CIFAR batch"),
    (pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, protocol=2), "no uint8 b'data' array"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "one label per image"),
])
def test_malformed_batches_are_one_line_errors(payload, message):
    with pytest.raises(DataError, match=f"data_batch_1: .*{message}"):
        cifar.parse_batch(payload, "data_batch_1")


def test_an_extracted_folder_needs_verify_off(tmp_path):
    folder = tmp_path / "d" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in cifar_files()[0].items():
        (folder / name).write_bytes(data)
    with pytest.raises(DataError, match="cannot verify an extracted folder; point --data-dir at "
                                        r"cifar-10-python\.tar\.gz or set data\.verify=false"):
        load_data(DataCfg(name="cifar10", data_dir=str(tmp_path / "d")), seed=0)
    for data_dir in (tmp_path / "d", folder):
        b = load_data(DataCfg(name="cifar10", data_dir=str(data_dir), verify=False), seed=0)
        assert len(b.train) + len(b.val) == 5 * PER_BATCH and len(b.test) == PER_BATCH
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3 of the CIFAR-10 layout"):
        load_data(DataCfg(name="cifar10", data_dir=str(folder), verify=False), seed=0)


def test_a_broken_archive_or_one_missing_batches_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cifar-10-python.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: not a readable tar\.gz"):
        load_data(DataCfg(name="cifar10", data_dir=str(tmp_path / "a"), verify=False), seed=0)
    files, _ = cifar_files()
    del files["test_batch"], files["batches.meta"]
    write_archive(tmp_path / "b" / "cifar-10-python.tar.gz", files)
    b_dir = str(tmp_path / "b")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz lacks test_batch"):
        load_data(DataCfg(name="cifar10", data_dir=b_dir, verify=False), seed=0)
    with pytest.raises(DataError, match=r"not found in .*drop --data-dir to download"):
        load_data(DataCfg(name="cifar10", data_dir=str(tmp_path)), seed=0)


def test_missing_meta_falls_back_to_the_standard_names(tmp_path):
    files, _ = cifar_files()
    del files["batches.meta"]
    write_archive(tmp_path / "cifar-10-python.tar.gz", files)
    b = load_data(DataCfg(name="cifar10", data_dir=str(tmp_path), verify=False), seed=0)
    assert b.classes == cifar.CLASSES


def test_shape_is_known_without_files_and_the_table_is_official(tmp_path):
    assert data_shape(DataCfg(name="cifar10")) == DataShape((3, 32, 32), 10, "multiclass")
    assert data_shape(DataCfg(name="cifar10", channels=1, image_size=64)).input_shape == (1, 64, 64)
    assert cifar.ARCHIVE.sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    assert cifar.ARCHIVE.urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    assert not (tmp_path / "xdg").exists()
