"""A request's inputs as the model's batch, prepared exactly as `dlkit predict` prepares them (the
bundle's own ImagePrep / TablePrep / TextPrep), and the model's logits as `dlkit predict`'s answers.

An upload goes through dlkit's file readers from a private temporary folder that is removed before
the answer leaves (the readers take paths; this keeps one code path for files), made in memory
(/dev/shm) where there is one: on a disk, making and removing a folder costs more than reading a
digit. Client strings are never taken as paths: a text is tokenized as given, a table row is parsed here.
"""
from __future__ import annotations

import base64
import binascii
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dlkit.data.inputs import read_table
from dlkit.data.preprocess import ImagePrep, TablePrep
from dlkit.data.text import TextPrep
from dlkit.errors import InputError
from dlkit.evaluate.metrics import probabilities
from dlkit.serve.limits import (
    MAX_INPUTS,
    MAX_ROWS,
    ClientError,
    check_count,
    check_text,
    image_suffix,
    input_status,
)

# where the private folders are made: memory where Linux offers it to us, else the system's temporary folder
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None

Spec = ImagePrep | TablePrep | TextPrep
Item = tuple[str, Any]  # (how the client names it: a file name or inputs[i], what it sent)
Prepared = list[tuple[Tensor, str | None]]  # per input: its rows for the model, and a note (digit models)


def prepare(spec: Spec, items: list[Item], uploads: bool, normalise: bool = True) -> Prepared:
    """Each input's rows, prepared for the model; `uploads` says items are file bytes, else JSON values.
    `normalise=False` leaves table rows checked but not normalised (a batch of them is, at once)."""
    if not items:
        where = "the multipart field 'files'" if uploads else '{"inputs": [...]}'
        raise ClientError(400, f"no inputs: send one or more in {where}")
    if isinstance(spec, TablePrep):
        prepared = [_table_rows(spec, label, value, uploads, normalise) for label, value in items]
        check_count(sum(len(x) for x, _ in prepared), MAX_ROWS, "table rows")
        return prepared
    check_count(len(items), MAX_INPUTS, "inputs")
    if isinstance(spec, TextPrep):
        return [(_text_ids(spec, label, value, uploads), None) for label, value in items]
    with scratch() as folder:
        return [read_image_bytes(spec, label, image_bytes(label, value, uploads), Path(folder) / f"in{i}")
                for i, (label, value) in enumerate(items)]


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A private temporary folder (mode 0700) for a request's uploads, removed when the block ends."""
    return tempfile.TemporaryDirectory(prefix="dlkit-serve-", dir=SCRATCH)


def read_image_bytes(spec: ImagePrep, label: str, data: bytes, stem: Path) -> tuple[Tensor, str | None]:
    """An uploaded image read by the bundle's ImagePrep from `stem` + its format's suffix (415 for a
    format dlkit does not read, 413 for one over its pixel limit, 400 for a broken one)."""
    path = stem.with_suffix(image_suffix(data, label))
    path.write_bytes(data)
    with mapped_errors(path, label):
        return spec.read(str(path))


@contextmanager
def mapped_errors(path: Path | None, label: str) -> Iterator[None]:
    """Turn dlkit's InputError into a ClientError (400/413) naming the client's input, not our file."""
    try:
        yield
    except InputError as exc:
        message = str(exc).replace(str(path), label) if path is not None else str(exc)
        raise ClientError(input_status(exc), message) from None


def image_bytes(label: str, value: Any, uploads: bool) -> bytes:
    """An image input's bytes: the upload itself, or a JSON base64 string (or data URL) decoded."""
    if uploads:
        return value
    if not isinstance(value, str):
        raise ClientError(400, f"{label}: an image model takes images as base64 strings, got {_kind(value)}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value  # a data URL
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{label}: not valid base64; send the image file's bytes base64-encoded") from None


def _text_ids(spec: TextPrep, label: str, value: Any, uploads: bool) -> Tensor:
    text = text_value(label, value, uploads)
    with mapped_errors(None, label):
        return spec.apply([text])


def text_value(label: str, value: Any, uploads: bool) -> str:
    """A text input: an uploaded UTF-8 file or a JSON string, within MAX_TEXT_CHARS."""
    if uploads:
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ClientError(400, f"{label}: not UTF-8 text; a text model reads UTF-8 text files") from None
    elif not isinstance(value, str):
        raise ClientError(400, f"{label}: a text model takes texts as strings, got {_kind(value)}")
    return check_text(value, label)


def _table_rows(spec: TablePrep, label: str, value: Any, uploads: bool, normalise: bool) -> tuple[Tensor, None]:
    names = spec.feature_names
    if uploads:  # a CSV (header optional) or a .npy file, read as `dlkit predict` reads them
        with scratch() as folder:
            path = Path(folder) / ("in.npy" if value.startswith(b"\x93NUMPY") else "in.csv")
            path.write_bytes(value)
            with mapped_errors(path, label):
                rows = read_table(str(path), names)
    else:
        rows = torch.from_numpy(np.array([_row_values(label, value, names)], dtype=np.float64).astype(np.float32))
    with mapped_errors(None, label):
        return (spec.apply(rows) if normalise else spec.check(rows)), None


def _row_values(label: str, value: Any, names: list[str]) -> list[float]:
    """One JSON row: a list of len(names) numbers, or an object holding each feature by name."""
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        extra = [k for k in value if k not in names]
        if missing or extra:
            what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which is no feature"
            raise ClientError(400, f"{label}: the row {what}; expected the {len(names)} features {_preview(names)}")
        value = [value[n] for n in names]
    if not isinstance(value, list):
        raise ClientError(400, f"{label}: a table model takes rows as lists of {len(names)} numbers or objects "
                               f"by feature name, got {_kind(value)}")
    if len(value) != len(names):
        raise ClientError(400, f"{label}: expected {len(names)} values per row ({_preview(names)}), got {len(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ClientError(400, f"{label}: {_kind(v)} is not a finite number; expected {len(names)} numbers")
    return [float(v) for v in value]


def answers(bundle: dict[str, Any], logits: Tensor, notes: list[str | None] | None = None) -> list[dict[str, Any]]:
    """Per row: label, confidence and per-class probabilities (and a note), rounded as
    `Predictor.predict_tensor` rounds them; regression: the value."""
    notes = notes or [None] * len(logits)
    if bundle["task"] == "regression":
        return [{"value": float(v)} for v in logits.reshape(len(logits), -1)[:, 0]]
    classes = bundle["classes"]
    probs = probabilities(logits, bundle["task"])
    out = []
    # as Python floats at once (the same values float() gives element by element, without a tensor each)
    for row, best, note in zip(probs.tolist(), probs.argmax(1).tolist(), notes):
        out.append({
            "label": classes[best],
            "confidence": round(row[best], 6),
            "probabilities": {c: round(p, 6) for c, p in zip(classes, row)},
            **({"note": note} if note else {}),
        })
    return out


def _kind(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else type(value).__name__


def _preview(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"
