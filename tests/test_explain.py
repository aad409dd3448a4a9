"""`dlkit explain`: Grad-CAM of a finished run's conv model over a PNG a user gives."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dlkit.errors import InputError
from dlkit.explain import explain_image
from dlkit.predict import Predictor
from dlkit.runner import run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    run("digits-cnn", epochs=3, out=out)
    return out


def test_explain_writes_the_heat_map_over_the_image_and_names_the_class(digits_run, tmp_path) -> None:
    digit = load_digits().images[3]  # a 3, dark ink on light paper as a user would scan it
    Image.fromarray((255 - digit * 16).clip(0, 255).astype(np.uint8)).resize((64, 64)).save("three.png")
    said = explain_image(digits_run, "three.png")
    assert said["heatmap"] == "three.gradcam.png"
    expected = Predictor.from_run(digits_run).predict(["three.png"])[0]
    assert said["label"] == expected["label"] and said["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
    picture = Image.open("three.gradcam.png")
    picture.load()
    assert picture.mode == "RGB" and min(picture.size) >= 224  # 28x28 enlarged to be readable
    again = explain_image(digits_run, "three.png", out=tmp_path / "sub" / "cam.png")
    assert (tmp_path / "sub" / "cam.png").is_file() and again["label"] == said["label"]


def test_explain_refuses_what_it_cannot_explain(digits_run) -> None:
    with pytest.raises(InputError, match=r"^nope.png: file not found"):
        explain_image(digits_run, "nope.png")
    text_run = run("tiny-text-lstm", epochs=1, out="text").run_dir
    with pytest.raises(InputError, match=r"^dlkit explain draws Grad-CAM over images; the model of text reads tokens"):
        explain_image(text_run, "anything.png")
