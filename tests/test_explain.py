"""`dlkit explain`: Grad-CAM of a finished run's conv model over a PNG a user gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dlkit.data.preprocess import ImagePrep
from dlkit.errors import InputError
from dlkit.evaluate.gradcam import COLORBAR_BAR, COLORBAR_PAD, jet
from dlkit.explain import display_size, explain_image, heat_on_image
from dlkit.predict import Predictor
from dlkit.runner import run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    run("digits-cnn", epochs=3, out=out)
    return out


def digit_png(path: str, size: tuple[int, int]) -> str:
    digit = load_digits().images[3]  # a 3, dark ink on light paper as a user would scan it
    Image.fromarray((255 - digit * 16).clip(0, 255).astype(np.uint8)).resize(size).save(path)
    return path


def test_explain_writes_the_heat_map_over_the_image_and_names_the_class(digits_run, tmp_path) -> None:
    said = explain_image(digits_run, digit_png("three.png", (64, 64)))
    assert said["heatmap"] == "three.gradcam.png"
    expected = Predictor.from_run(digits_run).predict(["three.png"])[0]
    assert said["label"] == expected["label"] and said["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
    assert said["size"] == [256, 256]  # 64x64 enlarged 4 times (to at least 224) to be readable
    picture = Image.open("three.gradcam.png")
    picture.load()
    assert picture.mode == "RGB" and picture.height > 256  # the title strip above the image
    again = explain_image(digits_run, "three.png", out=tmp_path / "sub" / "cam.png")
    assert (tmp_path / "sub" / "cam.png").is_file() and again["label"] == said["label"]


@pytest.mark.parametrize("size, shown", [((300, 200), (300, 200)), ((120, 40), (240, 80)),
                                         ((2000, 1500), (1024, 768)), ((28, 28), (224, 224))])
def test_the_picture_is_the_users_image_at_its_own_size_with_a_colour_scale(digits_run, size, shown) -> None:
    assert display_size(*size) == shown
    said = explain_image(digits_run, digit_png("wide.png", size), out="wide.cam.png")
    assert said["size"] == list(shown)
    with Image.open("wide.cam.png") as png:
        rgb = np.asarray(png.convert("RGB"))
    width, height = shown
    title = rgb.shape[0] - height  # the title strip, then the picture at its display size
    assert title > 0 and rgb.shape[1] > width + COLORBAR_PAD + COLORBAR_BAR
    # the colour bar beside it: as tall as the picture, the jet map from high (top) to low (foot)
    bar = rgb[title:, width + COLORBAR_PAD + COLORBAR_BAR // 2]
    assert bar.shape[0] == height
    np.testing.assert_array_equal(bar[0], np.round(jet(np.array(1.0)) * 255))
    np.testing.assert_array_equal(bar[-1], np.round(jet(np.array(0.0)) * 255))
    # the user's paper shows through where the map is cold: the picture's corners are near its light grey
    paper = np.asarray(Image.open("wide.png").convert("RGB"))[0, 0].astype(int)
    assert np.abs(rgb[title, 0].astype(int) - paper).max() < 100


def test_the_heat_map_is_resized_onto_the_whole_image_for_the_plain_layout() -> None:
    heat = torch.zeros(1, 1, 4, 4)
    heat[..., 0, 0] = 1.0  # hot in the model input's top-left corner
    on_image = heat_on_image(heat, None, (40, 80))
    assert on_image.shape == (1, 1, 40, 80)
    assert on_image[0, 0, 0, 0] == 1.0 and on_image[0, 0, -1, -1] == 0.0 and on_image[0, 0, 20:, 40:].max() == 0.0


def test_for_the_mnist_layout_the_heat_lands_on_the_digit_where_it_was_on_the_page() -> None:
    page = torch.ones(1, 3, 120, 90)  # white paper, a dark bar (a "1") in its lower right
    page[:, :, 70:110, 60:66] = 0.0
    spec = ImagePrep(size=(28, 28), channels=1, framing="mnist")
    placement = spec.placement(page)
    assert placement is not None and placement.shape == (120, 90) and placement.origin[0] in (69, 70)
    frame = spec.layout(page)[0, 0]
    heat = (frame > 0.5).float()[None, None]  # heat exactly where the model saw ink
    on_page = heat_on_image(heat, placement, (240, 180))[0, 0]  # the page drawn at twice its size
    bar, paper = on_page[140:220, 120:132], on_page.clone()
    paper[130:230, 110:142] = 0
    assert bar.mean() > 0.6 and paper.max() == 0.0  # on the bar, and nowhere else on the page
    assert ImagePrep(size=(28, 28), channels=1).placement(page) is None  # the plain layout: the whole page


def test_explain_refuses_what_it_cannot_explain(digits_run) -> None:
    with pytest.raises(InputError, match=r"^nope.png: file not found"):
        explain_image(digits_run, "nope.png")
    text_run = run("tiny-text-lstm", epochs=1, out="text").run_dir
    with pytest.raises(InputError, match=r"^dlkit explain draws Grad-CAM over images; the model of text reads tokens"):
        explain_image(text_run, "anything.png")
