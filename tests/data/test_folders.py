from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlkit.config import DataCfg
from dlkit.data import DATASETS, data_shape, load_data
from dlkit.data.split import part_sizes
from dlkit.errors import DataError

COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220), "eel": (30, 220, 30)}


def write(path: Path, img: Image.Image, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


def tree(root: Path, per_class: int = 10, classes=("cat", "dog"), size=(12, 12), suffix=".png") -> Path:
    """Class folders of solid-colour images with a little per-image noise."""
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(per_class):
            px = np.clip(np.array(COLOURS[c]) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
            write(root / c / f"{i:02d}{suffix}", Image.fromarray(px.astype(np.uint8)))
    return root


def cfg(path, **kw) -> DataCfg:
    return DataCfg(name=kw.pop("name", "image_folder"), path=str(path), **kw)


def test_class_folders_are_split_stratified_and_seeded(tmp_path):
    root = tree(tmp_path / "pets", classes=("cat", "dog", "eel"))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    write(root / "dog" / "more" / "x.png", Image.new("RGB", (12, 12), COLOURS["dog"]))  # nested: included
    b = load_data(cfg(root), seed=0)
    assert b.classes == ["cat", "dog", "eel"] and b.task == "multiclass" and b.input_shape == (3, 12, 12)
    assert [len(b.train), len(b.val), len(b.test)] == part_sizes(31, (0.7, 0.1, 0.2))
    assert b.meta["skipped"] == {"count": 0, "files": []}
    assert b.preprocessing["size"] == [12, 12] and b.train.x.dtype == torch.float32
    # labels follow the folders: the dominant channel is the class colour
    dominant = b.train.x.mean((2, 3)).argmax(1)
    assert torch.equal(dominant, torch.tensor([0, 2, 1])[b.train.y])
    again = load_data(cfg(root), seed=0)
    assert again.fingerprint() == b.fingerprint()
    assert load_data(cfg(root), seed=1).fingerprint() != b.fingerprint()
    shape = data_shape(cfg(root))
    assert (shape.input_shape, shape.num_classes, shape.task) == ((3, 12, 12), 3, "multiclass")


def test_given_train_val_test_folders_are_used_as_given(tmp_path):
    tree(tmp_path / "d" / "train", per_class=6)
    tree(tmp_path / "d" / "val", per_class=2)
    tree(tmp_path / "d" / "test", per_class=3, size=(20, 20))
    b = load_data(cfg(tmp_path / "d", image_size=16, normalize="standard"), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (12, 4, 6) and b.task == "binary"
    assert b.meta["class_counts"] == {"train": [6, 6], "val": [2, 2], "test": [3, 3]}
    assert b.val.y.dtype == torch.float32 and b.val.x.shape == (4, 3, 16, 16)
    # val is normalised with the train statistics, like test
    assert abs(b.train.x.mean().item()) < 0.05 and b.val.x.mean().abs().item() < 0.5
    (tmp_path / "e").mkdir()
    tree(tmp_path / "e" / "train", per_class=10)
    tree(tmp_path / "e" / "test", per_class=2)
    b = load_data(cfg(tmp_path / "e", val_split=0.2), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 4)


def test_image_modes_and_channels(tmp_path):
    root = tmp_path / "modes" / "train"
    write(root / "a" / "1_l.png", Image.new("L", (8, 8), 100))
    write(root / "a" / "2_p.png", Image.new("RGB", (8, 8), (200, 0, 0)).convert("P"))
    write(root / "a" / "3_rgba.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0)))  # transparent -> white
    write(root / "b" / "4_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)
    write(root / "b" / "5_i16.png", Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    assert Image.open(root / "b" / "5_i16.png").mode.startswith("I;16")
    tree(tmp_path / "modes" / "test", per_class=1, classes=("cat", "dog"), size=(8, 8))
    for c in ("cat", "dog"):
        (tmp_path / "modes" / "test" / c).rename(tmp_path / "modes" / "test" / {"cat": "a", "dog": "b"}[c])
    b = load_data(cfg(tmp_path / "modes", val_split=0.0), seed=0)
    x = b.train.x.mean((2, 3))  # file order: val_split=0 keeps train sorted
    assert b.input_shape == (3, 8, 8)
    expected = [[100 / 255] * 3, [200 / 255, 0, 0], [1, 1, 1], [1, 0, 0], [32768 / 65535] * 3]
    assert torch.allclose(x, torch.tensor(expected), atol=0.03)
    grey = tmp_path / "grey"
    for c in ("a", "b"):
        write(grey / c / "1.png", Image.new("L", (8, 8), 50))
        write(grey / c / "2.png", Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)))
        write(grey / c / "3.png", Image.new("L", (8, 8), 60))
    assert load_data(cfg(grey), seed=0).input_shape == (1, 8, 8)
    assert load_data(cfg(grey, channels=3), seed=0).input_shape == (3, 8, 8)


def test_exif_orientation_is_honoured(tmp_path):
    # stored 16 wide x 8 high, red on top; orientation 6 displays it turned 90 degrees clockwise
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:4] = (255, 0, 0)
    stored[4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "exif"
    write(root / "a" / "0.jpg", Image.fromarray(stored), exif=exif, quality=100)
    for c in ("a", "b"):
        for i in range(1, 4):
            write(root / c / f"{i}.png", Image.new("RGB", (8, 16)))
    b = load_data(cfg(root, val_split=0.0, test_split=0.5, image_size=16), seed=0)
    turned = next(x for x in b.train.x if x.max() > 0.5)
    assert turned[0, :, 12:].mean() > 0.8 and turned[2, :, :4].mean() > 0.8  # red right, blue left
    # the header pass swaps width and height too: every image displays as 8x16
    with pytest.raises(DataError, match="are 8x16, not one square size; set data.image_size"):
        load_data(cfg(root), seed=0)


def test_unreadable_files_are_skipped_with_a_count_or_fail(tmp_path, capsys):
    root = tree(tmp_path / "pets")
    (root / "dog" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    full = (root / "cat" / "00.png").read_bytes()
    (root / "cat" / "broken.png").write_bytes(full[: len(full) // 2])  # a valid header, cut data
    b = load_data(cfg(root), seed=0)
    assert len(b.train) + len(b.val) + len(b.test) == 20
    assert b.meta["skipped"] == {"count": 2, "files": ["cat/broken.png", "dog/garbage.jpg"]}
    assert capsys.readouterr().err.strip() == "skipped 2 unreadable images: cat/broken.png, dog/garbage.jpg"
    with pytest.raises(DataError, match=r"^dog/garbage.jpg: not a readable image \(.*\); fix or remove it, "
                                        r"or set data.bad_files=skip"):
        load_data(cfg(root, bad_files="fail"), seed=0)
    with pytest.raises(DataError, match=r"^cat/broken.png: not a readable image"):
        load_data(cfg(root, bad_files="fail", image_size=12, channels=3), seed=0)


def test_csv_images(tmp_path):
    data = tmp_path / "data"
    tree(data / "imgs", per_class=6)
    rows = ["image,class"] + [f"imgs/cat/{i:02d}.png,10" for i in range(6)]
    rows += [f"imgs/dog/{i:02d}.png,2" for i in range(6)] + [f"{data}/imgs/dog/00.png, 2", "", "imgs/nope.png,2"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    b = load_data(cfg(data / "labels.csv", name="csv_images", val_split=0.0, test_split=0.25), seed=0)
    assert b.classes == ["2", "10"] and b.task == "binary" and b.input_shape == (3, 12, 12)
    assert b.meta["skipped"] == {"count": 1, "files": ["imgs/nope.png"]}
    assert (len(b.train), len(b.test)) == (10, 3)  # 13 readable rows, the absolute path included
    blue = b.train.x[:, 2].mean((1, 2)) > b.train.x[:, 0].mean((1, 2))
    assert torch.equal(blue, b.train.y == 0)  # class "2" holds the dogs
    shape = data_shape(cfg(data / "labels.csv", name="csv_images"))
    assert shape.input_shape == (3, 12, 12) and shape.num_classes == 2
    (data / "bad.csv").write_text("file,kind\na.png,1\n")
    with pytest.raises(DataError, match=r"header has columns \(file, kind\); expected a CSV with a header holding "
                                        r"a 'path' column"):
        load_data(cfg(data / "bad.csv", name="csv_images"), seed=0)
    (data / "one.csv").write_text("path,label\nimgs/cat/00.png,x\n")
    with pytest.raises(DataError, match="need at least 2 classes"):
        load_data(cfg(data / "one.csv", name="csv_images"), seed=0)


@pytest.mark.parametrize("setup,kw,message", [
    (lambda r: None, {}, "folder not found; expected one sub-folder of images per class"),
    (lambda r: tree(r, classes=("cat",)), {}, "has 1 class folder(s), need at least 2"),
    (lambda r: (tree(r), (r / "eel").mkdir()), {}, "eel holds no images (.png, .jpg"),
    (lambda r: (tree(r, classes=("cat",)), tree(r, classes=("dog",), size=(10, 10))), {},
     "are 10x10, 12x12, not one square size; set data.image_size"),
    (lambda r: tree(r / "train"), {}, "has train/ but no test/ folder"),
    (lambda r: (tree(r / "train"), tree(r / "test"), tree(r / "extra")), {}, "mixes split folders with 'extra'"),
    (lambda r: (tree(r / "train"), tree(r / "test", classes=("cat", "eel"))), {}, "class folder 'eel' that train/ lacks"),
    (lambda r: [write(r / c / "x.png", Image.new("L", (1, 1))).write_bytes(b"junk") for c in "ab"], {},
     "none of the 2 images under"),
])
def test_folder_errors(tmp_path, setup, kw, message):
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(DataError) as err:
        load_data(cfg(root, **kw), seed=0)
    assert message in str(err.value)


def test_thread_count_does_not_change_the_data(tmp_path, monkeypatch):
    import dlkit.data.folders as folders

    root = tree(tmp_path / "pets", per_class=12)
    monkeypatch.setattr(folders, "THREADS", 1)
    one = load_data(cfg(root), seed=0).fingerprint()
    monkeypatch.setattr(folders, "THREADS", 6)
    assert load_data(cfg(root), seed=0).fingerprint() == one


def test_no_path_says_what_to_pass():
    assert "image_folder" in DATASETS and "csv_images" in DATASETS
    with pytest.raises(DataError, match="pass --data PATH"):
        load_data(DataCfg(name="image_folder"), seed=0)
