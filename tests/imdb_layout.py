"""The official aclImdb layout, generated: review files under aclImdb/{train,test}/{neg,pos} and
train/unsup, beside README, imdb.vocab, imdbEr.txt, urls_*.txt and labeledBow.feat, as a tar(.gz)
archive or an extracted folder. Load it by path (tests run under --import-mode=importlib)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

FOLDER = "aclImdb"


def sample_reviews() -> dict[str, str | bytes]:
    """A few raw reviews per folder, keyed by their path under aclImdb/, with the quirks of the real files."""
    return {
        "train/pos/0_9.txt": "Bromwell High is a cartoon comedy.<br /><br />It ran at the same time.",
        "train/pos/12_10.txt": "Caf\u00e9 scenes &amp; a score by Ennio Morricone &#8212; superb!",
        "train/pos/3_7.txt": "Good,  not   great.<br/>Worth a look. ",
        "train/neg/1_3.txt": "Story of a man who has unnatural feelings for a pig.<BR>&quot;Awful&quot;",
        "train/neg/10_1.txt": "\u65e5\u672c\u8a9e? No: just bad.<br /><br /><br />1/10",
        "train/unsup/0_0.txt": "An unlabelled review that must not be read.",
        "train/unsup/1_0.txt": "Another one.",
        "test/pos/0_10.txt": "I went and saw this movie last night &lt;3",
        "test/pos/2_8.txt": "Actor turned director Bill Paxton follows up his promising debut.",
        "test/neg/0_2.txt": "Once again Mr. Costner has dragged out a movie for far longer than necessary.",
        "test/neg/5_4.txt": "This is an example of why the majority of action films are the same.<br />Generic.",
    }


def official_files(reviews: Mapping[str, str | bytes]) -> dict[str, bytes]:
    """Every file of the layout under aclImdb/: the reviews plus the data set's other files."""
    files = {
        "README": b"Large Movie Review Dataset v1.0\n",
        "imdb.vocab": b"the\nand\na\nof\nto\n",
        "imdbEr.txt": b"0.0490972013402\n0.201363575849\n",
        **{f"{split}/labeledBow.feat": b"9 0:9 1:1\n" for split in ("train", "test")},
        **{f"{split}/urls_{label}.txt": b"http://www.imdb.com/title/tt0453418/usercomments\n"
           for split in ("train", "test") for label in ("neg", "pos")},
        "train/urls_unsup.txt": b"http://www.imdb.com/title/tt0018515/usercomments\n",
    }
    files.update({path: text.encode("utf-8") if isinstance(text, str) else text for path, text in reviews.items()})
    return files


def write_imdb_archive(path: Path, reviews: Mapping[str, str | bytes],
                       extra_members: Iterable[tuple[tarfile.TarInfo, bytes]] = (), gz: bool = True) -> str:
    """Write the layout as a tar (gz: tar.gz) with folder entries, then `extra_members`; return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = official_files(reviews)
    folders = sorted({str(Path(FOLDER, name).parent) for name in files} | {FOLDER})
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra_members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_imdb_folder(root: Path, reviews: Mapping[str, str | bytes]) -> Path:
    """Write the layout extracted under root (root/aclImdb/...); return root/aclImdb."""
    top = Path(root) / FOLDER
    for name, data in official_files(reviews).items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)
    return top
