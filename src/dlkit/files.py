"""Files written whole or not at all: every file dlkit writes goes through `write_atomic`.

A unique temporary name in the target's folder, the bytes written and fsynced, then `os.replace`
onto the target and the folder fsynced: a reader (or a machine that loses power) sees the old file
or the new one, never half of one. A failure, Ctrl-C included, removes the temporary. Every file
gets the same mode, 0666 less the umask (0644 with the usual umask), weights included.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dlkit.errors import DlkitError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the mode a plain open() would give, for files made by mkstemp (0600)
FILE_MODE = 0o666 & ~_UMASK


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(file)`; a reader never sees half a file and a failure leaves none.
    Missing parent folders are created."""

    def through_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_atomic_path(path, through_file)


def write_atomic_path(path: str | Path, produce: Callable[[Path], object]) -> Path:
    """Like `write_atomic` for writers that take a file name (safetensors' save_file): `produce(tmp)`
    writes the temporary, which is then fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        produce(tmp)
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` as the whole of `path`, atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) as the whole of `path`, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a digest checked before a file is used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_output_file(path: str | Path, option: str = "output") -> None:
    """Refuse, before any work, an output file that could not be written: a folder of that name, a
    parent that is a file, a folder without write permission (one DlkitError line)."""
    path = Path(path)
    if path.is_dir():
        raise DlkitError(f"{option} {path} is a folder; give a file name such as {path / 'out.png'}")
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise DlkitError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DlkitError(f"{option} {path}: no permission to write in {probe}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; some file systems cannot open a folder for this, which is no error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
