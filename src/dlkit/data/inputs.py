"""Readers of a user's raw prediction input: image files, .npy arrays, CSV rows, inline numbers.

Every failure is an InputError naming the input and what was expected; no Pillow or NumPy
exception reaches the user.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dlkit.errors import InputError

IMAGE_EXPECT = "an image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a .npy array in [0, 1]"
# Largest image decoded, in pixels (checked from the header, before decoding): a 40-megapixel RGB file
# is 120 MB of bytes and 480 MB as floats, where a legal 12000x12000 PNG would cost 1.7 GB. A larger
# JPEG is first reduced while decoding (by 2, 4 or 8) towards the model's size, so phone photos pass.
MAX_PIXELS = 40_000_000
# Longest CSV field read, in characters. csv's own default (131,072) is kept for numbers, which are
# never near it. Text cells (text_csv) may hold 1 MiB: IMDb's longest review has 13,704 characters and
# the tokenizer keeps max_len tokens anyway; the bound still stops an unclosed quote, which turns the
# rest of a file into one field, at the line it opened on.
NUMBER_FIELD_LIMIT = 131_072
TEXT_FIELD_LIMIT = 1 << 20


def read_image(source: str, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """One image as a float batch (1, C, H, W) in [0, 1], C = `channels` for files (1 or 3).

    `size` (H, W), the size the model reads, lets a larger JPEG decode at a half, quarter or eighth
    of its size (never below `size`); an image over MAX_PIXELS is refused before it is decoded.
    """
    path = _existing_file(source, IMAGE_EXPECT)
    if path.suffix.lower() == ".npy":
        return _image_from_array(_load_npy(path, source, IMAGE_EXPECT), source)
    try:
        with open_image(path) as img:
            if size is not None and img.format == "JPEG":
                side = max(size)  # either axis may become the height after EXIF rotation
                img.draft(None, (side, side))
            check_pixels(img.size, source)
            pixels = _pixels(ImageOps.exif_transpose(img), channels)
    except InputError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        reason = _reason(exc)
        raise InputError(f"{source}: not a readable image ({reason}); expected {IMAGE_EXPECT}") from None
    return torch.from_numpy(pixels).unsqueeze(0)


def open_image(path: Path) -> Image.Image:
    """Image.open without Pillow's multi-line DecompressionBombWarning (check_pixels says it in one line);
    Pillow's own refusal of an image over twice its limit becomes the same InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise InputError(_too_large(str(path), f"{int(pixels[1]):,} pixels" if pixels else "the image")) from None


def check_pixels(size: tuple[int, int], source: str) -> None:
    """Refuse an image of more than MAX_PIXELS pixels, saying how to shrink it."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise InputError(_too_large(source, f"{w}x{h} = {w * h:,} pixels"))


def _too_large(source: str, what: str) -> str:
    return (f"{source}: {what} is more than the {MAX_PIXELS // 1_000_000} megapixels dlkit decodes; shrink the "
            "picture first (e.g. to 4000 pixels on its longer side, or save it as JPEG, which is reduced as it is read)")


def read_table(source: str, feature_names: list[str]) -> Tensor:
    """Rows of features (rows, F) from a .npy vector/matrix, a CSV file or inline "1.2,3.4,..."."""
    n = len(feature_names)
    expect = f"a .npy vector, a CSV file or {n} comma-separated numbers ({_preview(feature_names)})"
    if _looks_like_file(source):
        path = _existing_file(source, expect)
        if path.suffix.lower() == ".npy":
            arr = _load_npy(path, source, expect)
            if arr.ndim not in (1, 2) or arr.dtype.kind not in "biuf":
                raise InputError(
                    f"{source}: expected a numeric vector or matrix of rows, "
                    f"got a {arr.dtype} array of shape {arr.shape}"
                )
            rows = np.atleast_2d(arr).astype(np.float64)
        else:
            rows = _csv_rows(path, source, feature_names)
    else:
        shown = source if len(source) <= 40 else source[:37] + "..."
        try:
            rows = np.array([[float(c) for c in source.split(",")]])
        except ValueError:
            raise InputError(
                f"'{shown}' is neither an existing file nor comma-separated numbers; expected {expect}"
            ) from None
        source = f"input '{shown}'"
    if rows.shape[1] != n:
        got = rows.shape[1]
        raise InputError(f"{source}: expected {n} values per row ({_preview(feature_names)}), got {got}")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise InputError(
            f"{source}: row {bad[0] + 1} holds a value that is not a finite number; "
            f"expected {n} numbers per row"
        )
    return torch.from_numpy(rows.astype(np.float32))


def _pixels(img: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow mode as float32 (C, H, W) in [0, 1]; 16/32-bit and float greys keep their depth."""
    if img.mode.startswith("I") or img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            grey = grey / 65535.0
        elif img.mode == "I" or grey.max() > 1.0:
            grey = grey / (65535.0 if grey.max() > 255 else 255.0)
        return np.clip(grey, 0.0, 1.0).astype(np.float32)[None]
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        # transparent pixels become white paper, as a viewer shows them
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def _image_from_array(arr: np.ndarray, source: str) -> Tensor:
    """(H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4 -> float (1, C, H, W) in [0, 1]."""
    shapes = "(H, W), (C, H, W) or (H, W, C) with C = 1, 3 or 4"
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[0] not in (1, 3, 4) and arr.shape[-1] in (1, 3, 4):
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4) or min(arr.shape) == 0:
        raise InputError(f"{source}: expected an array shaped {shapes}, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{source}: expected numbers in [0, 1] or integers 0..255, not {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{source}: the array holds NaN or infinite values; expected [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise InputError(f"{source}: integer pixels must lie in 0..255, got {lo:g}..{hi:g}")
        arr = arr / 255.0
    elif lo < 0 or hi > 1:
        raise InputError(
            f"{source}: float pixels must lie in [0, 1] (or use integers 0..255), got {lo:g}..{hi:g}"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if x.shape[0] == 4:
        x = x[:3] * x[3:] + (1.0 - x[3:])  # composite on white, as for RGBA files
    return x.unsqueeze(0)


def _csv_rows(path: Path, source: str, names: list[str]) -> np.ndarray:
    """A CSV of numbers. A first row of mostly non-numbers is a header: columns are then taken by
    name when it holds every feature name, else by position."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = _reason(exc)
        raise InputError(f"{source}: cannot read the file ({reason}); expected a CSV of numbers") from None
    try:
        rows = csv_records(text)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}; expected a CSV of numbers") from None
    expect = f"{len(names)} values per row ({_preview(names)})"
    header = None
    # a header is a row of mostly names; a data row with one bad cell is reported as such below
    if rows and sum(_is_number(c) for c in rows[0][1]) < len(rows[0][1]) / 2:
        header, rows = [c.strip() for c in rows[0][1]], rows[1:]
    if not rows:
        raise InputError(f"{source}: no data rows; expected {expect}")
    columns = [header.index(n) for n in names] if header and set(names) <= set(header) else None
    if header and columns is None and len(header) != len(names):
        missing = [n for n in names if n not in header]
        raise InputError(
            f"{source}: the header lacks column '{missing[0]}' and has {len(header)} columns, "
            f"not {len(names)}; expected the columns {_preview(names)}"
        )
    out = []
    for line, row in rows:
        if columns is not None:
            if len(row) != len(header):
                raise InputError(
                    f"{source}: line {line} has {len(row)} values but the header has {len(header)}"
                )
            row = [row[j] for j in columns]
        if len(row) != len(names):
            raise InputError(f"{source}: expected {expect}, got {len(row)} on line {line}")
        try:
            out.append([float(c) for c in row])
        except ValueError:
            cell = next(c for c in row if not _is_number(c))
            raise InputError(
                f"{source}: line {line} holds '{cell.strip()}', not a number; expected {expect}"
            ) from None
    return np.array(out, dtype=np.float64)


def csv_records(text: str, field_limit: int = NUMBER_FIELD_LIMIT) -> list[tuple[int, list[str]]]:
    """The CSV records of `text` that hold something, each with the line it ends on; a defect (a field
    over `field_limit` characters) is a ValueError "line N: why", N the line its record began on."""
    old = csv.field_size_limit(field_limit)  # csv keeps one limit per process: restored below
    reader = csv.reader(io.StringIO(text))
    records, start = [], 1
    try:
        for row in reader:
            if any(c.strip() for c in row):
                records.append((reader.line_num, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        reason = (f"a field is longer than {field_limit:,} characters (an unclosed quote?)"
                  if "field limit" in str(exc) else str(exc))
        raise ValueError(f"line {start}: {reason}") from None
    finally:
        csv.field_size_limit(old)
    return records


def _load_npy(path: Path, source: str, expect: str) -> np.ndarray:
    """np.load without pickles; any failure is an InputError."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, UnpicklingError, ...
        reason = _reason(exc)
        raise InputError(f"{source}: not a readable .npy file ({reason}); expected {expect}") from None


def _existing_file(source: str, expect: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        raise InputError(f"{source}: {what}; expected {expect}")
    return path


def _looks_like_file(source: str) -> bool:
    try:
        exists = Path(source).expanduser().exists()
    except OSError:  # a very long inline string is not a valid path
        exists = False
    return exists or source.lower().endswith((".npy", ".csv", ".txt")) or "/" in source


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _preview(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..."


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120] or type(exc).__name__
