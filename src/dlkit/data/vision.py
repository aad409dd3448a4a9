"""Image data sets held in memory: sklearn's digits here, and `image_bundle`, which the in-memory
image loaders share (split, subset, resize, normalise with train-only statistics)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from dlkit.config import DataCfg
from dlkit.data import register_dataset
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.data.preprocess import ImagePrep
from dlkit.data.split import stratified_split, stratified_subset
from dlkit.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision's ImageNet checkpoints were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHUNK = 4096  # images resized per call, so a big resize never holds two full copies at once


@register_dataset("digits")
def load_digits_bundle(cfg: DataCfg, seed: int) -> DataBundle:
    """sklearn's 1797 8x8 digits scaled to [0, 1] and upscaled to the MNIST layout (28x28); grey, or
    repeated to RGB when data.channels is 3 (as ImageNet models need)."""
    digits = load_digits()
    x = (digits.images[:, None, :, :] / 16.0).astype(np.float32)
    source = "scikit-learn load_digits: 1797 8x8 greyscale digits (UCI optical recognition), 0..16 -> [0, 1]"
    classes = [str(i) for i in range(10)]
    return image_bundle(
        x, digits.target, None, None, classes, cfg, seed, source, default_size=28, channels=cfg.channels,
        invert="auto"
    )


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
) -> DataBundle:
    """A DataBundle from images (N, C, H, W), uint8 0..255 or float in [0, 1], and integer labels.

    With no official test set, the data are split (1 - val - test, val, test), stratified and seeded;
    with one, `cfg.val_split` of the training images become the validation set. `cfg.subset` keeps
    that many training images (stratified). Images are resized to `cfg.image_size` (else
    `default_size`, else their own size) and to `channels` (else their own) by the same ImagePrep
    saved as `preprocessing`; `invert="auto"` suits ink-on-paper data (digits, MNIST), never photos.
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
    prep = ImagePrep(channels=channels or x_all.shape[1], size=(size, size), invert=invert)
    raw = {"train": (x_all[tr], y_all[tr]), "val": (x_all[va], y_all[va]), "test": (x_te, y_te)}
    binary = len(classes) == 2
    if is_lazy(prep, x_all.shape[1:], x_all.dtype.itemsize, sum(len(x) for x, _ in raw.values())):
        # held as given and laid out batch by batch: MNIST at 224x224x3 would take 600 KB an image,
        # a 160x160 photo 300 KB in float32 instead of 75 KB as uint8
        stored = {name: torch.from_numpy(np.ascontiguousarray(x)) for name, (x, _) in raw.items()}
        _set_normalisation(prep, cfg, lambda: _chunked_stats(prep, stored["train"]))
        splits = {name: TensorSplit(stored[name], _label_tensor(y, binary), LazyImages(prep))
                  for name, (_, y) in raw.items()}
    else:
        laid_out = {name: _layout(prep, x) for name, (x, _) in raw.items()}
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
