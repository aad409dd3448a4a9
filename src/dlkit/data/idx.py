"""MNIST and Fashion-MNIST from their four official IDX files (gzip), parsed by their headers."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from dlkit.config import DataCfg
from dlkit.data import DataShape, register_dataset
from dlkit.data.bundle import DataBundle
from dlkit.data.download import RemoteFile, locate
from dlkit.data.vision import image_bundle
from dlkit.errors import DataError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_CHUNK = 1 << 20
_MAX_PAYLOAD = 1 << 31  # no IDX data set dlkit reads comes near 2 GiB; a bigger header is corrupt

_MNIST_URLS = (  # yann.lecun.com no longer serves them reliably; torchvision and TF use these
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_URLS = (  # the copy Keras' fashion_mnist.load_data reads (https), then Zalando's own bucket (http only)
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def _remote(name: str, sha256: str, size: int, bases: tuple[str, ...]) -> RemoteFile:
    return RemoteFile(name, sha256, tuple(base + name for base in bases), size)


_M, _F = _MNIST_URLS, _FASHION_URLS


# sha256 digests and sizes of the official files, as TensorFlow Datasets records them
# (url_checksums/mnist.txt and fashion_mnist.txt); torchvision's tables give the same files' md5s only
FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        _remote(TRAIN_IMAGES, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422, _M),
        _remote(TRAIN_LABELS, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881, _M),
        _remote(TEST_IMAGES, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877, _M),
        _remote(TEST_LABELS, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542, _M),
    ),
    "fashion_mnist": (
        _remote(TRAIN_IMAGES, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880, _F),
        _remote(TRAIN_LABELS, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515, _F),
        _remote(TEST_IMAGES, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102, _F),
        _remote(TEST_LABELS, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148, _F),
    ),
}
DIGITS = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped IDX file as a uint8 array shaped by its header; any defect is a one-line DataError."""
    try:
        with gzip.open(path, "rb") as f:
            head = _read_exactly(f, 4, path, "header")
            (found,) = struct.unpack(">I", head)
            if found != magic:
                raise DataError(
                    f"{path.name}: magic number 0x{found:08x}, expected 0x{magic:08x}; it is not an IDX "
                    f"{'image' if magic == IMAGES_MAGIC else 'label'} file, check which file is which"
                )
            ndim = magic & 0xFF
            dims = struct.unpack(f">{ndim}I", _read_exactly(f, 4 * ndim, path, "header"))
            if 0 in dims:
                raise DataError(f"{path.name}: header claims {dims}, an empty data set; it is corrupt, download it again")
            size = math.prod(dims)  # Python ints: np.prod wraps around in int64 and could look small
            if size > _MAX_PAYLOAD:
                raise DataError(f"{path.name}: header claims {dims} = {size:,} bytes, more than the "
                                f"{_MAX_PAYLOAD:,} any IDX data set holds; it is corrupt, download it again")
            data = np.empty(dims, dtype=np.uint8)
            _read_exactly(f, size, path, f"payload of {dims} bytes", into=memoryview(data).cast("B"))
            if f.read(1):
                raise DataError(f"{path.name}: more data than its header's {dims}; download it again")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path.name}: not a readable gzip file ({exc}); download it again") from None
    return data


def _read_exactly(f: gzip.GzipFile, n: int, path: Path, what: str, into: memoryview | None = None) -> bytes:
    """Read n bytes (into `into` when given, so a 47 MB payload is never held twice); short means truncated."""
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = f.readinto(buf[got : got + _CHUNK])  # bounded: GzipFile.readinto reads via a temporary bytes
        if not k:
            raise DataError(f"{path.name}: truncated, {what} ends after {got} of {n} bytes; download it again")
        got += k
    return bytes(buf) if into is None else b""


def read_pair(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, rows, cols) and labels (N,) from an IDX image file and its label file."""
    x = read_idx(images, IMAGES_MAGIC)
    y = read_idx(labels, LABELS_MAGIC)
    if len(x) != len(y):
        raise DataError(
            f"{images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels; "
            "the files do not belong together, download them again"
        )
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{labels.name}: label {int(y.max())} is outside 0..{num_classes - 1}; download it again")
    return x[:, None, :, :], y


def _load(name: str, classes: list[str], invert: str, cfg: DataCfg, seed: int, title: str,
          framing: str = "resize") -> DataBundle:
    paths = locate(name, FILES[name], cfg)
    x_train, y_train = read_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], len(classes))
    x_test, y_test = read_pair(paths[TEST_IMAGES], paths[TEST_LABELS], len(classes))
    files = "official IDX files" if cfg.verify else "IDX files (official format, not verified: data.verify=false)"
    source = (
        f"{title}: {files} in {paths[TRAIN_IMAGES].parent}, {len(x_train)} train / {len(x_test)} test "
        f"images of {x_train.shape[2]}x{x_train.shape[3]} (official test split as test)"
    )
    return image_bundle(
        x_train, y_train, x_test, y_test, classes, cfg, seed, source, channels=cfg.channels, invert=invert,
        framing=framing,
    )


def _shape(cfg: DataCfg) -> DataShape:
    """28x28 grey (or cfg's size and channels), ten classes: known without the files."""
    size = cfg.image_size or 28
    return DataShape((cfg.channels or 1, size, size), 10, "multiclass")


@register_dataset("mnist", shape=_shape,
                  description="MNIST (LeCun, Cortes, Burges): 70,000 28x28 digits in IDX files; downloaded, sha256-checked")
def load_mnist(cfg: DataCfg, seed: int) -> DataBundle:
    """MNIST handwritten digits. Its files are in the MNIST layout already; a user's picture is laid out
    so at prediction (`framing="mnist"`: its ink found whatever its colours, boxed, centred by mass)."""
    return _load("mnist", DIGITS, "auto", cfg, seed, "MNIST (LeCun, Cortes, Burges)", framing="mnist")


@register_dataset("fashion_mnist", shape=_shape,
                  description="Fashion-MNIST (Zalando, MIT): 70,000 28x28 clothing images; downloaded, sha256-checked")
def load_fashion_mnist(cfg: DataCfg, seed: int) -> DataBundle:
    """Fashion-MNIST (Zalando): ten garment classes, 28x28 grey.

    Its images are product photos on white whose intensities were negated (step 6 of the paper's
    conversion), so a user's photo on a light background must be inverted too: `invert="auto"`
    does that, and leaves the data set itself (dark borders) untouched.
    """
    return _load("fashion_mnist", FASHION_CLASSES, "auto", cfg, seed, "Fashion-MNIST (Xiao, Rasul, Vollgraf)")
