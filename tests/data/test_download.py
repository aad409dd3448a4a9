"""download.py against a loopback HTTP server and generated archives: verified fetches, mirrors,
dropped connections, the offline message, and archive members that try to escape their folder."""
from __future__ import annotations

import gzip
import hashlib
import io
import re
import socket
import struct
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import dlkit
from dlkit.config import DataCfg
from dlkit.data import download, idx, load_data
from dlkit.data.download import RemoteFile, cache_dir, fetch, locate, safe_extract, sha256_file
from dlkit.errors import DataError

GOOD = bytes(range(256)) * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<name>: ok serves the file, wrong other bytes, drop half of it and hangs up, slow one
    byte every 20 ms (until the client hangs up or the server stops), 404 not found."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        self.server.agents.append(self.headers.get("User-Agent"))
        mode, _, name = self.path.strip("/").partition("/")
        body = self.server.files.get(name)
        if mode == "missing" or body is None:
            self.send_error(404)
            return
        if mode == "wrong":
            body = b"x" * len(body)
        if mode == "slow":
            self._trickle(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if mode == "drop" else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "drop" else body)
        self.close_connection = True

    def _trickle(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(len(body)):
                if self.server.stopping.is_set():
                    break
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:  # the client gave up and hung up
            pass
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits, srv.agents, srv.stopping = {}, [], [], threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(30.0, srv.shutdown)  # bounded even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    yield srv
    watchdog.cancel()
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy_and_private_cache(tmp_path, monkeypatch):
    # a proxy from the environment would swallow loopback requests; the cache must not be the user's
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _parts(folder: Path) -> list[Path]:
    """Temporaries a download left behind (dlkit.files names them .<name>.<random>.tmp)."""
    return list(folder.glob(".*.tmp")) if folder.exists() else []


def test_cache_dir_follows_xdg_and_falls_back_to_home(tmp_path, monkeypatch):
    assert cache_dir("mnist") == tmp_path / "xdg" / "dlkit" / "datasets" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("cifar10") == tmp_path / "home" / ".cache" / "dlkit" / "datasets" / "cifar10"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir("cifar10") == tmp_path / "home" / ".cache" / "dlkit" / "datasets" / "cifar10"


def test_fetch_lands_a_verified_file_and_no_part(server, tmp_path):
    server.files["a.bin"] = GOOD
    path = fetch(RemoteFile("a.bin", _sha(GOOD), (f"{server.url}/ok/a.bin",), len(GOOD)), tmp_path / "d")
    assert path == tmp_path / "d" / "a.bin" and path.read_bytes() == GOOD
    assert sha256_file(path) == _sha(GOOD) and _parts(tmp_path / "d") == []


@pytest.mark.parametrize("first", ["wrong", "drop", "missing"])
def test_a_bad_mirror_is_skipped_for_the_next(server, tmp_path, first):
    server.files["a.bin"] = GOOD
    urls = (f"{server.url}/{first}/a.bin", f"{server.url}/ok/a.bin")
    path = fetch(RemoteFile("a.bin", _sha(GOOD), urls), tmp_path)
    assert path.read_bytes() == GOOD and server.hits == [f"/{first}/a.bin", "/ok/a.bin"]
    assert _parts(tmp_path) == []


@pytest.mark.parametrize("mode, reason", [("wrong", "sha256 mismatch"), ("drop", "connection dropped"),
                                          ("missing", "HTTP 404")])
def test_when_every_url_fails_nothing_is_left(server, tmp_path, mode, reason):
    server.files["a.bin"] = GOOD
    urls = (f"{server.url}/{mode}/a.bin", f"{server.url}/{mode}/a.bin")
    with pytest.raises(DataError, match=reason) as err:
        fetch(RemoteFile("a.bin", _sha(GOOD), urls), tmp_path)
    assert "a.bin" in str(err.value) and "\n" not in str(err.value)
    assert len(server.hits) == 2 and list(tmp_path.iterdir()) == []


def test_a_body_longer_than_the_known_size_is_cut_off(server, tmp_path):
    server.files["a.bin"] = GOOD
    with pytest.raises(DataError, match="more than the expected 10 bytes"):
        fetch(RemoteFile("a.bin", _sha(GOOD), (f"{server.url}/ok/a.bin",), 10), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_trickles_runs_into_the_deadline_and_the_next_url_is_tried(server, tmp_path):
    server.files["a.bin"] = GOOD  # 16,384 bytes: 330 s at one byte per 20 ms
    remote = RemoteFile("a.bin", _sha(GOOD), (f"{server.url}/slow/a.bin", f"{server.url}/ok/a.bin"), len(GOOD))
    start = time.monotonic()
    path = fetch(remote, tmp_path, timeout=5.0, deadline=0.3)
    assert time.monotonic() - start < 2.0
    assert path.read_bytes() == GOOD and server.hits == ["/slow/a.bin", "/ok/a.bin"] and _parts(tmp_path) == []
    with pytest.raises(DataError) as err:
        fetch(RemoteFile("a.bin", _sha(GOOD), (f"{server.url}/slow/a.bin",), len(GOOD)), tmp_path / "d", deadline=0.3)
    assert re.fullmatch(rf"could not download a\.bin from any of its URLs \({server.url}/slow/a\.bin: too slow: "
                        r"\d{1,2} of 16,384 bytes in the 0\.3 s allowed\)", str(err.value)), str(err.value)
    assert _parts(tmp_path / "d") == []


def test_the_default_deadline_grows_with_the_size_and_the_user_agent_names_no_invented_address(server, tmp_path):
    assert download.default_deadline(170498071) == pytest.approx(60 + 3409.96)  # CIFAR-10: about an hour
    assert download.default_deadline(28881) == pytest.approx(60.57762)
    assert download.default_deadline(None) == 3600.0
    server.files["a.bin"] = GOOD
    fetch(RemoteFile("a.bin", _sha(GOOD), (f"{server.url}/ok/a.bin",), len(GOOD)), tmp_path)
    version = ".".join(map(str, sys.version_info[:2]))
    assert server.agents == [f"dlkit/{dlkit.__version__} (Python-urllib/{version})"]


def test_locate_downloads_into_the_cache_once(server, tmp_path):
    server.files["a.bin"], server.files["b.bin"] = GOOD, GOOD[::-1]
    files = [RemoteFile(n, _sha(server.files[n]), (f"{server.url}/ok/{n}",)) for n in ("a.bin", "b.bin")]
    paths = locate("toy", files, DataCfg(name="toy"))
    cache = tmp_path / "xdg" / "dlkit" / "datasets" / "toy"
    assert paths == {"a.bin": cache / "a.bin", "b.bin": cache / "b.bin"}
    assert paths["b.bin"].read_bytes() == GOOD[::-1] and _parts(cache) == []
    assert locate("toy", files, DataCfg(name="toy")) == paths and len(server.hits) == 2  # no new request


def test_offline_is_one_line_naming_files_their_first_address_and_folders(tmp_path):
    dead = _closed_port_url()
    files = [RemoteFile(n, "0" * 64, (f"{dead}/x/{n}", f"{dead}/y/{n}")) for n in ("a.gz", "b.gz")]
    with pytest.raises(DataError) as err:
        locate("toy", files, DataCfg(name="toy"))
    cache = tmp_path / "xdg" / "dlkit" / "datasets" / "toy"
    assert re.fullmatch(rf"toy: no copy on disk and the download failed \(.*[Cc]onnection refused\); get a\.gz, b\.gz "
                        rf"\(from {dead}/x/\) and put them in {cache}, or pass --data-dir FOLDER holding them", str(err.value))
    # a failed download leaves no empty cache folder (nor dlkit/ or datasets/ above it) behind
    assert not (tmp_path / "xdg").exists()


def test_a_failed_download_keeps_folders_that_existed_or_hold_files(tmp_path):
    dead = _closed_port_url()
    remote = RemoteFile("a.gz", "0" * 64, (f"{dead}/a.gz",))
    (tmp_path / "xdg" / "dlkit").mkdir(parents=True)
    with pytest.raises(DataError):
        fetch(remote, cache_dir("toy"), timeout=5)
    assert [p.name for p in (tmp_path / "xdg").iterdir()] == ["dlkit"] and not any((tmp_path / "xdg" / "dlkit").iterdir())
    cache_dir("toy").mkdir(parents=True)
    (cache_dir("toy") / "other.gz").write_bytes(b"kept")
    with pytest.raises(DataError):
        fetch(remote, cache_dir("toy"), timeout=5)
    assert [p.name for p in cache_dir("toy").iterdir()] == ["other.gz"]


def test_dlkit_run_mnist_offline_is_one_short_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from dlkit.cli import main

    dead = _closed_port_url()
    table = tuple(RemoteFile(r.name, r.sha256, (f"{dead}/mnist/{r.name}", f"{dead}/mirror/{r.name}"), r.size)
                  for r in idx.FILES["mnist"])
    monkeypatch.setitem(idx.FILES, "mnist", table)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "mnist-cnn", "--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    names = re.escape(", ".join(r.name for r in table))
    assert re.fullmatch(rf"error: mnist: no copy on disk and the download failed \(.*\); get {names} \(from {dead}/mnist/\) "
                        rf"and put them in {cache_dir('mnist')}, or pass --data-dir FOLDER holding them\n", err)
    assert "/mirror/" not in err  # the mirrors are in the README
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no xdg/dlkit/datasets/mnist, no runs/


def test_data_dir_files_must_be_present_and_official(tmp_path):
    (tmp_path / "a.gz").write_bytes(GOOD)
    files = [RemoteFile("a.gz", _sha(GOOD), ()), RemoteFile("b.gz", _sha(GOOD), ())]
    with pytest.raises(DataError, match=r"b\.gz not found in .*; put the official files there"):
        locate("toy", files, DataCfg(name="toy", data_dir=str(tmp_path)))
    (tmp_path / "b.gz").write_bytes(GOOD[:-1])
    with pytest.raises(DataError, match=r"sha256 mismatch for b\.gz .*--set data\.verify=false"):
        locate("toy", files, DataCfg(name="toy", data_dir=str(tmp_path)))
    paths = locate("toy", files, DataCfg(name="toy", data_dir=str(tmp_path), verify=False))
    assert paths == {"a.gz": tmp_path / "a.gz", "b.gz": tmp_path / "b.gz"}
    with pytest.raises(DataError, match="does not exist"):
        locate("toy", files, DataCfg(name="toy", data_dir=str(tmp_path / "nope")))


def test_a_corrupt_cached_file_is_reported_not_used(tmp_path):
    cache = cache_dir("toy")
    cache.mkdir(parents=True)
    (cache / "a.gz").write_bytes(b"junk")
    files = [RemoteFile("a.gz", _sha(GOOD), ())]
    with pytest.raises(DataError, match="sha256 mismatch for a.gz .*delete it to download it again"):
        locate("toy", files, DataCfg(name="toy"))
    assert locate("toy", files, DataCfg(name="toy", verify=False))["a.gz"].read_bytes() == b"junk"


def _idx(magic: int, arr: np.ndarray) -> bytes:
    return gzip.compress(struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes())


def test_mnist_downloads_through_its_table_then_loads(server, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    sets = {"train": (rng.integers(0, 255, (30, 28, 28)), np.arange(30) % 10),
            "t10k": (rng.integers(0, 255, (10, 28, 28)), np.arange(10) % 10)}
    table = []
    for split, (x, y) in sets.items():
        for kind, magic, arr in (("images-idx3", 0x803, x), ("labels-idx1", 0x801, y)):
            name = f"{split}-{kind}-ubyte.gz"
            server.files[name] = _idx(magic, arr)
            urls = (f"{server.url}/missing/{name}", f"{server.url}/ok/{name}")
            table.append(RemoteFile(name, _sha(server.files[name]), urls))
    monkeypatch.setitem(idx.FILES, "mnist", tuple(table))
    bundle = load_data(DataCfg(name="mnist"), seed=0)
    assert len(bundle.train) + len(bundle.val) == 30 and len(bundle.test) == 10
    assert bundle.test.y.tolist() == list(range(10))
    assert sorted(p.name for p in cache_dir("mnist").iterdir()) == sorted(r.name for r in table)


# --- safe_extract -------------------------------------------------------------------------------


def _tar(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"hello") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if m.isfile():
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
            else:
                tar.addfile(m)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


def test_a_good_tar_and_zip_extract_into_place(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [_info("top", tarfile.DIRTYPE), _info("top/x.txt"), _info("./y.txt")])
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "top" / "x.txt").read_bytes() == b"hello" and (out / "y.txt").read_bytes() == b"hello"
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("d/z.txt", "zip")
    assert (safe_extract(tmp_path / "a.zip", tmp_path / "zout") / "d" / "z.txt").read_text() == "zip"
    with pytest.raises(DataError, match="already exists"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "a.zip", "out", "zout"]


def test_keep_skips_members_but_an_unsafe_skipped_member_still_refuses_the_archive(tmp_path):
    members = [_info("top/a.txt"), _info("top/skip", tarfile.DIRTYPE), _info("top/skip/b.txt")]
    archive = _tar(tmp_path / "a.tar.gz", members)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for name in ("top/a.txt", "top/skip/b.txt"):
            zf.writestr(name, "hello")
    for path in (archive, tmp_path / "a.zip"):
        out = safe_extract(path, tmp_path / f"out-{path.suffix}", keep=lambda name: not name.startswith("top/skip"))
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["top", "top/a.txt"]
    evil = _tar(tmp_path / "evil.tar.gz", [_info("top/a.txt"), _info("top/skip/../../../evil")])
    with pytest.raises(DataError, match="refused member 'top/skip/../../../evil'"):
        safe_extract(evil, tmp_path / "never", keep=lambda name: not name.startswith("top/skip"))
    assert not (tmp_path / "never").exists() and not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("bad, why", [
    (_info("../evil"), "its path leaves the folder"),
    (_info("ok/../../evil"), "its path leaves the folder"),
    (_info("/abs/evil"), "its path leaves the folder"),
    (_info("link", tarfile.SYMTYPE, "/etc/passwd"), "a symlink"),
    (_info("hard", tarfile.LNKTYPE, "top/x.txt"), "a hard link"),
    (_info("dev", tarfile.CHRTYPE), "a device"),
    (_info("pipe", tarfile.FIFOTYPE), "a fifo"),
])
def test_unsafe_tar_members_are_refused_and_nothing_is_left(tmp_path, bad, why):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar(tmp_path / "bad.tar.gz", [_info("top/x.txt"), bad])
    with pytest.raises(DataError, match=f"refused member '{bad.name}' of bad.tar.gz: {why}"):
        safe_extract(archive, work / "dest")
    assert list(work.iterdir()) == [] and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "work"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs.txt", "a/../../evil.txt", "..\\evil.txt", "C:/evil.txt"])
def test_zip_slip_is_refused(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(DataError, match="leaves the folder"):
        safe_extract(tmp_path / "bad.zip", work / "dest")
    assert list(work.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="refused member 'link' of bad.zip: a symlink"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_corrupt_archive_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(b"not a tar at all" * 100)[:50])
    with pytest.raises(DataError, match="cannot unpack bad.tar.gz: .*delete it and download it again"):
        safe_extract(tmp_path / "bad.tar.gz", tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_no_url_override_environment_variable_exists():
    source = Path(download.__file__).read_text() + Path(idx.__file__).read_text()
    assert "DLKIT_DATA_URL_OVERRIDE" not in source
