import json

import numpy as np
import pytest
import torch
from PIL import Image

from dlkit.data.preprocess import ImagePrep, TablePrep, prep_from_dict, read_input
from dlkit.errors import InputError, RunDirError

NAMES = [f"f{i}" for i in range(5)]


def _checkerboard(n: int = 8) -> torch.Tensor:
    return torch.from_numpy((np.indices((n, n)).sum(0) % 2).astype(np.float32))[None, None]


# ---------------------------------------------------------------- specs


def test_specs_round_trip_through_json():
    image = ImagePrep(3, (32, 32), mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.4], invert="never")
    table = TablePrep(NAMES, mean=[0.0] * 5, std=[1.0, 2.0, 3.0, 4.0, 5.0], method="standard")
    for spec in (image, table, ImagePrep(1, (28, 28), invert="auto"), TablePrep(NAMES, method="none")):
        back = prep_from_dict(json.loads(json.dumps(spec.to_dict())))
        assert back == spec
    assert image.to_dict()["kind"] == "image" and table.to_dict()["kind"] == "table"


def test_prep_from_dict_rejects_unknown_or_broken_specs():
    with pytest.raises(RunDirError, match="kind 'audio'; expected 'image', 'table' or 'text'"):
        prep_from_dict({"kind": "audio"})
    with pytest.raises(RunDirError, match="malformed"):
        prep_from_dict({"kind": "image", "size": [28, 28]})


def test_upscaled_checkerboard_keeps_its_mean():
    out = ImagePrep(1, (28, 28)).apply(_checkerboard(8))
    assert out.shape == (1, 1, 28, 28)
    assert abs(out.mean().item() - 0.5) < 0.02
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_downscaling_is_antialiased():
    out = ImagePrep(1, (7, 7)).apply(_checkerboard(28))
    # without antialiasing a 4x decimation of a checkerboard samples one colour only
    assert abs(out.mean().item() - 0.5) < 0.02
    assert out.std().item() < 0.15


def test_auto_invert_flips_light_background_only():
    page = torch.ones(1, 1, 10, 10)
    page[..., 3:7, 4:6] = 0.0  # a dark stroke on white paper
    auto = ImagePrep(1, (10, 10), invert="auto")
    flipped = auto.apply(page)
    assert flipped[..., 0, 0].item() == 0.0 and flipped[..., 4, 4].item() == 1.0
    assert torch.equal(ImagePrep(1, (10, 10), invert="never").apply(page), page)
    dark = 1.0 - page
    assert torch.equal(auto.apply(dark), dark)


def test_channels_are_matched_and_normalised():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert ImagePrep(1, (4, 4)).apply(red).flatten()[0].item() == pytest.approx(0.299)
    grey = torch.full((1, 1, 4, 4), 0.5)
    rgb = ImagePrep(3, (4, 4), mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 0.0]).apply(grey)
    assert rgb.shape == (1, 3, 4, 4)
    assert rgb[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.5])  # a zero std divides by 1


def test_table_prep_standardises_and_checks_width():
    spec = TablePrep(["a", "b"], mean=[1.0, 10.0], std=[2.0, 0.0])
    assert spec.apply(torch.tensor([[3.0, 12.0]])).tolist() == [[1.0, 2.0]]
    with pytest.raises(InputError, match="expected rows of 2 features"):
        spec.apply(torch.zeros(1, 3))


# ---------------------------------------------------------------- image files


def _grey_array() -> np.ndarray:
    a = np.zeros((12, 16), dtype=np.uint8)  # H=12, W=16
    a[:, 8:] = 200
    return a


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_files_read_to_the_right_shape_and_values(tmp_path, fmt, mode):
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(_grey_array()).convert(mode).save(path)
    for channels in (1, 3):
        x = read_input(str(path), ImagePrep(channels, (12, 16)))
        assert x.shape == (1, channels, 12, 16) and x.dtype == torch.float32
        assert x[..., :, :6].max().item() < 0.05
        assert x[..., :, 10:].mean().item() == pytest.approx(200 / 255, abs=0.03)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, 0] = 255
    rgba[:2, :, 3] = 255  # opaque red top half, fully transparent bottom half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    x = read_input(str(tmp_path / "a.png"), ImagePrep(3, (4, 4)))
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert x[0, :, 3, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_palette_and_16_bit_images(tmp_path):
    pal = Image.new("P", (6, 5))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 3, 5))
    pal.save(tmp_path / "p.png")
    x = read_input(str(tmp_path / "p.png"), ImagePrep(3, (5, 6)))
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert x[0, :, 0, 5].tolist() == pytest.approx([0.0, 0.0, 0.0])

    deep = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(deep)
    assert img16.mode == "I;16"
    img16.save(tmp_path / "d.png")
    y = read_input(str(tmp_path / "d.png"), ImagePrep(1, (2, 2)))
    assert y.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0], abs=1e-4)


def test_exif_orientation_is_honoured(tmp_path):
    a = np.zeros((10, 20), dtype=np.uint8)
    a[:, 10:] = 255  # stored: left half black, right half white (10 high, 20 wide)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    x = read_input(str(tmp_path / "r.jpg"), ImagePrep(1, (20, 10)))
    assert x.shape == (1, 1, 20, 10)
    # turned clockwise, the stored left edge becomes the top
    assert x[0, 0, :8].mean().item() < 0.05 and x[0, 0, 12:].mean().item() > 0.95


def test_npy_images_in_every_layout(tmp_path):
    hw = np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)
    chw = np.stack([hw, hw, hw])
    hwc = (np.moveaxis(chw, 0, -1) * 255).round().astype(np.uint8)
    for name, arr in {"hw": hw, "chw": chw, "hwc": hwc}.items():
        np.save(tmp_path / f"{name}.npy", arr)
        x = read_input(str(tmp_path / f"{name}.npy"), ImagePrep(1, (6, 6)))
        assert x.shape == (1, 1, 6, 6)
        assert torch.allclose(x[0, 0], torch.from_numpy(hw), atol=1 / 255)


def test_image_errors_name_the_input_and_what_is_expected(tmp_path):
    spec = ImagePrep(1, (8, 8))
    cases = {}
    cases[str(tmp_path / "nope.png")] = "nope.png: file not found; expected an image file (PNG, JPEG"
    (tmp_path / "text.png").write_text("not an image")
    cases[str(tmp_path / "text.png")] = "text.png: not a readable image ("
    (tmp_path / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    cases[str(tmp_path / "trunc.jpg")] = "trunc.jpg: not a readable image ("
    np.save(tmp_path / "vec.npy", np.zeros(5))
    cases[str(tmp_path / "vec.npy")] = "expected an array shaped (H, W), (C, H, W) or (H, W, C)"
    np.save(tmp_path / "big.npy", np.full((4, 4), 2.5))
    cases[str(tmp_path / "big.npy")] = "float pixels must lie in [0, 1] (or use integers 0..255), got 2.5..2.5"
    np.save(tmp_path / "wide.npy", np.full((4, 4), 300))
    cases[str(tmp_path / "wide.npy")] = "integer pixels must lie in 0..255, got 300..300"
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    cases[str(tmp_path / "bad.npy")] = "bad.npy: not a readable .npy file ("
    cases[str(tmp_path)] = "is a folder, not a file"
    for source, message in cases.items():
        with pytest.raises(InputError) as info:
            read_input(source, spec)
        assert message in str(info.value)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tables


def test_table_inputs_npy_csv_and_inline(tmp_path):
    spec = TablePrep(NAMES, mean=[1.0] * 5, std=[2.0] * 5)
    row = [1.0, 3.0, 5.0, 7.0, 9.0]
    expected = [[0.0, 1.0, 2.0, 3.0, 4.0]]
    np.save(tmp_path / "v.npy", np.array(row))
    assert read_input(str(tmp_path / "v.npy"), spec).tolist() == expected
    (tmp_path / "plain.csv").write_text("1,3,5,7,9\n1,1,1,1,1\n")
    assert read_input(str(tmp_path / "plain.csv"), spec).tolist() == expected + [[0.0] * 5]
    (tmp_path / "head.csv").write_text("f0,f1,f2,f3,f4\n1,3,5,7,9\n")
    assert read_input(str(tmp_path / "head.csv"), spec).tolist() == expected
    # a header holding every feature name picks columns by name (order and extra label column)
    (tmp_path / "named.csv").write_text("f4,label,f3,f2,f1,f0\n9,benign,7,5,3,1\n")
    assert read_input(str(tmp_path / "named.csv"), spec).tolist() == expected
    assert read_input(" 1, 3,5,7 ,9", spec).tolist() == expected
    out = read_input("1,3,5,7,9", spec)
    assert out.shape == (1, 5) and out.dtype == torch.float32


def test_table_errors_name_the_input_and_what_is_expected(tmp_path):
    names = ["mean radius"] + [f"x{i}" for i in range(29)]
    spec = TablePrep(names)
    (tmp_path / "x.csv").write_text(",".join(["1"] * 29) + "\n")
    (tmp_path / "empty.csv").write_text("\n")
    (tmp_path / "word.csv").write_text("\n" + ",".join(["1"] * 29 + ["abc"]) + "\n")  # blank line 1
    (tmp_path / "nan.csv").write_text(",".join(["1"] * 29 + ["nan"]) + "\n")
    (tmp_path / "hdr.csv").write_text("a,b\n1,2\n")
    np.save(tmp_path / "m.npy", np.zeros((2, 2, 2)))
    cases = {
        str(tmp_path / "x.csv"): "x.csv: expected 30 values per row (mean radius, ...), got 29",
        str(tmp_path / "empty.csv"): "empty.csv: no data rows; expected 30 values per row",
        str(tmp_path / "word.csv"): "word.csv: line 2 holds 'abc', not a number",
        str(tmp_path / "nan.csv"): "nan.csv: row 1 holds a value that is not a finite number",
        str(tmp_path / "hdr.csv"): "hdr.csv: the header lacks column 'mean radius'",
        str(tmp_path / "m.npy"): "m.npy: expected a numeric vector or matrix of rows",
        str(tmp_path / "gone.csv"): "gone.csv: file not found; expected a .npy vector, a CSV file or 30",
        "1,2,3": "input '1,2,3': expected 30 values per row (mean radius, ...), got 3",
        "hello there": "'hello there' is neither an existing file nor comma-separated numbers",
    }
    for source, message in cases.items():
        with pytest.raises(InputError) as info:
            read_input(source, spec)
        assert message in str(info.value)
        assert "\n" not in str(info.value)
