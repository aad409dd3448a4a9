"""CIFAR-10 from the official python archive: pickled batches, read only after the archive's sha256
matched and only through an unpickler that can build nothing but arrays, lists, dicts and strings."""
from __future__ import annotations

import builtins
import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dlkit.config import DataCfg
from dlkit.data import DataShape, register_dataset
from dlkit.data.bundle import DataBundle
from dlkit.data.download import RemoteFile, locate
from dlkit.data.vision import image_bundle
from dlkit.errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH, META = "test_batch", "batches.meta"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_PIXELS = 3 * 32 * 32
# a batch file is 10,000 images of 3,072 bytes in a pickle, about 31 MB; twice that is not a CIFAR batch.
# Checked against a tar member's declared size (and a file's size) before reading, so a small archive
# whose member inflates to gigabytes costs nothing; 7 files of at most 64 MiB bound the whole read.
MAX_BATCH_BYTES = 64 << 20
_MAX_MEMBERS = 1000  # the official archive has 9 (the folder, 5 train batches, test, meta, readme)

# sha256 of the official archive (Keras' get_file uses the same; torchvision checks md5 c58f3010...)
ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz",
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    170498071,
)

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, whatever module it lives in this version
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1 and the original Python 2 files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes from Python 3
    # plain containers, under their Python 3 and Python 2 module names
    **{(mod, name): getattr(builtins, name)
       for mod in ("builtins", "__builtin__") for name in ("bytes", "str", "list", "dict")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: any global but numpy's array pieces and plain containers is refused."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for (module, name); anything else is a DataError naming it."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refused to unpickle {module}.{name}: a CIFAR batch holds only arrays, lists and strings; "
                "the file is not the official one, download it again"
            ) from None


def restricted_loads(data: bytes, origin: str) -> Any:
    """Unpickle `data` (bytes keys, as the Python 2 files were written) with RestrictedUnpickler."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{origin}: {exc}") from None
    except Exception as exc:  # a corrupt pickle can fail in many ways; each is "not a CIFAR batch"
        raise DataError(f"{origin}: not a readable CIFAR batch ({type(exc).__name__}); download it again") from None


def parse_batch(data: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled batch."""
    batch = restricted_loads(data, origin)
    x = batch.get(b"data") if isinstance(batch, dict) else None
    y = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != _PIXELS:
        raise DataError(f"{origin}: no uint8 b'data' array of N x {_PIXELS} pixels; download it again")
    if not isinstance(y, list) or len(y) != len(x):
        raise DataError(f"{origin}: b'labels' does not list one label per image; download it again")
    return x.reshape(-1, 3, 32, 32), np.asarray(y, dtype=np.int64)


def parse_meta(data: bytes | None, origin: str) -> list[str]:
    """Class names from batches.meta's b'label_names' (the standard ten when the file is absent)."""
    if data is None:
        return list(CLASSES)
    meta = restricted_loads(data, origin)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{origin}: no b'label_names' list of class names; download it again")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def read_archive(path: Path, max_bytes: int = MAX_BATCH_BYTES) -> dict[str, bytes]:
    """The batch files' bytes, read in one pass over the tar.gz (a backward seek would re-inflate it);
    a member over `max_bytes` is refused by its declared size, before it is inflated."""
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH, META)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i, member in enumerate(tar):
                if i == _MAX_MEMBERS:
                    raise DataError(f"{path.name}: more than {_MAX_MEMBERS} members, not the CIFAR-10 archive; "
                                    "download it again")
                if member.name in wanted and member.isfile():
                    name = member.name.rsplit("/", 1)[1]
                    _check_size(f"{path.name}:{name}", member.size, max_bytes)
                    f = tar.extractfile(member)
                    assert f is not None  # a regular member always has contents
                    data = f.read(max_bytes + 1)  # a tar member holds its declared size; bounded all the same
                    _check_size(f"{path.name}:{name}", len(data), max_bytes)
                    found[name] = data
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise DataError(f"{path.name}: not a readable tar.gz ({exc}); download it again") from None
    _require(found, path.name)
    return found


def read_folder(folder: Path, max_bytes: int = MAX_BATCH_BYTES) -> dict[str, bytes]:
    """The batch files' bytes from an extracted cifar-10-batches-py folder (each at most `max_bytes`)."""
    found = {}
    for p in (folder / n for n in (*TRAIN_BATCHES, TEST_BATCH, META)):
        if p.is_file():
            _check_size(str(p), p.stat().st_size, max_bytes)
            with open(p, "rb") as f:
                found[p.name] = f.read(max_bytes + 1)
            _check_size(str(p), len(found[p.name]), max_bytes)
    _require(found, str(folder))
    return found


def _check_size(where: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise DataError(f"{where} holds {size:,} bytes, more than the {max_bytes:,} a CIFAR-10 batch can "
                        "(about 31 MB); it is not the official file, download the archive again")


def _require(found: dict[str, bytes], where: str) -> None:
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in found]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)} of the CIFAR-10 layout; download the archive again")


def _extracted_folder(cfg: DataCfg) -> Path | None:
    """An extracted batches folder at or inside cfg.data_dir, when no archive is there."""
    if not cfg.data_dir:
        return None
    root = Path(cfg.data_dir).expanduser()
    if root.is_file() or (root / ARCHIVE.name).is_file():
        return None
    for folder in (root, root / FOLDER):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return folder
    return None


def _shape(cfg: DataCfg) -> DataShape:
    """32x32 RGB (or cfg's size and channels), ten classes: known without the files."""
    size = cfg.image_size or 32
    return DataShape((cfg.channels or 3, size, size), 10, "multiclass")


@register_dataset("cifar10", shape=_shape,
                  description="CIFAR-10 (Krizhevsky 2009): 60,000 32x32 colour images, 10 classes; downloaded, sha256-checked")
def load_cifar10(cfg: DataCfg, seed: int) -> DataBundle:
    """CIFAR-10: 50000 train / 10000 test 32x32 colour images in ten classes (official test split)."""
    folder = _extracted_folder(cfg)
    if folder is not None:
        if cfg.verify:
            # per-file digests of the extracted batches are not published; only the archive's is
            raise DataError(
                f"cifar10: {folder} is an extracted folder: cannot verify an extracted folder; "
                f"point --data-dir at {ARCHIVE.name} or set data.verify=false"
            )
        files, where = read_folder(folder), folder
    else:
        path = locate("cifar10", (ARCHIVE,), cfg)[ARCHIVE.name]  # sha256-checked before any unpickling
        files, where = read_archive(path), path
    # pop each file's bytes as it is parsed, so raw bytes and arrays are never all held at once
    parts = [parse_batch(files.pop(n), f"{where}:{n}") for n in TRAIN_BATCHES]
    x_test, y_test = parse_batch(files.pop(TEST_BATCH), f"{where}:{TEST_BATCH}")
    classes = parse_meta(files.get(META), f"{where}:{META}")
    if len(classes) != len(CLASSES):
        raise DataError(f"{where}:{META} names {len(classes)} classes, CIFAR-10 has 10; download it again")
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    # verified means the archive's sha256 matched; an extracted folder is only read with verify=false
    batches = "official python batches" if cfg.verify else "python batches (official format, not verified: data.verify=false)"
    source = (
        f"CIFAR-10 (Krizhevsky 2009): {batches} from {where}, {len(x_train)} train / "
        f"{len(x_test)} test 32x32 RGB images (official test split as test)"
    )
    return image_bundle(
        x_train, y_train, x_test, y_test, classes, cfg, seed, source, channels=cfg.channels, invert="never"
    )
