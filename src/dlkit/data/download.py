"""Official data files: find them on disk or download them, sha256-checked, and unpack archives
without letting a member land outside its folder."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from dlkit import __version__
from dlkit.config import DataCfg
from dlkit.errors import DataError
from dlkit.files import sha256_file, write_atomic

_CHUNK = 1 << 20
_USER_AGENT = f"dlkit/{__version__} (Python-urllib/{sys.version_info.major}.{sys.version_info.minor})"
# A download's whole-file deadline: a minute, plus the file's size at 50 kB/s (a slow DSL line; CIFAR-10's
# 170 MB gets an hour). `timeout` bounds each read; a server that trickles a byte per read would pass it.
DEADLINE_BASE_S = 60.0
SLOWEST_BYTES_PER_S = 50_000
DEADLINE_UNKNOWN_SIZE_S = 3600.0
# Unpacking: the most one member, all written members together, and the member count may reach.
# A few-MB archive of zeros can inflate a thousandfold; callers pass limits fitted to their data set.
MAX_MEMBER_BYTES = 1 << 30
MAX_TOTAL_BYTES = 4 << 30
MAX_MEMBERS = 200_000


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


def default_deadline(size: int | None) -> float:
    """Seconds a whole download of `size` bytes may take before the next URL is tried."""
    return DEADLINE_UNKNOWN_SIZE_S if size is None else DEADLINE_BASE_S + size / SLOWEST_BYTES_PER_S


def fetch(remote: RemoteFile, dest_dir: Path, timeout: float = 30.0, deadline: float | None = None) -> Path:
    """Download `remote` into dest_dir, trying each URL in turn; only a verified file keeps its name.

    `timeout` bounds each wait for the server, `deadline` (default: `default_deadline(remote.size)`)
    each URL's whole download; a URL that runs past it fails and the next one is tried.
    """
    created = _make_dirs(dest_dir)
    limit = default_deadline(remote.size) if deadline is None else deadline
    failures: dict[str, str] = {}
    for url in remote.urls:
        try:
            return _fetch_one(url, remote, dest_dir, timeout, limit)
        except (OSError, http.client.HTTPException, ValueError, DataError) as exc:
            failures[url] = _reason(exc)
    _remove_empty(created)  # a failed download leaves no empty cache folder behind
    raise FetchError(remote.name, failures)


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, deepest first."""
    created = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process put a file there) or already gone
            return


class FetchError(DataError):
    """Every URL of a file failed; `failures` maps each URL to why."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.failures = failures
        detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
        super().__init__(f"could not download {name} from any of its URLs ({detail or 'none given'})")


def _fetch_one(url: str, remote: RemoteFile, dest_dir: Path, timeout: float, deadline: float) -> Path:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("only http and https URLs are fetched")

    def stream(out: BinaryIO) -> None:
        h, received = hashlib.sha256(), 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        end = time.monotonic() + deadline
        with urllib.request.urlopen(request, timeout=min(timeout, deadline)) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            # read1 returns what has arrived (read(n) waits for all n bytes), so the deadline is checked
            # after every packet; it is overrun by at most one `timeout`
            while chunk := resp.read1(_CHUNK):
                if time.monotonic() > end:
                    of = f" of {expected:,}" if expected is not None else ""
                    raise DataError(f"too slow: {received + len(chunk):,}{of} bytes in the {deadline:g} s allowed")
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

    # streamed into a unique temporary beside the target (two torchrun ranks never share one), which
    # only a complete, verified download replaces the target with
    return write_atomic(dest_dir / remote.name, stream)


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
    """One line: why the download failed, which files to get (from their first address; the mirrors
    are in the README), where to put them, and --data-dir."""
    reasons = ", ".join(dict.fromkeys(exc.failures.values())) or "no URL known"
    return (f"{dataset}: no copy on disk and the download failed ({reasons}); get {_wanted(missing)} and put "
            f"{'it' if len(missing) == 1 else 'them'} in {cache}, or pass --data-dir FOLDER holding them")


def _wanted(missing: Sequence[RemoteFile]) -> str:
    """`a.gz (URL)` for one file; `a.gz, b.gz (from BASE/)` when their first addresses share a folder."""
    firsts = [r.urls[0] if r.urls else "" for r in missing]
    bases = {url.rsplit("/", 1)[0] + "/" for url in firsts}
    if len(missing) > 1 and len(bases) == 1 and all(u.endswith("/" + r.name) for u, r in zip(firsts, missing)):
        return f"{', '.join(r.name for r in missing)} (from {bases.pop()})"
    return ", ".join(f"{r.name} ({url})" if url else r.name for r, url in zip(missing, firsts))


@dataclass(frozen=True)
class ExtractLimits:
    """How much an archive may unpack to: bytes of one member, of all written members, and members."""

    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    members: int = MAX_MEMBERS


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool] | None = None,
                 limits: ExtractLimits = ExtractLimits()) -> Path:
    """Unpack a .tar(.gz) or .zip into `dest` (which must not exist), refusing any unsafe member.

    Members are checked before anything is written and land in a temporary folder beside `dest`,
    renamed into place only when all of them were written: a refusal or a failure leaves nothing.
    `keep(name)` false skips writing a member (it is still checked: the archive is refused as a whole).
    A member whose declared size, or whose bytes as they inflate, pass `limits` refuses the archive.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise DataError(f"{dest} already exists; remove it to extract {archive.name} again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extracting"))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would otherwise become dest's mode
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, keep, limits)
        else:
            _extract_tar(archive, tmp, keep, limits)
        os.replace(tmp, dest)
    except DataError as exc:  # an unsafe member: refuse the archive as a whole
        raise DataError(f"{exc}; nothing was unpacked: the archive is not safe, delete it and get the official one") from None
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())  # tarfile's "could not be opened" spans several lines
        raise DataError(f"cannot unpack {archive.name}: {detail}; delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_tar(archive: Path, root: Path, keep: Callable[[str], bool] | None, limits: ExtractLimits) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = []
        for m in tar:  # each header is checked before the next is read: a huge member is never inflated
            if len(members) == limits.members:
                raise DataError(f"refused {archive.name}: more than {limits.members:,} members")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"refused member '{m.name}' of {archive.name}: {_tar_kind(m)}, not a file")
            _member_path(root, m.name, archive)
            _check_size(m.name, m.size if m.isfile() else 0, archive, limits)
            members.append(m)
        _write_members(root, archive, [(m.name, m.isdir(), lambda m=m: tar.extractfile(m)) for m in members
                                       if keep is None or keep(m.name)], limits)


def _extract_zip(archive: Path, root: Path, keep: Callable[[str], bool] | None, limits: ExtractLimits) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.members:
            raise DataError(f"refused {archive.name}: more than {limits.members:,} members")
        for info in infos:
            kind_bits = stat.S_IFMT(info.external_attr >> 16)
            # zip keeps the Unix file type in the high bits; none at all means a plain file (DOS archives)
            if kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a symlink" if kind_bits == stat.S_IFLNK else "a special file"
                raise DataError(f"refused member '{info.filename}' of {archive.name}: {kind}, not a file")
            _member_path(root, info.filename, archive)
            _check_size(info.filename, info.file_size, archive, limits)
        _write_members(root, archive, [(i.filename, i.is_dir(), lambda i=i: zf.open(i)) for i in infos
                                       if keep is None or keep(i.filename)], limits)


def _check_size(name: str, size: int, archive: Path, limits: ExtractLimits) -> None:
    """Refuse a member whose header declares more bytes than one member may hold."""
    if size > limits.member_bytes:
        raise DataError(f"refused member '{name}' of {archive.name}: it declares {size:,} bytes, more than "
                        f"the {limits.member_bytes:,} allowed")


def _write_members(root: Path, archive: Path, members: list[tuple[str, bool, Callable[[], Any]]],
                   limits: ExtractLimits) -> None:
    """Write (name, is_dir, open_contents) members under `root`; names and declared sizes were checked
    beforehand, and the bytes that actually inflate are counted too (a header can lie)."""
    total = 0
    for name, is_dir, open_contents in members:
        target = _member_path(root, name, archive)
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open_contents() as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                total += len(chunk)
                if written > limits.member_bytes:
                    raise DataError(f"refused member '{name}' of {archive.name}: it inflates past the "
                                    f"{limits.member_bytes:,} bytes allowed")
                if total > limits.total_bytes:
                    raise DataError(f"refused {archive.name}: its members inflate past the "
                                    f"{limits.total_bytes:,} bytes allowed in all")
                out.write(chunk)


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
