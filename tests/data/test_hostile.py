"""Hostile files cost bounded memory and end in one line: CSV cells past the field limit, archives whose
members claim or inflate to gigabytes, images whose header claims 144 megapixels. Each file is made
here, cheaply (hand-written headers, runs of zeros), so no test holds more than a few MB."""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlkit.config import DataCfg
from dlkit.data import load_data
from dlkit.data.cifar import read_archive, read_folder
from dlkit.data.download import ExtractLimits, safe_extract
from dlkit.data.inputs import csv_records, read_image, read_table
from dlkit.errors import DataError, InputError

# --- CSV ------------------------------------------------------------------------------------------


def test_a_cell_past_the_field_limit_names_the_file_and_the_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,b,y\n1,2,x\n3," + "4" * 200_000 + ",y\n")
    with pytest.raises(DataError) as err:
        load_data(DataCfg(name="csv_table", path=str(table)), 0)
    assert str(err.value) == (f"data file {table}: line 3: a field is longer than 131,072 characters (an unclosed "
                              "quote?); pass --data PATH to a CSV with a header row and the label in the last column")
    with pytest.raises(InputError) as err:
        read_table(str(table), ["a", "b"])
    assert str(err.value) == (f"{table}: line 3: a field is longer than 131,072 characters (an unclosed quote?); "
                              "expected a CSV of numbers")


def test_text_cells_may_be_long_but_an_unclosed_quote_stops_at_its_line(tmp_path):
    review = "a fine film " * 20_000  # 240,000 characters: past csv's default limit, inside text_csv's
    assert csv_records(f'text,label\n"{review}",pos\n', 1 << 20)[1] == (2, [review, "pos"])
    unclosed = tmp_path / "u.csv"
    unclosed.write_text('text,label\nfine,pos\n"never closed,neg\n' + "more text,pos\n" * 80_000)  # 1.1 MB
    with pytest.raises(DataError) as err:
        load_data(DataCfg(name="text_csv", path=str(unclosed)), 0)
    assert str(err.value) == (f"data file {unclosed} is not a readable CSV: line 3: a field is longer than "
                              "1,048,576 characters (an unclosed quote?)")


def test_the_field_limit_is_restored_after_reading():
    import csv

    before = csv.field_size_limit()
    csv_records("a\n" + "x" * 10 + "\n", 1 << 20)
    with pytest.raises(ValueError, match="^line 2: a field is longer than 5 characters"):
        csv_records("a\n" + "x" * 10 + "\n", 5)
    assert csv.field_size_limit() == before


# --- archives -------------------------------------------------------------------------------------


def _lying_tar(path: Path, name: str, claimed: int, actual: int = 10_240) -> Path:
    """A tar.gz whose one member's header claims `claimed` bytes but holds only `actual` zeros."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    path.write_bytes(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(actual)))
    return path


def _zeros_tar(path: Path, members: dict[str, int]) -> Path:
    """A tar.gz of members holding runs of zeros (a thousandfold compression, like a zip bomb)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    return path


def test_a_member_claiming_a_gigabyte_is_refused_before_it_is_inflated(tmp_path):
    archive = _lying_tar(tmp_path / "c.tar.gz", "cifar-10-batches-py/data_batch_1", 1 << 30)
    with pytest.raises(DataError) as err:
        read_archive(archive)
    assert str(err.value) == ("c.tar.gz:data_batch_1 holds 1,073,741,824 bytes, more than the 67,108,864 a CIFAR-10 "
                              "batch can (about 31 MB); it is not the official file, download the archive again")
    huge = _lying_tar(tmp_path / "h.tar.gz", "top/huge", 8 << 30)
    with pytest.raises(DataError) as err:
        safe_extract(huge, tmp_path / "out")
    assert str(err.value) == ("refused member 'top/huge' of h.tar.gz: it declares 8,589,934,592 bytes, more than "
                              "the 1,073,741,824 allowed; nothing was unpacked: the archive is not safe, delete it "
                              "and get the official one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.gz", "h.tar.gz"]


def test_cifar_members_and_files_over_the_limit_are_refused(tmp_path):
    archive = _zeros_tar(tmp_path / "z.tar.gz", {"cifar-10-batches-py/data_batch_1": 2 << 20})
    assert archive.stat().st_size < 10_000  # 2 MiB of zeros
    with pytest.raises(DataError, match=r"^z\.tar\.gz:data_batch_1 holds 2,097,152 bytes, more than the 1,048,576 "):
        read_archive(archive, max_bytes=1 << 20)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MB on paper, nothing on disk or in memory
    with pytest.raises(DataError, match=r"data_batch_1 holds 104,857,600 bytes, more than the 67,108,864 a CIFAR-10"):
        read_folder(folder)


def test_extraction_bounds_each_member_the_total_and_the_count(tmp_path):
    small = ExtractLimits(member_bytes=1 << 20, total_bytes=(1 << 20) + 100_000, members=3)
    big = _zeros_tar(tmp_path / "big.tar.gz", {"a/big": (1 << 20) + 1})
    with pytest.raises(DataError, match=r"^refused member 'a/big' of big\.tar\.gz: it declares 1,048,577 bytes, "
                                        r"more than the 1,048,576 allowed; nothing was unpacked"):
        safe_extract(big, tmp_path / "o1", limits=small)
    two = _zeros_tar(tmp_path / "two.tar.gz", {"a/x": 600_000, "a/y": 600_000})
    with pytest.raises(DataError, match=r"^refused two\.tar\.gz: its members inflate past the 1,148,576 bytes "
                                        r"allowed in all; nothing was unpacked"):
        safe_extract(two, tmp_path / "o2", limits=small)
    many = _zeros_tar(tmp_path / "many.tar.gz", {f"a/{i}": 1 for i in range(4)})
    with pytest.raises(DataError, match=r"^refused many\.tar\.gz: more than 3 members; nothing was unpacked"):
        safe_extract(many, tmp_path / "o3", limits=small)
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/big", bytes((1 << 20) + 1))
    with pytest.raises(DataError, match=r"^refused member 'a/big' of big\.zip: it declares 1,048,577 bytes"):
        safe_extract(tmp_path / "big.zip", tmp_path / "o4", limits=small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tar.gz", "big.zip", "many.tar.gz", "two.tar.gz"]


def test_a_zip_member_that_inflates_past_its_declared_size_is_not_written_whole(tmp_path):
    with zipfile.ZipFile(tmp_path / "lie.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x", bytes(200_000))
    data = bytearray((tmp_path / "lie.zip").read_bytes())
    # rewrite the declared size (central directory and local header) to 1,000 bytes
    for sig, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.index(sig) + offset
        data[at : at + 4] = struct.pack("<I", 1000)
    (tmp_path / "lie.zip").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"^cannot unpack lie\.zip: .*; delete it and download it again$"):
        safe_extract(tmp_path / "lie.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- images ---------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(path: Path, width: int, height: int) -> Path:
    """A legal 1-bit black PNG written by hand, row by row: 12000x12000 is 18 MB raw and 18 KB on disk."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height, what", [
    (12000, 12000, "12000x12000 = 144,000,000 pixels"),  # under Pillow's own refusal: it would warn, then decode
    (20000, 10000, "200,000,000 pixels"),  # past twice Pillow's limit: Pillow refuses it at open
])
def test_a_huge_png_is_refused_from_its_header_in_one_line_without_warnings(tmp_path, width, height, what):
    png = blank_png(tmp_path / "huge.png", width, height)
    assert png.stat().st_size < 40_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the read
        with pytest.raises(InputError) as err:
            read_image(str(png), 3)
    assert str(err.value) == (f"{png}: {what} is more than the 40 megapixels dlkit decodes; shrink the picture "
                              "first (e.g. to 4000 pixels on its longer side, or save it as JPEG, which is reduced "
                              "as it is read)")


def test_a_large_jpeg_is_reduced_while_it_is_decoded(tmp_path):
    ramp = np.tile((np.arange(2048) // 8).astype(np.uint8)[None, :], (2048, 1))  # 0..255 left to right
    Image.fromarray(ramp).save(tmp_path / "big.jpg", quality=90)
    assert read_image(str(tmp_path / "big.jpg"), 1).shape == (1, 1, 2048, 2048)
    small = read_image(str(tmp_path / "big.jpg"), 1, size=(64, 64))
    assert small.shape == (1, 1, 256, 256)  # an eighth, still no smaller than the model's 64
    assert abs(float(small[0, 0, 0, -1]) - 255 / 255) < 0.02 and float(small[0, 0, 0, 0]) < 0.02


def test_an_image_folder_skips_a_huge_picture_with_the_same_reason(tmp_path, capsys):
    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(tmp_path / "pets" / label / f"{i}.png")
    blank_png(tmp_path / "pets" / "dog" / "huge.png", 12000, 12000)
    with pytest.raises(DataError) as err:
        load_data(DataCfg(name="image_folder", path=str(tmp_path / "pets"), image_size=8, bad_files="fail",
                          test_split=0.34), 0)
    assert str(err.value).startswith("dog/huge.png: 12000x12000 = 144,000,000 pixels is more than the 40 megapixels")


def test_predict_reads_a_large_jpeg_as_the_image_folder_loader_does(tmp_path):
    from dlkit.data.preprocess import ImagePrep, read_input

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1600, 1200, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    spec = ImagePrep(channels=3, size=(64, 64))
    as_trained = spec.layout(read_image(str(tmp_path / "big.jpg"), 3, spec.size))  # data/folders.py's call
    full = spec.layout(read_image(str(tmp_path / "big.jpg"), 3))
    assert read_input(str(tmp_path / "big.jpg"), spec).equal(spec.normalise(as_trained))
    assert not as_trained.equal(full)  # the reduction is real: decoding in full gives other pixels
