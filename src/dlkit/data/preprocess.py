"""Preprocessing specs: what turned the raw data into training tensors, saved in bundle.json and
applied again, unchanged, to a user's raw input at prediction time."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dlkit.data.inputs import read_image, read_table
from dlkit.data.mnist_layout import FRAME, WORK_SIDE, Placement, digit_note, layout_user_digit, place_user_digit
from dlkit.errors import InputError, RunDirError

if TYPE_CHECKING:
    from dlkit.data.text import TextPrep

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights Pillow's convert("L") uses


@dataclass
class ImagePrep:
    """Images: resize to `size`, match `channels`, optionally invert light backgrounds, normalise.

    `invert="auto"` inverts an image whose border is light (mean > 0.5) so that ink is bright on
    dark, as in MNIST and sklearn's digits; a photo data set must use "never".
    `framing="mnist"` (digit models) first lays each image out as MNIST was made (`mnist_layout.py`: the
    ink found whatever its colours, cropped, its longer side scaled to 20 pixels, centred by its centre of
    mass in 28x28), which makes `invert` moot; the data sets' own images are laid out so already and
    are only resized in training. "resize" (the default, and what bundles without the field meant)
    resizes the whole picture.
    """

    channels: int
    size: tuple[int, int]
    mean: list[float] | None = None
    std: list[float] | None = None
    invert: str = "never"
    framing: str = "resize"

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        if self.invert not in ("never", "auto"):
            raise ValueError(f"invert must be 'never' or 'auto', got {self.invert!r}")
        if self.framing not in ("resize", "mnist"):
            raise ValueError(f"framing must be 'resize' or 'mnist', got {self.framing!r}")

    def apply(self, x: Tensor) -> Tensor:
        """Preprocess a float batch (N, C, H, W) with values in [0, 1]."""
        return self.normalise(self.layout(x))

    def layout(self, x: Tensor) -> Tensor:
        """Every step but normalisation: the MNIST layout or inversion, channel matching, resizing."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"expected images shaped (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float()
        if self.framing == "mnist":
            x = _mnist_frames(_grey(x))
        elif self.invert == "auto":
            x = torch.where(_border_mean(x)[:, None, None, None] > 0.5, 1.0 - x, x)
        if x.shape[1] == 3 and self.channels == 1:
            x = _grey(x)
        elif x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            shrinking = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=shrinking
            )
        return x.contiguous()

    def normalise(self, x: Tensor) -> Tensor:
        """Subtract the per-channel mean and divide by the std, when the spec has them."""
        if self.mean is None or self.std is None:
            return x
        return _affine(x, self.mean, self.std, (1, -1, 1, 1))

    def decode(self, source: str) -> Tensor:
        """A user's image file or .npy array as `read` decodes it, before `layout` (1, C, H, W)."""
        if self.framing != "mnist":
            return read_image(source, self.channels, self.size)  # reduced while decoding
        # read in colour, to see a colour photo given to a grey model; ink is found at WORK_SIDE pixels
        return read_image(source, 3, (WORK_SIDE, WORK_SIDE))

    def read(self, source: str) -> tuple[Tensor, str | None]:
        """A user's image file or .npy array prepared for the model (1, C, H, W), and a one-line note
        when a digit model (framing "mnist") is given something unlike its training digits."""
        raw = self.decode(source)
        if self.framing != "mnist":
            return self.apply(raw), None
        return self.apply(raw), digit_note(raw[0], _grey(raw)[0, 0], grey_model=self.channels == 1)

    def placement(self, raw: Tensor) -> Placement | None:
        """For framing "mnist": where the model's 28x28 frame comes from in the decoded picture (1, C, H, W)
        (None without ink, or for the plain resize, whose frame is the whole picture)."""
        return place_user_digit(_grey(raw.float())[0, 0]) if self.framing == "mnist" else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged with kind "image"."""
        return {"kind": "image", **asdict(self), "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePrep:
        """Inverse of `to_dict`; a bundle written before `framing` existed resized its inputs."""
        size = tuple(d["size"])
        return cls(d["channels"], size, d.get("mean"), d.get("std"), d.get("invert", "never"),
                   d.get("framing", "resize"))


@dataclass
class TablePrep:
    """Table rows: (x - mean) / std per feature, with statistics taken from the training split.

    `method` says what the two vectors are: "standard" (mean and std), "minmax" (minimum and range,
    which maps the training range to [0, 1]) or "none" (both None, rows pass unchanged).
    """

    feature_names: list[str]
    mean: list[float] | None = None
    std: list[float] | None = None
    method: str = "standard"

    def apply(self, x: Tensor) -> Tensor:
        """Preprocess a float batch of rows (N, F)."""
        x = self.check(x)
        if self.mean is None or self.std is None:
            return x
        return _affine(x, self.mean, self.std, (1, -1))

    def check(self, x: Tensor) -> Tensor:
        """Rows (N, F) as float32, not yet normalised; InputError for another shape."""
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise InputError(
                f"expected rows of {len(self.feature_names)} features, got shape {tuple(x.shape)}"
            )
        return x.float()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged with kind "table"."""
        return {"kind": "table", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TablePrep:
        """Inverse of `to_dict`."""
        return cls(list(d["feature_names"]), d.get("mean"), d.get("std"), d.get("method", "standard"))


def prep_from_dict(d: dict[str, Any]) -> ImagePrep | TablePrep | TextPrep:
    """Rebuild the spec saved in bundle.json, dispatching on d["kind"]."""
    from dlkit.data.text import TextPrep

    kinds = {"image": ImagePrep, "table": TablePrep, "text": TextPrep}
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise RunDirError(f"preprocessing spec has kind {kind!r}; expected 'image', 'table' or 'text'")
    try:
        return kinds[kind].from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"preprocessing spec of kind '{kind}' is malformed: {exc}") from None


def read_input(source: str, spec: ImagePrep | TablePrep | TextPrep) -> Tensor:
    """Read a user's raw input (a file path, inline numbers for tables, the text itself) and preprocess it."""
    return read_input_noted(source, spec)[0]


def read_input_noted(source: str, spec: ImagePrep | TablePrep | TextPrep) -> tuple[Tensor, str | None]:
    """`read_input`, with a one-line note when the input does not look like the training data (see
    `ImagePrep.read`); None otherwise."""
    from dlkit.data.text import TextPrep, read_text

    if isinstance(spec, TextPrep):
        return spec.apply([read_text(source)]), None
    if isinstance(spec, ImagePrep):
        return spec.read(source)
    return spec.apply(read_table(source, spec.feature_names)), None


def _affine(x: Tensor, mean: list[float], std: list[float], shape: tuple[int, ...]) -> Tensor:
    """(x - mean) / std broadcast along `shape`; a zero std (a constant feature) divides by 1."""
    m, s = _statistics(tuple(mean), tuple(std), x.dtype, shape)
    if x.device != m.device:
        m, s = m.to(x.device), s.to(x.device)
    return (x - m) / s


@lru_cache(maxsize=64)
def _statistics(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """`_affine`'s two vectors as tensors, made once per statistics (a served table row is prepared in
    a few microseconds; building the tensors from lists took six times that). Never written to."""
    m = torch.tensor(mean, dtype=dtype).view(shape)
    s = torch.tensor([v if v > 0 else 1.0 for v in std], dtype=dtype).view(shape)
    return m, s


def _grey(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) by ITU-R 601-2 luma; grey batches pass unchanged."""
    if x.shape[1] == 1:
        return x
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _mnist_frames(grey: Tensor) -> Tensor:
    """Each grey picture's digit laid out as MNIST was made: (N, 1, 28, 28); no ink gives an empty frame."""
    if len(grey) == 0:
        return grey.new_zeros((0, 1, FRAME, FRAME))
    frames = [layout_user_digit(g[0]) for g in grey.cpu()]
    out = torch.stack([torch.zeros(FRAME, FRAME) if f is None else torch.from_numpy(f) for f in frames])
    return out[:, None].to(grey.device, grey.dtype)


def _border_mean(x: Tensor) -> Tensor:
    """Mean of each image's outermost pixels over all channels: (N,)."""
    top, bottom = x[:, :, 0, :], x[:, :, -1, :]
    left, right = x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]
    total = top.sum((1, 2)) + bottom.sum((1, 2)) + left.sum((1, 2)) + right.sum((1, 2))
    count = x.shape[1] * (2 * x.shape[3] + 2 * max(x.shape[2] - 2, 0))
    return total / count
