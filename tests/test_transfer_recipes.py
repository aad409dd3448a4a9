"""The transfer-learning recipes end to end: real photos in a class folder, a torchvision-layout
ImageNet checkpoint written by the test into torch.hub's cache, frozen bases, stages, the bundle.

The "ImageNet" checkpoint is a seeded MobileNetV2 trained for a few steps on the photo crops (a
random base's features do not separate them: logistic regression on them scores 0.5): the tests
prove the plumbing and the maths, not ImageNet accuracy, which needs the real file.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from dlkit import run
from dlkit.catalog import describe_recipe
from dlkit.models import build, pretrained
from dlkit.predict import Predictor

pytestmark = pytest.mark.slow
MOBILENET = pretrained.IMAGENET["mobilenet_v2"]


def crops(photo: np.ndarray, n: int, size: int, seed: int) -> list[Image.Image]:
    """`n` random square crops of a photo, some mirrored."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = Image.fromarray(photo[top : top + size, left : left + size])
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """A cats/dogs-style folder from sklearn's two sample photos: 'cat' = the temple, 'dog' = the flower."""
    root = tmp_path_factory.mktemp("pets")
    for name, photo, seed in zip(("cat", "dog"), load_sample_images().images, (0, 1)):
        (root / name).mkdir()
        for i, crop in enumerate(crops(photo, 30, 160, seed)):
            crop.save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def pretrained_mobilenet(photos: Path, steps: int = 12) -> torch.nn.Module:
    """A seeded 1000-class MobileNetV2 "pretrained" for a few steps on ImageNet-normalised crops (labels
    0 and 1 of 1000), so that its base's features carry the photos' classes as ImageNet's would."""
    torch.manual_seed(0)
    model = build("mobilenet_v2", num_classes=1000, input_shape=(3, 64, 64))
    files = sorted(photos.rglob("*.jpg"))
    images = [np.asarray(Image.open(p).resize((64, 64))) for p in files]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    y = torch.tensor([int(p.parent.name == "dog") for p in files])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:  # running statistics of the final weights (12 steps of momentum 0.1 are not enough)
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, pets) -> tuple[Path, pretrained.HubFile]:
    """TORCH_HOME with hub/checkpoints/mobilenet_v2-<sha256 prefix>.pth, torchvision's format (a pickled state_dict)."""
    home = tmp_path_factory.mktemp("torch")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    staging = folder / "staging.pth"
    torch.save(pretrained_mobilenet(pets).state_dict(), staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    hub = pretrained.HubFile(f"mobilenet_v2-{digest[:8]}.pth", f"https://download.pytorch.org/models/mobilenet_v2-{digest[:8]}.pth")
    staging.rename(folder / hub.file)
    return home, hub


@pytest.fixture
def imagenet(monkeypatch, hub_cache):
    home, hub = hub_cache
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setitem(pretrained.IMAGENET, "mobilenet_v2", hub)
    return hub


def test_catsdogs_mobilenetv2_trains_its_head_then_fine_tunes_and_predicts(imagenet, pets, tmp_path):
    result = run("catsdogs-mobilenetv2", epochs=5, out=tmp_path / "run",
                 overrides=["data.image_size=64", f"data.path={pets}"])
    s = result.summary
    assert s["notes"][0].startswith(f"loaded 312 tensors from imagenet ({imagenet.file}); new: classifier.0.weight")
    assert "head: features not cached: augmentation changes the base's input every epoch" in s["notes"][1]
    head = 1280 * 128 + 128 + 128 + 1
    assert [(st["name"], st["freeze"], st["trainable_params"]) for st in s["stages"]] == [
        ("head", "base", head), ("fine-tune", "base", head + sum(
            p.numel() for i in range(13, 19) for p in Predictor.from_run(result.run_dir).model.features[i].parameters()))]
    assert s["test_accuracy"] >= 0.8 and s["n_test"] == 6
    bundle = json.loads((result.run_dir / "bundle.json").read_text())
    assert bundle["model"]["head"] == {"pool": "avg", "hidden": [128], "activation": "relu", "dropout": 0.3}
    assert bundle["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and bundle["input_shape"] == [3, 64, 64]
    # predict from the bundle alone: fresh crops of each photo get their class
    files, truth = [], []
    for name, photo in zip(("cat", "dog"), load_sample_images().images):
        for i, crop in enumerate(crops(photo, 5, 160, 7)):
            crop.save(tmp_path / f"new-{name}-{i}.png")
            files.append(str(tmp_path / f"new-{name}-{i}.png"))
            truth.append(name)
    labels = [r["label"] for r in Predictor.from_run(result.run_dir).predict(files)]
    assert np.mean(np.array(labels) == np.array(truth)) >= 0.8, labels


def test_frozen_head_stage_on_cached_features_keeps_the_base_bit_identical(imagenet, pets, tmp_path):
    result = run("catsdogs-mobilenetv2", out=tmp_path / "run", overrides=[
        "data.image_size=64", f"data.path={pets}", "data.augment={}", "train.stages.0.epochs=4",
        "train.stages.1.epochs=0"])
    assert result.summary["stages"][0]["cached_features"] is True
    assert result.summary["test_accuracy"] >= 0.8
    trained = Predictor.from_run(result.run_dir).model.state_dict()
    original = pretrained.local_state(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / imagenet.file)
    trunk = [k for k in original if k.startswith("features.")]
    assert len(trunk) == 312 and all(torch.equal(trained[k], original[k]) for k in trunk)


def test_a_local_safetensors_base_feeds_the_vgg16_features_recipe(pets, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trunk = build("vgg16", num_classes=1000, input_shape=(3, 32, 32)).features.state_dict()
    save_file({f"features.{k}": v.contiguous() for k, v in trunk.items()}, tmp_path / "vgg16-base.safetensors")
    result = run("catsdogs-vgg16-features", epochs=2, out=tmp_path / "run", overrides=[
        "data.image_size=32", f"data.path={pets}", f"model.weights={tmp_path / 'vgg16-base.safetensors'}"])
    s = result.summary
    assert s["notes"][0].startswith(f"loaded 26 tensors from {tmp_path / 'vgg16-base.safetensors'}; new: ")
    assert s["stages"][0]["cached_features"] is True
    # 32 px leaves a 1x1x512 map to flatten; the summary counts what the last stage trained
    assert s["trainable_params"] == s["stages"][0]["trainable_params"] == 512 * 256 + 256 + 257
    assert s["params"] == 14_714_688 + 512 * 256 + 256 + 257


@pytest.mark.parametrize(("recipe", "total", "trainable"), [
    ("mnist-mobilenetv2", 2_389_130, 165_258),  # S3.A2's 165K trainable
    ("catsdogs-mobilenetv2", 2_387_969, 164_097),
    ("catsdogs-vgg16", 14_846_273, 131_585),
    ("catsdogs-vgg16-features", 16_812_353, 2_097_665),  # 150 px: Flatten of 512x4x4
    ("catsdogs-vgg16-finetune", 16_812_353, 2_097_665),
    ("folder10-vgg16", 21_140_042, 6_425_354),  # 224 px: Flatten of 512x7x7
])
def test_describe_needs_neither_data_nor_weights(recipe, total, trainable, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    info = describe_recipe(recipe).to_dict()
    assert (info["params"], info["trainable_params"]) == (total, trainable)


def dlkit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", *args], capture_output=True, text=True,
                          env=os.environ | env, timeout=300)


def test_offline_with_nothing_cached_is_one_line_naming_file_url_and_folder(pets, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    home = tmp_path / "torch"
    proc = dlkit("run", "catsdogs-mobilenetv2", "--data", str(pets), "--set", "data.image_size=32", env={
        "TORCH_HOME": str(home), "DLKIT_WEIGHTS_URL": f"http://127.0.0.1:{port}", "no_proxy": "*"})
    assert proc.returncode == 2 and proc.stdout == ""
    notice, line = proc.stderr.strip().splitlines()  # torch.hub's "Downloading: URL to FILE", then the error
    assert notice.startswith(f'Downloading: "http://127.0.0.1:{port}/{MOBILENET.file}"')
    assert line.startswith("error: ImageNet weights for mobilenet_v2 are not on this machine and cannot be downloaded")
    assert f"https://download.pytorch.org/models/{MOBILENET.file}" in line
    assert str(home / "hub" / "checkpoints") in line
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_dlkit_train_with_weights_and_a_frozen_base(imagenet, pets, tmp_path):
    out = tmp_path / "adhoc"
    proc = dlkit("train", "--model", "mobilenet_v2", "--weights", "imagenet", "--freeze", "base", "--data", str(pets),
                 "--epochs", "1", "--set", "data.image_size=32", "--quiet", "--out", str(out),
                 env={"TORCH_HOME": os.environ["TORCH_HOME"]})
    # the subprocess has torchvision's real table: it looks for the real file name, which is not cached
    assert proc.returncode == 2 and MOBILENET.file in proc.stderr
    weights = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / imagenet.file
    proc = dlkit("train", "--model", "mobilenet_v2", "--weights", str(weights), "--freeze", "base", "--data",
                 str(pets), "--epochs", "1", "--set", "data.image_size=32", "--quiet", "--out", str(out), env={})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["trainable_params"] == 1281  # the new 1-logit Linear on 1280 features
    assert summary["stages"][0]["cached_features"] is True
    assert json.loads((out / "bundle.json").read_text())["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_mnist_mobilenetv2_resizes_batch_by_batch_and_trains_on_cached_features(imagenet, mnist_dir, tmp_path,
                                                                              monkeypatch):
    from dlkit.data import vision

    lazy = []
    real = vision.is_lazy
    monkeypatch.setattr(vision, "LAZY_BYTES", 0)  # the smoke run is small: force the lazy path anyway
    monkeypatch.setattr(vision, "is_lazy", lambda *a: lazy.append(real(*a)) or lazy[-1])
    result = run("mnist-mobilenetv2", out=tmp_path / "run", overrides=[
        f"data.data_dir={mnist_dir}", "data.verify=false", "data.image_size=48", "data.subset=200",
        "data.val_split=0.05", "train.epochs=2"])
    s = result.summary
    assert s["stages"][0]["cached_features"] is True and s["n_train"] == 200 and s["n_test"] == 300
    assert s["stages"][0]["trainable_params"] == 165_258
    assert lazy == [True]  # 28x28 grey stored, 48x48x3 made batch by batch
    # (no accuracy claim: the test's "ImageNet" base knows two photos, not digits)


def test_a_staged_transfer_run_killed_after_its_head_stage_resumes_exactly(imagenet, pets, tmp_path, monkeypatch,
                                                                           resume_check):
    # 2 steps an epoch; killed in the first step of fine-tuning, it resumes from the end of the head
    # stage (whose features were cached) and ends as the uninterrupted run
    overrides = ["data.image_size=64", f"data.path={pets}", "data.augment={}", "train.stages.0.epochs=2",
                 "train.stages.1.epochs=2"]
    full = resume_check.same_after_resume(monkeypatch, "catsdogs-mobilenetv2", overrides, 5, "kill")
    assert [s["cached_features"] for s in full.summary["stages"]] == [True, False]
    assert "resumed from checkpoints/state-000000004.safetensors (the end of epoch 2)" in json.loads(
        (tmp_path / "cut" / "summary.json").read_text())["notes"]
