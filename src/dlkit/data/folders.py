"""The user's own images: a folder of class folders (`image_folder`) or a CSV of rows (`csv_images`).

Files are read by `dlkit.data.inputs.read_image` (every Pillow mode, EXIF orientation) and laid
out by the same `ImagePrep` that prediction uses, in a thread pool (Pillow decodes without the
GIL), straight to uint8 at the target size; `image_bundle` then splits and normalises them.

- Channels: `data.channels`, else 1 when every image is greyscale (L, LA, 1, I, I;16, F), else 3.
- Size: `data.image_size`, else the images' own size when they all share one square size; other
  folders must set `data.image_size` (one DataError says so) rather than guess.
- Unreadable files: `data.bad_files=skip` leaves them out, counted in `meta["skipped"]` with one
  warning line on stderr; `fail` raises a DataError naming the first one.
"""
from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from dlkit.collective import gather_rows, my_block
from dlkit.config import DataCfg
from dlkit.data import DataShape, register_dataset
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.data.inputs import open_image, read_image
from dlkit.data.preprocess import ImagePrep
from dlkit.data.vision import image_bundle
from dlkit.errors import DataError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LAYOUT = ("one sub-folder of images per class (ROOT/cat/1.jpg, ROOT/dog/2.jpg), or train/ and test/ "
          "(and optionally val/) folders each holding such class folders")
CSV_COLUMNS = {"path": ("path", "image", "filename", "file"), "label": ("label", "class")}
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16..." mode
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")  # whose headers carry EXIF before the pixels
_LISTED = 20  # skipped names kept in meta; the warning shows the first 5
THREADS = min(16, os.cpu_count() or 1)  # decoding threads: Pillow and torch release the GIL; more than
# one per core measured slower (torch ops inside each thread use the cores too)

T = TypeVar("T")
Files = list[tuple[Path, str, int]]  # (file, name shown to the user, class index)


@register_dataset("image_folder", shape=lambda cfg: _shape(cfg, _folder_files),
                  description="your images, one sub-folder per class (--data FOLDER)")
def load_image_folder(cfg: DataCfg, seed: int) -> DataBundle:
    """A folder of class folders, split seeded and stratified, or its own train/ [val/] test/ splits."""
    return _bundle(cfg, seed, *_folder_files(cfg), f"image folder {cfg.path}")


@register_dataset("csv_images", shape=lambda cfg: _shape(cfg, _csv_files),
                  description="your images listed in a CSV of path and label (--data FILE.csv)")
def load_csv_images(cfg: DataCfg, seed: int) -> DataBundle:
    """A CSV with a header: `path` (or image, filename, file) and `label` (or class) columns; paths
    relative to the CSV's folder. Classes are sorted, numerically when every label is a number."""
    return _bundle(cfg, seed, *_csv_files(cfg), f"CSV of images {cfg.path}")


def _shape(cfg: DataCfg, listing: Callable[[DataCfg], tuple[dict[str, Files], list[str]]]) -> DataShape:
    """Classes from the listing, channels and size from the image headers: nothing is decoded. Without
    data (`dlkit describe` of a recipe before the user has a folder), the recipe's own
    `data.num_classes`, `image_size` and `channels` say what it is written for."""
    if cfg.path is None and cfg.num_classes and cfg.image_size:
        task = "binary" if cfg.num_classes == 2 else "multiclass"
        return DataShape((cfg.channels or 3, cfg.image_size, cfg.image_size), cfg.num_classes, task)
    splits, classes = listing(cfg)
    channels, size, _ = _target(cfg, [f for files in splits.values() for f in files], Path(cfg.path or "."))
    return DataShape((channels, size, size), len(classes), "binary" if len(classes) == 2 else "multiclass")


def _bundle(cfg: DataCfg, seed: int, splits: dict[str, Files], classes: list[str], source: str) -> DataBundle:
    """Read every split at the target layout and hand the uint8 arrays to `image_bundle`."""
    root, every = Path(cfg.path or "."), [f for files in splits.values() for f in files]
    channels, size, skipped = _target(cfg, every, root)
    prep, arrays, unopened = ImagePrep(channels, (size, size)), {}, set(skipped)
    for name, files in splits.items():
        arrays[name], bad = _read_all([f for f in files if f[1] not in unopened], prep, cfg.bad_files)
        skipped += bad
    if len(skipped) == len(every):
        raise DataError(f"none of the {len(every)} images under {root} is readable ({skipped[0]}, ...)")
    order = {name: i for i, (_, name, _) in enumerate(every)}
    skipped.sort(key=order.__getitem__)
    if skipped:
        more = f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else ""
        plural = "s" if len(skipped) > 1 else ""
        print(f"skipped {len(skipped)} unreadable image{plural}: {', '.join(skipped[:5])}{more}", file=sys.stderr)
    if "all" in arrays:
        x, y = arrays["all"]
        bundle = image_bundle(x, y, None, None, classes, cfg, seed, source, default_size=size, channels=channels)
    else:
        # a given val/ folder is used as is: nothing is split off train/
        fit_cfg = cfg.model_copy(update={"val_split": 0.0}) if "val" in arrays else cfg
        (xt, yt), (xs, ys) = arrays["train"], arrays["test"]
        bundle = image_bundle(xt, yt, xs, ys, classes, fit_cfg, seed, source, default_size=size, channels=channels)
        if "val" in arrays:
            bundle.val = _val_split(*arrays["val"], bundle, len(classes))
            bundle.meta["class_counts"]["val"] = bundle.val.class_counts(len(classes))
    bundle.meta["skipped"] = {"count": len(skipped), "files": skipped[:_LISTED]}
    return bundle


def _val_split(x: np.ndarray, y: np.ndarray, bundle: DataBundle, num_classes: int) -> TensorSplit:
    """A given validation set, preprocessed by the bundle's own spec."""
    prep = ImagePrep.from_dict(bundle.preprocessing)
    images = prep.apply(torch.from_numpy(x).float() / 255.0) if len(x) else torch.zeros(0, *bundle.input_shape)
    labels = torch.from_numpy(y)
    return TensorSplit(images, labels.float() if num_classes == 2 else labels.long())


def _read_all(files: Files, prep: ImagePrep, bad_files: str) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """uint8 images (N, C, size, size) and labels of the readable files, and the skipped names. With
    many processes each decodes its block of the files (on its threads) and all get every image."""
    out = np.empty((len(files), prep.channels, *prep.size), dtype=np.uint8)

    def read(i: int) -> str | None:
        try:
            x = prep.layout(read_image(str(files[i][0]), prep.channels, prep.size))
        except InputError as exc:
            return str(exc).removeprefix(f"{files[i][0]}: ").split("; expected")[0]
        out[i] = (x[0] * 255.0).round_().to(torch.uint8).numpy()
        return None

    mine = my_block(len(files))
    errors: list[str | None] = [None] * len(files)
    errors[mine.start : mine.stop] = _parallel(lambda k: read(mine.start + k), len(mine))
    if len(mine) != len(files):  # many processes: gather the others' images and which files failed
        failed = torch.tensor([errors[i] is not None for i in mine], dtype=torch.uint8)
        out[:] = gather_rows(torch.from_numpy(out[mine.start : mine.stop])).numpy()
        for i, bad in enumerate(gather_rows(failed).tolist()):
            if bad and errors[i] is None:
                errors[i] = "?"  # another process's file: read again below if its reason is needed
    bad = [i for i, e in enumerate(errors) if e is not None]
    if bad and bad_files == "fail":
        raise _unreadable(files[bad[0]][1], errors[bad[0]] if errors[bad[0]] != "?" else read(bad[0]))
    keep = np.setdiff1d(np.arange(len(files)), bad)
    labels = np.array([files[i][2] for i in keep], dtype=np.int64)
    return (out[keep] if bad else out, labels), [files[i][1] for i in bad]


def _target(cfg: DataCfg, files: Files, root: Path) -> tuple[int, int, list[str]]:
    """Channels and square size to load at, and the files whose headers could not be read."""
    if cfg.channels and cfg.image_size:
        return cfg.channels, cfg.image_size, []
    headers = _parallel(lambda i: _header(files[i][0]), len(files))
    bad = [i for i, h in enumerate(headers) if isinstance(h, str)]
    if bad and cfg.bad_files == "fail":
        raise _unreadable(files[bad[0]][1], headers[bad[0]])
    good = [h for h in headers if not isinstance(h, str)]
    if not good:
        raise DataError(f"none of the {len(files)} images under {root} is readable ({files[0][1]}, ...)")
    grey = all(mode in _GREY_MODES or mode.startswith("I;16") for mode, _ in good)
    channels = cfg.channels or (1 if grey else 3)
    sizes = sorted({wh for _, wh in good})
    if cfg.image_size:
        return channels, cfg.image_size, [files[i][1] for i in bad]
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        raise DataError(f"images under {root} are {shown}, not one square size; set "
                        "data.image_size (e.g. --set data.image_size=64) to resize them all to a square")
    return channels, sizes[0][0], [files[i][1] for i in bad]


def _header(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(mode, (width, height) as displayed after EXIF rotation), or why the file cannot be opened."""
    if not path.is_file():
        return "file not found"
    try:
        with open_image(path) as img:
            w, h = img.size
            # orientations 5-8 swap the axes; a PNG's getexif() would decode the whole image
            turned = img.format in _EXIF_FORMATS and img.getexif().get(0x0112) in (5, 6, 7, 8)
            return img.mode, ((h, w) if turned else (w, h))
    except InputError as exc:  # too many pixels
        return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ...
        return f"not a readable image ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]})"


def _parallel(fn: Callable[[int], T], n: int) -> list[T]:
    """fn(0..n-1) on a thread pool, results in order."""
    if n == 0:
        return []
    with ThreadPoolExecutor(max_workers=min(THREADS, n)) as pool:
        return list(pool.map(fn, range(n)))


def _unreadable(name: str, reason: str | None) -> DataError:
    return DataError(f"{name}: {reason}; fix or remove it, or set data.bad_files=skip to leave unreadable images out")


def _root(cfg: DataCfg) -> Path:
    """The folder or file `data.path` names; a DataError saying what to pass when it is missing."""
    if not cfg.path:
        raise DataError(f"data set '{cfg.name}' reads your own files: pass --data PATH (set data.path)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        what = "folder" if cfg.name == "image_folder" else "CSV file"
        raise DataError(f"{path}: {what} not found; expected {LAYOUT if cfg.name == 'image_folder' else 'a CSV'}")
    return path


def _folder_files(cfg: DataCfg) -> tuple[dict[str, Files], list[str]]:
    """The image files of each split ("all" when the folder is not split) and the class names."""
    root = _root(cfg)
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; expected {LAYOUT}")
    subdirs = _subdirs(root)
    given = {"train", "val", "test"} & set(subdirs)
    if "train" in given or "test" in given:
        if not {"train", "test"} <= given:
            missing = "test" if "train" in given else "train"
            raise DataError(f"{root} has {'/, '.join(sorted(given))}/ but no {missing}/ folder; expected {LAYOUT}")
        if set(subdirs) - given:
            other = sorted(set(subdirs) - given)[0]
            raise DataError(f"{root} mixes split folders with '{other}'; expected {LAYOUT}")
        folders = {name: root / name for name in ("train", "val", "test") if name in given}
    else:
        folders = {"all": root}
    classes = _subdirs(folders.get("train", root))
    if len(classes) < 2:
        where = folders.get("train", root)
        raise DataError(f"{where} has {len(classes)} class folder(s), need at least 2; expected {LAYOUT}")
    splits = {}
    for name, folder in folders.items():
        extra = sorted(set(_subdirs(folder)) - set(classes))
        if extra:
            raise DataError(f"{folder} has class folder '{extra[0]}' that train/ lacks; expected the same classes")
        splits[name] = [(f, str(f.relative_to(root)), k) for k, c in enumerate(classes) if (folder / c).is_dir()
                        for f in _images(folder / c)]
    return splits, classes


def _images(folder: Path) -> list[Path]:
    """Image files under `folder` (nested folders too), sorted; others and hidden files ignored."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                        f"add images or remove it; expected {LAYOUT}")
    return files


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _csv_files(cfg: DataCfg) -> tuple[dict[str, Files], list[str]]:
    """The CSV's (file, name, class) rows, as one split "all", and its sorted class names."""
    path = _root(cfg)
    expect = (f"a CSV with a header holding a 'path' column (or {', '.join(CSV_COLUMNS['path'][1:])}) and "
              f"a 'label' column (or class), image paths relative to the CSV's folder")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); expected {expect}") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    cols = {k: next((header.index(n) for n in names if n in header), None) for k, names in CSV_COLUMNS.items()}
    if cols["path"] is None or cols["label"] is None:
        raise DataError(f"{path}: header has columns ({', '.join(header) or 'none'}); expected {expect}")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        cells = [row[cols[k]].strip() if cols[k] < len(row) else "" for k in ("path", "label")]
        if not all(cells):
            raise DataError(f"{path}: line {line} has an empty path or label; expected {expect}")
        entries.append(cells)
    labels = {label for _, label in entries}
    classes = sorted(labels, key=lambda c: (float(c), c)) if all(map(_is_number, labels)) else sorted(labels)
    if len(classes) < 2:
        raise DataError(f"{path}: {len(entries)} rows with {len(classes)} label(s), need at least 2 classes")
    index = {c: k for k, c in enumerate(classes)}
    return {"all": [(path.parent / Path(p).expanduser(), p, index[label]) for p, label in entries]}, classes


def _is_number(text: str) -> bool:
    return text.lstrip("+-").replace(".", "", 1).isdigit()  # plain integers and decimals
