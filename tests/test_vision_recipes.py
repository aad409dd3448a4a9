"""Every vision recipe's -smoke variant end to end, on files written in the official formats."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlkit import run
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    """cifar-10-python.tar.gz in the official layout: pickled dicts with bytes keys, protocol 2."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = rng.integers(0, 10, 40)
            add(name, {b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), b"labels": labels.tolist()})
        add("batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                              b"frog", b"horse", b"ship", b"truck"]})
    return path


MNIST_RECIPES = ["mnist-cnn", "fashion-mnist-cnn", "mnist-lenet", "mnist-mlp", "mnist-cnn3"]
CIFAR_RECIPES = ["cifar10-cnn", "cifar10-alexnet", "cifar10-zfnet", "cifar10-resnet", "cifar10-vit"]


@pytest.mark.parametrize("recipe", MNIST_RECIPES)
def test_mnist_smoke_recipes_learn(recipe, mnist_dir, tmp_path):
    result = run(f"{recipe}-smoke", overrides=["data.verify=false"], out=tmp_path / "run",
                 fields={"data.data_dir": str(mnist_dir)})
    s = result.summary
    cfg = load_recipe(recipe)
    n_val = round(1200 * cfg.data.val_split)
    assert (s["n_train"], s["n_val"], s["n_test"]) == (512, n_val, 300)  # subset: 512 of the rest
    assert sum(s["class_counts"]["test"]) == 300
    if 512 // cfg.train.batch_size >= 16:  # enough steps to learn: well above chance (0.1)
        assert s["test_accuracy"] > 0.3, s
    else:  # mnist-lenet's batch 128 gives 4 steps: it only has to move off its starting loss
        assert s["test_loss"] < 2.35, s


@pytest.mark.parametrize("recipe", CIFAR_RECIPES)
def test_cifar_smoke_recipes_run(recipe, cifar_archive, tmp_path):
    result = run(f"{recipe}-smoke", overrides=["data.verify=false"], out=tmp_path / "run",
                 fields={"data.data_dir": str(cifar_archive.parent)})
    s = result.summary
    assert s["n_test"] == 40 and s["n_train"] + s["n_val"] == 200
    assert 0.0 <= s["test_accuracy"] <= 1.0 and np.isfinite(s["test_loss"])
    bundle = json.loads((result.run_dir / "bundle.json").read_text())
    assert bundle["input_shape"] == [3, 32, 32] and bundle["classes"][0] == "airplane"


def test_predict_a_users_png_and_jpeg_with_the_bundles_preprocessing(mnist_dir, digit_images, tmp_path):
    result = run("mnist-cnn-smoke", overrides=["data.verify=false", "train.epochs=3"], out=tmp_path / "run",
                 fields={"data.data_dir": str(mnist_dir)})
    x, y = digit_images(40, 1500)
    predictor = Predictor.from_run(result.run_dir)
    paths = []
    for i, fmt in enumerate(["png", "jpeg"] * 20):
        path = tmp_path / f"digit{i}.{fmt}"
        # a user's photo: dark ink on white paper, larger than 28x28, RGB
        Image.fromarray(255 - x[i]).resize((112, 112)).convert("RGB").save(path)
        paths.append(str(path))
    answers = predictor.predict(paths)
    assert [a["input"] for a in answers] == paths
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-4 for a in answers)
    hits = sum(a["label"] == str(t) for a, t in zip(answers, y))
    assert hits >= 0.6 * len(y), hits  # inverted, resized and greyed exactly like the training digits


def test_train_resnet20_on_an_image_folder_then_predict_a_photo(tmp_path):
    """`dlkit train --model resnet20 --data DIR` on a class-per-folder tree; a user's JPEG predicted."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for name, rgb in colours.items():
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(24):
            img = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "pets" / name / f"{i}.png")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((300, 200, 3), colours["blue"], np.uint8)).save(photo)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlkit", "train", "--model", "resnet20", "--data", str(tmp_path / "pets"),
           "--epochs", "3", "--batch-size", "8", "--quiet", "--out", str(out), "--set", "data.image_size=32"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["classes"] == ["blue", "red"] and bundle["input_shape"] == [3, 32, 32]
    answer = Predictor.from_run(out).predict([str(photo)])[0]
    assert answer["label"] == "blue" and answer["confidence"] > 0.5, answer
