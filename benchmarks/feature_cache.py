"""Training a head on a frozen base: an epoch with the base's features cached vs. computed every batch.

S0.3's set-up: MobileNetV2 at 160x160 under a GlobalAvgPool + Dense128 + Dropout 0.3 + Dense1 head,
base frozen, Adam, batch 32, on 2,000 generated training images (+ 400 validation images).
uncached: `cache_features: off`, the base runs forward on every batch of every epoch (as Keras
does with a frozen base inside the model). cached: `cache_features: auto`, the base runs once over
train and val and the epochs train the head on its pooled features.
Both runs start from the same weights in one process and must train the same head (reported as the
largest difference of its weights). Prints one JSON line: seconds per epoch each way (cache build
reported apart), the per-epoch speedup (target >= 5) and the speedup over a 10-epoch head stage with
the cache build counted. (The base here has random weights: speed does not depend on them.)
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dlkit.config import OptimizerCfg, TrainCfg
from dlkit.data import DataBundle, TensorSplit
from dlkit.engine import fit
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.models import build
from synthetic import digit_images

SIZE, HEAD = 160, {"pool": "avg", "hidden": [128], "dropout": 0.3}


def images(n: int, seed: int, part: str) -> TensorSplit:
    """RGB 160x160 digits (a colour per class) with binary labels: even vs odd."""
    x, y = digit_images(n, size=SIZE, seed=seed, part=part)
    tint = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5
    return TensorSplit(x.expand(-1, 3, -1, -1) * tint[y], (y % 2).float())


def main(n: int = 2000, n_val: int = 400, epochs: int = 3) -> None:
    device = resolve_device("cpu")
    precision = resolve_precision("auto", device)
    prep = {"kind": "image", "channels": 3, "size": [SIZE, SIZE], "mean": None, "std": None, "invert": "never"}
    data = DataBundle(images(n, 0, "train"), images(n_val, 1, "test"), images(64, 2, "test"), ["even", "odd"],
                      (3, SIZE, SIZE), "binary", "image", prep)
    seed_everything(0)
    model = build("mobilenet_v2", num_classes=1, input_shape=(3, SIZE, SIZE), head=HEAD)

    def run(mode: str, count: int, bundle: DataBundle = data):
        cfg = TrainCfg(epochs=count, batch_size=32, freeze="base", cache_features=mode, optimizer=OptimizerCfg(lr=1e-3))
        trained = copy.deepcopy(model)
        torch.manual_seed(0)  # the same dropout masks both ways
        history = fit(trained, bundle, cfg, device=device, precision=precision, generator=torch.Generator().manual_seed(0))
        return history, trained.head

    # warm-up of both paths on a slice: oneDNN builds its kernels on first use
    small = DataBundle(TensorSplit(data.train.x[:64], data.train.y[:64]), None, data.test, data.classes,
                       data.input_shape, data.task, "image", prep)
    run("off", 1, small), run("auto", 1, small)

    (plain, plain_head), (cached, cached_head) = run("off", epochs), run("auto", epochs)
    head_diff = max((a - b).abs().max().item() for a, b in zip(plain_head.parameters(), cached_head.parameters()))
    per_epoch = {k: sum(e["seconds"] for e in h.epochs) / len(h.epochs) for k, h in (("off", plain), ("auto", cached))}
    build_s = cached.stages[0]["cache_seconds"]
    stage = 10
    print(json.dumps({
        "benchmark": "feature_cache", "model": "mobilenet_v2", "image_size": SIZE, "n_train": n, "n_val": n_val,
        "precision": precision, "threads": torch.get_num_threads(),
        "uncached_epoch_s": round(per_epoch["off"], 3), "cached_epoch_s": round(per_epoch["auto"], 4),
        "cache_build_s": round(build_s, 3),
        "speedup_per_epoch": round(per_epoch["off"] / per_epoch["auto"], 1),
        f"speedup_{stage}_epochs_with_build": round(stage * per_epoch["off"] / (build_s + stage * per_epoch["auto"]), 2),
        "val_loss_uncached": round(plain.epochs[-1]["val_loss"], 5),
        "val_loss_cached": round(cached.epochs[-1]["val_loss"], 5),
        "head_max_abs_diff": float(f"{head_diff:.2e}"),  # the same head both ways, up to bf16 rounding
        "target_speedup_per_epoch": 5.0,
    }))


if __name__ == "__main__":
    main()
