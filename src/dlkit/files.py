"""Files written whole or not at all: a temp file beside the target, renamed into place."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the mode a plain open() would give, for files made by mkstemp (0600)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(file)`; a reader never sees half a file and a failure leaves none.
    Missing parent folders are created; the file gets the usual 0666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
