"""The IMDb review data set (Maas et al. 2011) from the official aclImdb archive: 25,000 train and
25,000 test movie reviews labelled neg or pos, read from their text files after the archive's sha256
matched and it was unpacked, member by member checked, into the cache."""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlkit.config import DataCfg
from dlkit.data.download import ExtractLimits, RemoteFile, cache_dir, locate, safe_extract
from dlkit.errors import DataError
from dlkit.files import sha256_file

FOLDER = "aclImdb"
SPLITS = ("train", "test")
LABELS = ("neg", "pos")  # train/unsup (50,000 unlabelled reviews) is not read
UNREAD = "aclImdb/train/unsup"  # ... nor unpacked: the unsup/ folder and unsupBow.feat (a third of the archive)

# sha256 and size as TensorFlow Datasets records them (url_checksums/imdb_reviews.txt)
ARCHIVE = RemoteFile(
    "aclImdb_v1.tar.gz",
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
    # the https address, then the http one TFDS also lists: the same bytes, checked by the sha256 either way
    ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
     "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"),
    84125825,
)

# the official archive unpacks ~100,000 members; its largest, train/unsupBow.feat, is tens of MB and
# what is written (unsup/ left out) about 200 MB: a member past 256 MiB or 1 GiB in all is not IMDb
LIMITS = ExtractLimits(member_bytes=256 << 20, total_bytes=1 << 30, members=200_000)

_REVIEW_NAME = re.compile(r"(\d+)_(\d+)\.txt")
_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_ADVICE = f"point --data-dir at the official {ARCHIVE.name} or a complete extracted {FOLDER} folder"


@dataclass(frozen=True)
class Review:
    """One review: its cleaned text, its folder's label, and the rating and id from its file name."""

    text: str
    label: str  # "neg" or "pos"
    rating: int  # stars out of 10: 1-4 in neg, 7-10 in pos
    id: int


def clean_review(raw: str) -> str:
    """The review as plain text: <br /> line breaks become spaces, entities are unescaped, whitespace collapsed."""
    return " ".join(html.unescape(_LINE_BREAK.sub(" ", raw)).split())


def read_imdb(cfg: DataCfg) -> dict[str, list[Review]]:
    """The official train and test reviews, each sorted by (label, id), from cfg.data_dir or the cache."""
    root = _extracted_folder(cfg)
    if root is None:
        archive = locate("imdb", (ARCHIVE,), cfg)[ARCHIVE.name]  # sha256-checked when cfg.verify
        root = unpacked(archive, ARCHIVE.sha256 if cfg.verify else sha256_file(archive)) / FOLDER
    missing = [f"{split}/{label}" for split in SPLITS for label in LABELS if not (root / split / label).is_dir()]
    if missing:
        raise DataError(f"imdb: {root} lacks {', '.join(missing)} of the {FOLDER} layout; {_ADVICE}")
    return {split: read_split(root / split) for split in SPLITS}


def is_verified(cfg: DataCfg) -> bool:
    """Whether read_imdb(cfg) read the official archive's checked bytes: verify on and no extracted folder
    (whose files have no published digests) in its place."""
    return cfg.verify and _extracted_folder(cfg) is None


def _extracted_folder(cfg: DataCfg) -> Path | None:
    """An extracted aclImdb folder at or inside cfg.data_dir, when no archive is there (the archive wins)."""
    if not cfg.data_dir:
        return None
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir() or (root / ARCHIVE.name).is_file():
        return None  # locate() reads the archive, or says the folder does not exist
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if any((root / split).is_dir() for split in SPLITS):
        return root
    raise DataError(f"imdb: neither {ARCHIVE.name} nor an extracted {FOLDER} folder in {root}; "
                    f"{_ADVICE}, or drop --data-dir to download it")


def unpacked(archive: Path, digest: str) -> Path:
    """The archive unpacked under the cache on first use, in a folder named by its sha256 so no other reuses it."""
    dest = cache_dir("imdb") / f"{FOLDER}-{digest[:12]}"
    if dest.is_dir():
        return dest  # safe_extract renames into place only after every member was written
    try:
        safe_extract(archive, dest, keep=lambda name: not name.lstrip("./").startswith(UNREAD), limits=LIMITS)
    except DataError as exc:
        if not dest.is_dir():  # another process (a torchrun rank) may have unpacked it first
            raise DataError(f"imdb: {exc}") from None
    return dest


def read_split(folder: Path) -> list[Review]:
    """The neg and pos reviews of one split folder, sorted by (label, id)."""
    reviews = [review for label in LABELS for review in _read_label(folder / label, label)]
    return sorted(reviews, key=lambda r: (r.label, r.id, r.rating))


def _read_label(folder: Path, label: str) -> list[Review]:
    """Every <id>_<rating>.txt review in one label folder; hidden files (.DS_Store) are passed over."""
    reviews = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            match = _REVIEW_NAME.fullmatch(entry.name)
            if match is None or not entry.is_file():
                raise DataError(f"imdb: {entry.path} is not an <id>_<rating>.txt review file; "
                                f"remove it or {_ADVICE}")
            with open(entry.path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"imdb: {entry.path} is not UTF-8 text (byte {exc.start}); {_ADVICE}") from None
            reviews.append(Review(clean_review(text), label, int(match[2]), int(match[1])))
    return reviews
