"""ResNet-20 (S1.7) training throughput on CIFAR-shaped data, two ways in one process.

dlkit: the engine with the cifar10-resnet recipe's settings (SGD 0.1 / 0.9 / 1e-4, batch 128,
4-pixel padded crop + flip applied batched on tensors, bf16 autocast where the CPU has it,
channels_last, data as one tensor batched by indexing).
plain: the notebook way, a Dataset whose __getitem__ pads, crops and flips each image, a DataLoader
at batch 128, fp32.
Both train the same initial weights on the same images. Prints one JSON line with images/s.
Target: speedup >= 2.0.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from dlkit.data import DataBundle, TensorSplit
from dlkit.data.transforms import make_augment
from dlkit.engine import fit
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.models import build
from dlkit.recipes import load_recipe
from reference import plain_loop_seconds


class PaddedCropFlip(torch.utils.data.Dataset):
    """Per-sample augmentation as a notebook writes it: pad 4, random 32x32 crop, random flip."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.pad(self.x[i], (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = img[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


def plain_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One fp32 epoch through a DataLoader with per-sample augmentation; returns seconds."""
    loader = torch.utils.data.DataLoader(PaddedCropFlip(x, y), batch_size=128, shuffle=True)
    return plain_loop_seconds(model, loader, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))


def main(n: int = 5120) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    recipe = load_recipe("cifar10-resnet", epochs=1)
    device = resolve_device("cpu")
    precision = resolve_precision(recipe.train.precision, device)
    prep = {"kind": "image", "channels": 3, "size": [32, 32], "mean": None, "std": None, "invert": "never"}
    augment = make_augment(recipe.data.augment, prep)

    seed_everything(0)
    dlkit_model = build("resnet20", num_classes=10, input_shape=(3, 32, 32))
    plain_model = build("resnet20", num_classes=10, input_shape=(3, 32, 32))
    plain_model.load_state_dict(dlkit_model.state_dict())
    bundle = DataBundle(TensorSplit(x, y), None, TensorSplit(x[:128], y[:128]), [str(i) for i in range(10)],
                        (3, 32, 32), "multiclass", "image", prep)

    def dlkit_epoch(model: torch.nn.Module, data: DataBundle) -> float:
        return fit(model, data, recipe.train, device=device, precision=precision,
                   generator=torch.Generator().manual_seed(0), augment=augment).train_seconds

    # warm-up on throwaway copies: oneDNN builds its kernels on first use, for each dtype and layout
    warm = DataBundle(TensorSplit(x[:512], y[:512]), None, bundle.test, bundle.classes, (3, 32, 32),
                      "multiclass", "image", prep)
    dlkit_epoch(copy.deepcopy(dlkit_model), warm)
    plain_epoch(copy.deepcopy(plain_model), x[:512], y[:512])

    dlkit_s = dlkit_epoch(dlkit_model, bundle)
    plain_s = plain_epoch(plain_model, x, y)
    print(json.dumps({
        "benchmark": "resnet_speed/resnet20_cifar_epoch", "images": n, "batch_size": recipe.train.batch_size,
        "threads": torch.get_num_threads(), "dlkit_precision": precision,
        "dlkit_images_per_s": round(n / dlkit_s, 1), "plain_images_per_s": round(n / plain_s, 1),
        "dlkit_seconds": round(dlkit_s, 3), "plain_seconds": round(plain_s, 3),
        "speedup": round(plain_s / dlkit_s, 3),
    }))


if __name__ == "__main__":
    main()
