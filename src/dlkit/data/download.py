"""Official data files: find them on disk or download them, sha256-checked, and unpack archives
without letting a member land outside its folder."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dlkit.config import DataCfg
from dlkit.errors import DataError

_CHUNK = 1 << 20
_USER_AGENT = "dlkit (+https://github.com/dlkit)"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name on disk, its sha256, where to get it (first URL first)."""

    name: str
    sha256: str
    urls: tuple[str, ...]
    size: int | None = None


def cache_dir(dataset: str) -> Path:
    """Where downloads of `dataset` live: $XDG_CACHE_HOME/dlkit/datasets/<name>, else ~/.cache/..."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec says a relative value is invalid and must be ignored
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "dlkit" / "datasets" / dataset


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(remote: RemoteFile, dest_dir: Path, timeout: float = 30.0) -> Path:
    """Download `remote` into dest_dir, trying each URL in turn; only a verified file keeps its name."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    for url in remote.urls:
        try:
            return _fetch_one(url, remote, dest_dir, timeout)
        except (OSError, http.client.HTTPException, ValueError, DataError) as exc:
            failures[url] = _reason(exc)
    raise FetchError(remote.name, failures)


class FetchError(DataError):
    """Every URL of a file failed; `failures` maps each URL to why."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.failures = failures
        detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
        super().__init__(f"could not download {name} from any of its URLs ({detail or 'none given'})")


def _fetch_one(url: str, remote: RemoteFile, dest_dir: Path, timeout: float) -> Path:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("only http and https URLs are fetched")
    # a unique .part per attempt, so two processes (torchrun ranks) never write into one file
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f"{remote.name}.", suffix=".part")
    part = Path(tmp)
    try:
        h, received = hashlib.sha256(), 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            while chunk := resp.read(_CHUNK):
                received += len(chunk)
                if remote.size is not None and received > remote.size:
                    raise DataError(f"server sent more than the expected {remote.size} bytes")
                h.update(chunk)
                out.write(chunk)
        # http.client returns a short body without complaint when the connection drops
        if expected is not None and received != expected:
            raise DataError(f"connection dropped after {received} of {expected} bytes")
        if h.hexdigest() != remote.sha256:
            raise DataError(f"sha256 mismatch (got {h.hexdigest()[:12]}..., expected {remote.sha256[:12]}...)")
        final = dest_dir / remote.name
        os.replace(part, final)
        return final
    finally:
        part.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """A short description of why one URL failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def locate(dataset: str, files: Sequence[RemoteFile], cfg: DataCfg) -> dict[str, Path]:
    """Paths of the official files: from cfg.data_dir, else the cache, else downloaded into the cache."""
    if cfg.data_dir:
        return _from_data_dir(dataset, files, Path(cfg.data_dir).expanduser(), cfg.verify)
    cache = cache_dir(dataset)
    found: dict[str, Path] = {}
    for remote in files:
        path = cache / remote.name
        if path.is_file():
            if cfg.verify and sha256_file(path) != remote.sha256:
                raise DataError(
                    f"{dataset}: sha256 mismatch for {remote.name} in {cache}; delete it to download it "
                    "again, or --set data.verify=false to use it as it is"
                )
            found[remote.name] = path
    for i, remote in enumerate(files):
        if remote.name in found:
            continue
        try:
            found[remote.name] = fetch(remote, cache)
        except FetchError as exc:
            missing = [r for r in files[i:] if r.name not in found]
            raise DataError(_offline_message(dataset, missing, cache, exc)) from None
    return found


def _from_data_dir(dataset: str, files: Sequence[RemoteFile], folder: Path, verify: bool) -> dict[str, Path]:
    """The files in a folder the user named (or the one file itself), checked when `verify`."""
    if not folder.exists():
        raise DataError(f"{dataset}: --data-dir {folder} does not exist; point it at the folder holding the files")
    if folder.is_file() and len(files) == 1:
        paths = {files[0].name: folder}
    else:
        paths = {r.name: folder / r.name for r in files}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise DataError(
            f"{dataset}: {', '.join(missing)} not found in {folder}; put the official files there "
            "or drop --data-dir to download them"
        )
    if verify:
        for remote in files:
            if sha256_file(paths[remote.name]) != remote.sha256:
                raise DataError(
                    f"{dataset}: sha256 mismatch for {remote.name} in {folder}: it is not the official file; "
                    "download it again, or for another file in the same format --set data.verify=false"
                )
    return paths


def _offline_message(dataset: str, missing: Sequence[RemoteFile], cache: Path, exc: FetchError) -> str:
    """One line: why the download failed, what to get from where, and where to put it by hand."""
    reasons = ", ".join(dict.fromkeys(exc.failures.values())) or "no URL known"
    wanted = "; ".join(f"{r.name} ({', '.join(r.urls)})" for r in missing)
    return (
        f"{dataset}: no copy on disk and the download failed ({reasons}); get {wanted} and put the files "
        f"in {cache}, or pass --data-dir FOLDER holding them"
    )


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> Path:
    """Unpack a .tar(.gz) or .zip into `dest` (which must not exist), refusing any unsafe member.

    Members are checked before anything is written and land in a temporary folder beside `dest`,
    renamed into place only when all of them were written: a refusal or a failure leaves nothing.
    `keep(name)` false skips writing a member (it is still checked: the archive is refused as a whole).
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise DataError(f"{dest} already exists; remove it to extract {archive.name} again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extracting"))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would otherwise become dest's mode
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, keep)
        else:
            _extract_tar(archive, tmp, keep)
        os.replace(tmp, dest)
    except DataError as exc:  # an unsafe member: refuse the archive as a whole
        raise DataError(f"{exc}; nothing was unpacked: the archive is not safe, delete it and get the official one") from None
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())  # tarfile's "could not be opened" spans several lines
        raise DataError(f"cannot unpack {archive.name}: {detail}; delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_tar(archive: Path, root: Path, keep: Callable[[str], bool] | None) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise DataError(f"refused member '{m.name}' of {archive.name}: {_tar_kind(m)}, not a file")
            _member_path(root, m.name, archive)
        _write_members(root, archive, [(m.name, m.isdir(), lambda m=m: tar.extractfile(m)) for m in members
                                       if keep is None or keep(m.name)])


def _extract_zip(archive: Path, root: Path, keep: Callable[[str], bool] | None) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            kind_bits = stat.S_IFMT(info.external_attr >> 16)
            # zip keeps the Unix file type in the high bits; none at all means a plain file (DOS archives)
            if kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a symlink" if kind_bits == stat.S_IFLNK else "a special file"
                raise DataError(f"refused member '{info.filename}' of {archive.name}: {kind}, not a file")
            _member_path(root, info.filename, archive)
        _write_members(root, archive, [(i.filename, i.is_dir(), lambda i=i: zf.open(i)) for i in infos
                                       if keep is None or keep(i.filename)])


def _write_members(root: Path, archive: Path, members: list[tuple[str, bool, Callable[[], Any]]]) -> None:
    """Write (name, is_dir, open_contents) members under `root`; names were checked beforehand."""
    for name, is_dir, open_contents in members:
        target = _member_path(root, name, archive)
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_contents() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)


def _member_path(root: Path, name: str, archive: Path) -> Path:
    """Where a member goes under `root`; absolute names and `..` are refused, not rewritten."""
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DataError(f"refused member '{name}' of {archive.name}: its path leaves the folder")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        return root
    target = root.joinpath(PurePosixPath(*clean))
    if not target.resolve().is_relative_to(root.resolve()):
        raise DataError(f"refused member '{name}' of {archive.name}: its path leaves the folder")
    return target


_TAR_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
              tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a fifo"}


def _tar_kind(m: tarfile.TarInfo) -> str:
    """What a non-file tar member is, for the refusal message."""
    return _TAR_KINDS.get(m.type, "a special member")
