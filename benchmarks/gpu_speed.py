"""The CUDA path, measured on a GPU: ResNet-20 on CIFAR-10-shaped data (dlkit: bf16 autocast where the
GPU has it, channels_last, data as one tensor on the GPU, augmentation batched on the GPU; plain: the
notebook's DataLoader with per-sample augmentation, fp32) in images per second, and the S0.1 CNN
(mnist-cnn's settings) epoch time on 60,000 MNIST-shaped images. One JSON line each; on a machine
without CUDA one line saying so (nothing in the suite depends on a GPU).

The distributed half of the GPU check (NCCL) is `benchmarks/gpu_check.sh`, which runs this file too.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dlkit.data import DataBundle, TensorSplit
from dlkit.data.transforms import make_augment
from dlkit.engine import fit
from dlkit.engine.runtime import resolve_precision, seed_everything
from dlkit.models import build
from dlkit.recipes import load_recipe
from reference import plain_loop_seconds
from resnet_speed import PaddedCropFlip


def setup(recipe_name: str, model_name: str, shape: tuple[int, ...], n: int, device: torch.device):
    """Random images of `shape` with labels as one DataBundle, the recipe's settings, a seeded model."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    recipe = load_recipe(recipe_name, epochs=1)
    precision = resolve_precision(recipe.train.precision, device)
    prep = {"kind": "image", "channels": shape[0], "size": list(shape[1:]), "mean": None, "std": None,
            "invert": "never"}
    seed_everything(0)
    model = build(model_name, num_classes=10, input_shape=shape)
    data = DataBundle(TensorSplit(x, y), None, TensorSplit(x[:128], y[:128]), [str(i) for i in range(10)], shape,
                      "multiclass", "image", prep)
    return x, y, recipe, precision, prep, model, data


def resnet(device: torch.device, n: int = 20_480) -> dict:
    x, y, recipe, precision, prep, model, data = setup("cifar10-resnet", "resnet20", (3, 32, 32), n, device)

    def dlkit_s(m: torch.nn.Module, d: DataBundle) -> float:
        torch.cuda.synchronize()
        seconds = fit(m, d, recipe.train, device=device, precision=precision, generator=torch.Generator().manual_seed(0),
                      augment=make_augment(recipe.data.augment, prep)).train_seconds
        torch.cuda.synchronize()
        return seconds

    def plain_s(m: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> float:
        m = m.to(device)
        loader = torch.utils.data.DataLoader(PaddedCropFlip(xs, ys), batch_size=128, shuffle=True, num_workers=4,
                                             pin_memory=True)
        moved = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)) for xb, yb in loader)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        seconds = plain_loop_seconds(m, moved, opt)
        torch.cuda.synchronize()
        return seconds

    small = DataBundle(TensorSplit(x[:2048], y[:2048]), None, data.test, data.classes, (3, 32, 32), "multiclass",
                       "image", prep)
    dlkit_s(copy.deepcopy(model), small)  # warm-up: cuDNN picks its kernels on first use
    plain_s(copy.deepcopy(model), x[:2048], y[:2048])
    d, p = dlkit_s(copy.deepcopy(model), data), plain_s(copy.deepcopy(model), x, y)
    return {"benchmark": "gpu_speed/resnet20_cifar_epoch", "device": torch.cuda.get_device_name(device),
            "images": n, "dlkit_precision": precision, "dlkit_images_per_s": round(n / d, 1),
            "plain_images_per_s": round(n / p, 1), "speedup": round(p / d, 3)}


def seed_cnn(device: torch.device, n: int = 60_000) -> dict:
    _, _, recipe, precision, _, model, data = setup("mnist-cnn", "seed_cnn", (1, 28, 28), n, device)
    fit(copy.deepcopy(model), data, recipe.train, device=device, precision=precision,
        generator=torch.Generator().manual_seed(0))  # warm-up
    tick = time.perf_counter()
    fit(model, data, recipe.train, device=device, precision=precision, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    return {"benchmark": "gpu_speed/s0.1_cnn_epoch", "device": torch.cuda.get_device_name(device), "images": n,
            "batch_size": recipe.train.batch_size, "precision": precision,
            "epoch_seconds": round(time.perf_counter() - tick, 3)}


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_speed", "skipped": "no CUDA device on this machine"}))
        return
    device = torch.device("cuda")
    print(json.dumps(resnet(device)), flush=True)
    print(json.dumps(seed_cnn(device)), flush=True)


if __name__ == "__main__":
    main()
