"""IMDb reviews from generated archives and folders in the official aclImdb layout: cleaning, order,
the archive's sha256, unsafe or corrupt archives, extracted folders, download and the offline message."""
from __future__ import annotations

import importlib.util
import shutil
import tarfile
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dlkit.config import DataCfg
from dlkit.data import imdb
from dlkit.data.download import RemoteFile, cache_dir
from dlkit.data.imdb import Review, clean_review, read_imdb
from dlkit.errors import DataError

_spec = importlib.util.spec_from_file_location("imdb_layout", Path(__file__).parents[1] / "imdb_layout.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)

# sample_reviews(), cleaned, in (label, id) order: ids sort as numbers, train/unsup is left out
EXPECTED = {
    "train": [
        Review('Story of a man who has unnatural feelings for a pig. "Awful"', "neg", 3, 1),
        Review("\u65e5\u672c\u8a9e? No: just bad. 1/10", "neg", 1, 10),
        Review("Bromwell High is a cartoon comedy. It ran at the same time.", "pos", 9, 0),
        Review("Good, not great. Worth a look.", "pos", 7, 3),
        Review("Caf\u00e9 scenes & a score by Ennio Morricone \u2014 superb!", "pos", 10, 12),
    ],
    "test": [
        Review("Once again Mr. Costner has dragged out a movie for far longer than necessary.", "neg", 2, 0),
        Review("This is an example of why the majority of action films are the same. Generic.", "neg", 4, 5),
        Review("I went and saw this movie last night <3", "pos", 10, 0),
        Review("Actor turned director Bill Paxton follows up his promising debut.", "pos", 8, 2),
    ],
}


@pytest.fixture(autouse=True)
def _private_cache_no_proxy(tmp_path, monkeypatch):
    # the cache must not be the user's; a proxy from the environment would swallow loopback requests
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def archive(tmp_path) -> tuple[Path, str]:
    """The sample reviews as aclImdb_v1.tar.gz in its own folder, and its sha256."""
    path = tmp_path / "d" / imdb.ARCHIVE.name
    return path, layout.write_imdb_archive(path, layout.sample_reviews())


@pytest.fixture
def official(archive, monkeypatch) -> Path:
    """The generated archive, with its digest taken as the official one."""
    path, digest = archive
    monkeypatch.setattr(imdb, "ARCHIVE", RemoteFile(imdb.ARCHIVE.name, digest, imdb.ARCHIVE.urls))
    return path


class _Handler(BaseHTTPRequestHandler):
    """GET /aclImdb_v1.tar.gz serves the server's body; anything else is 404."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        if self.path != f"/{imdb.ARCHIVE.name}":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.body, srv.hits = True, b"", []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _unpacked_folders() -> list[str]:
    """What the imdb cache holds besides a cached archive: extractions, finished or not."""
    cache = cache_dir("imdb")
    return sorted(p.name for p in cache.iterdir() if p.name != imdb.ARCHIVE.name) if cache.exists() else []


def _error(cfg: DataCfg) -> str:
    """read_imdb's DataError message, checked to be one line."""
    with pytest.raises(DataError) as err:
        read_imdb(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("imdb: ")
    return message


@pytest.mark.parametrize("raw, text", [
    ("A<br /><br />B", "A B"),
    ("A<br/>B<BR>C<br  />D<br />", "A B C D"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("&quot;Hi&quot; &#8212; &lt;3 &eacute;t&eacute;", '"Hi" \u2014 <3 \u00e9t\u00e9'),
    ("  two\tspaced\n lines&nbsp;here ", "two spaced lines here"),
    ("&lt;br /&gt; written out stays", "<br /> written out stays"),
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),
])
def test_clean_review(raw, text):
    assert clean_review(raw) == text


@pytest.mark.parametrize("where", ["the archive itself", "its folder"])
def test_the_official_archive_in_data_dir_is_read_in_order_without_unsup(official, where):
    data_dir = official if where == "the archive itself" else official.parent
    assert read_imdb(DataCfg(name="imdb", data_dir=str(data_dir))) == EXPECTED
    digest = imdb.ARCHIVE.sha256
    assert _unpacked_folders() == [f"aclImdb-{digest[:12]}"]
    unpacked_root = cache_dir("imdb") / f"aclImdb-{digest[:12]}" / "aclImdb"
    # the 50,000 unlabelled reviews are never read, so they are not unpacked either; the rest is as shipped
    assert sorted(p.name for p in (unpacked_root / "train").iterdir()) == [
        "labeledBow.feat", "neg", "pos", "urls_neg.txt", "urls_pos.txt", "urls_unsup.txt"]
    assert (unpacked_root / "README").is_file() and (unpacked_root / "imdb.vocab").is_file()


def test_the_cached_archive_is_unpacked_once_and_reused(official, monkeypatch, never_download):
    cache_dir("imdb").mkdir(parents=True)
    shutil.copy(official, cache_dir("imdb") / imdb.ARCHIVE.name)
    assert read_imdb(DataCfg(name="imdb")) == EXPECTED

    def refuse(*args):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(imdb, "safe_extract", refuse)
    assert read_imdb(DataCfg(name="imdb")) == EXPECTED
    assert _unpacked_folders() == [f"aclImdb-{imdb.ARCHIVE.sha256[:12]}"]


def test_an_extraction_another_process_finished_first_is_used(official, monkeypatch):
    real_extract = imdb.safe_extract

    def lose_the_race(archive, dest, keep=None, limits=imdb.LIMITS):
        real_extract(archive, dest, keep, limits)  # the other process (a torchrun rank) renames its copy into place first
        real_extract(archive, dest, keep, limits)

    monkeypatch.setattr(imdb, "safe_extract", lose_the_race)
    assert read_imdb(DataCfg(name="imdb", data_dir=str(official))) == EXPECTED


def test_another_archive_under_the_same_name_is_not_read_from_a_stale_extraction(tmp_path):
    path = tmp_path / "d" / imdb.ARCHIVE.name
    cfg = DataCfg(name="imdb", data_dir=str(path.parent), verify=False)
    first = layout.write_imdb_archive(path, layout.sample_reviews())
    assert read_imdb(cfg) == EXPECTED
    second = layout.write_imdb_archive(path, {"train/pos/7_8.txt": "New.", "train/neg/7_2.txt": "Old.",
                                              "test/pos/1_9.txt": "Yes.", "test/neg/1_1.txt": "No."})
    assert read_imdb(cfg) == {"train": [Review("Old.", "neg", 2, 7), Review("New.", "pos", 8, 7)],
                              "test": [Review("No.", "neg", 1, 1), Review("Yes.", "pos", 9, 1)]}
    assert _unpacked_folders() == sorted([f"aclImdb-{first[:12]}", f"aclImdb-{second[:12]}"])


@pytest.mark.parametrize("where", ["data_dir", "cache"])
def test_a_tampered_archive_is_refused_before_anything_is_unpacked(official, where):
    data = bytearray(official.read_bytes())
    data[len(data) // 2] ^= 0x01
    if where == "cache":
        cache_dir("imdb").mkdir(parents=True)
        official = cache_dir("imdb") / imdb.ARCHIVE.name
    official.write_bytes(bytes(data))
    message = _error(DataCfg(name="imdb", data_dir=str(official.parent) if where == "data_dir" else None))
    assert "sha256 mismatch for aclImdb_v1.tar.gz" in message and "data.verify=false" in message
    assert _unpacked_folders() == []


def test_verify_false_reads_an_archive_that_is_not_the_official_one(archive):
    path, digest = archive
    assert "sha256 mismatch" in _error(DataCfg(name="imdb", data_dir=str(path)))
    assert read_imdb(DataCfg(name="imdb", data_dir=str(path), verify=False)) == EXPECTED
    assert _unpacked_folders() == [f"aclImdb-{digest[:12]}"]


@pytest.mark.parametrize("kind", ["dot-dot", "absolute", "symlink"])
def test_an_archive_member_leaving_its_folder_is_refused_and_nothing_is_written(tmp_path, kind):
    outside = tmp_path / "evil.txt"
    names = {"dot-dot": "aclImdb/../../evil.txt", "absolute": str(outside), "symlink": "aclImdb/train/pos/9_9.txt"}
    member = tarfile.TarInfo(names[kind])
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, str(outside)
    path = tmp_path / "d" / imdb.ARCHIVE.name
    layout.write_imdb_archive(path, layout.sample_reviews(), extra_members=[(member, b"evil")])
    message = _error(DataCfg(name="imdb", data_dir=str(path), verify=False))
    assert f"refused member '{names[kind]}'" in message
    assert list(tmp_path.rglob("*evil*")) == [] and _unpacked_folders() == []


def _invalid_block_inside(tar_path: Path, member: str) -> bytes:
    """A gzip stream of the tar 32 KiB into `member`'s data, then an invalid deflate block.

    Past the 8 KiB that reading its header buffers, so that tarfile lets zlib's own error through.
    """
    with tarfile.open(tar_path) as tar:
        cut = tar.getmember(f"aclImdb/{member}").offset_data + 32768
    deflate = zlib.compressobj(wbits=31)  # 31: gzip framing
    return deflate.compress(tar_path.read_bytes()[:cut]) + deflate.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 64


@pytest.mark.parametrize("damage", ["truncated", "garbage after the header", "invalid block inside a review"])
def test_a_corrupt_gzip_is_a_one_line_error_and_leaves_nothing(tmp_path, damage):
    path = tmp_path / "d" / imdb.ARCHIVE.name
    reviews = {**layout.sample_reviews(), "train/pos/50_8.txt": "A long review. " * 4000}
    layout.write_imdb_archive(path, reviews)
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage after the header":
        data = data[:10] + bytes(range(256)) * 4
    else:
        layout.write_imdb_archive(tmp_path / "plain.tar", reviews, gz=False)
        data = _invalid_block_inside(tmp_path / "plain.tar", "train/pos/50_8.txt")
    path.write_bytes(data)
    message = _error(DataCfg(name="imdb", data_dir=str(path), verify=False))
    assert "cannot unpack aclImdb_v1.tar.gz" in message and "download it again" in message
    assert _unpacked_folders() == []


def test_an_extracted_folder_and_its_parent_read_like_the_archive(tmp_path, archive, never_download):
    from_archive = read_imdb(DataCfg(name="imdb", data_dir=str(archive[0]), verify=False))
    top = layout.write_imdb_folder(tmp_path / "x", layout.sample_reviews())
    (top / "train" / "pos" / ".DS_Store").write_bytes(b"\x00\x01")  # what a Finder window leaves behind
    for data_dir in (top, top.parent):  # verify stays on: text needs no digest, nothing is unpickled
        assert read_imdb(DataCfg(name="imdb", data_dir=str(data_dir))) == from_archive == EXPECTED


def test_missing_folders_are_named(tmp_path, never_download):
    reviews = {name: text for name, text in layout.sample_reviews().items() if not name.startswith("test/")}
    top = layout.write_imdb_folder(tmp_path / "x", reviews)
    assert "lacks test/neg, test/pos of the aclImdb layout" in _error(DataCfg(name="imdb", data_dir=str(top)))
    (tmp_path / "empty").mkdir()
    message = _error(DataCfg(name="imdb", data_dir=str(tmp_path / "empty")))
    assert "neither aclImdb_v1.tar.gz nor an extracted aclImdb folder" in message
    assert "does not exist" in _error(DataCfg(name="imdb", data_dir=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("name, raw, complaint", [
    ("train/pos/review.txt", "A fine film.", "is not an <id>_<rating>.txt review file"),
    ("train/neg/4_2.txt", b"Bad \xff\xfe bytes", "is not UTF-8 text (byte 4)"),
])
def test_a_bad_review_file_is_named(tmp_path, name, raw, complaint):
    path = tmp_path / "d" / imdb.ARCHIVE.name
    layout.write_imdb_archive(path, {**layout.sample_reviews(), name: raw})
    message = _error(DataCfg(name="imdb", data_dir=str(path), verify=False))
    assert f"{Path(name)} {complaint}" in message


def test_the_archive_is_downloaded_into_the_cache_and_read(archive, server, monkeypatch):
    path, digest = archive
    server.body = path.read_bytes()
    remote = RemoteFile(imdb.ARCHIVE.name, digest, (f"{server.url}/{imdb.ARCHIVE.name}",), len(server.body))
    monkeypatch.setattr(imdb, "ARCHIVE", remote)
    assert read_imdb(DataCfg(name="imdb")) == EXPECTED
    assert (cache_dir("imdb") / "aclImdb_v1.tar.gz").read_bytes() == server.body
    assert server.hits == ["/aclImdb_v1.tar.gz"] and _unpacked_folders() == [f"aclImdb-{digest[:12]}"]


def test_offline_the_message_says_what_to_get_and_where_to_put_it(monkeypatch):
    url = "http://127.0.0.1:1/aclImdb_v1.tar.gz"
    monkeypatch.setattr(imdb, "ARCHIVE", RemoteFile(imdb.ARCHIVE.name, imdb.ARCHIVE.sha256, (url,)))
    message = _error(DataCfg(name="imdb"))
    assert "no copy on disk and the download failed" in message
    assert f"get aclImdb_v1.tar.gz ({url})" in message and str(cache_dir("imdb")) in message
    assert _unpacked_folders() == []
