"""One epoch of the seed MNIST CNN (S0.1) on 60,000 generated 28x28 images, two ways in one process.

dlkit: the engine with the digits-cnn recipe's training settings (Adam, batch 32, data as one
tensor batched by indexing, bf16 autocast where the CPU has it, channels_last, fused Adam).
plain: the notebook way, a TensorDataset + DataLoader loop in fp32 over the literal Keras-order
network (conv-relu-pool). A third timing runs the plain loop on dlkit's own model, so the JSON shows
how much of the speedup is the engine and how much the model (pool before relu).
Prints one JSON line. Target: speedup >= 2.0 with test accuracy within 0.5 points.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from dlkit.data import DataBundle, TensorSplit
from dlkit.engine import fit, predict_outputs
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.models import build
from dlkit.recipes import load_recipe
from reference import plain_loop_seconds
from synthetic import digit_images


def keras_order_cnn() -> nn.Sequential:
    """S0.1 exactly as a notebook writes it: conv-relu-pool twice, dense 128, dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Dropout(0.0), nn.Linear(128, 10),
    )


def plain_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, eps: float) -> float:
    """The DataLoader loop of a typical notebook, fp32; returns seconds.

    Its order is the permutation dlkit's engine draws for its first epoch (seed 0), so both loops
    see the same batches and their accuracies differ only by what each does per step.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, sampler=order)
    return plain_loop_seconds(model, loader, torch.optim.Adam(model.parameters(), lr=lr, eps=eps))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """fp32 test accuracy."""
    model = model.to(memory_format=torch.contiguous_format)
    logits = predict_outputs(model, x, device=torch.device("cpu"))
    return (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    n_train, n_test = 60_000, 10_000
    x, y = digit_images(n_train, seed=1, part="train")
    xt, yt = digit_images(n_test, seed=2, part="test")
    recipe = load_recipe("digits-cnn", epochs=1)
    cfg = recipe.train.model_copy(update={"early_stopping": None})
    opt = cfg.optimizer

    seed_everything(0)
    dlkit_model = build("seed_cnn", num_classes=10, input_shape=(1, 28, 28))
    init = {k: v.clone() for k, v in dlkit_model.state_dict().items()}
    plain_model = keras_order_cnn()
    # same starting weights: parameter order and shapes match layer for layer
    for p, q in zip(plain_model.parameters(), init.values()):
        p.data.copy_(q)
    same_model = build("seed_cnn", num_classes=10, input_shape=(1, 28, 28))
    same_model.load_state_dict(init)

    device = resolve_device("cpu")
    precision = resolve_precision(cfg.precision, device)
    bundle = DataBundle(TensorSplit(x, y), None, TensorSplit(xt, yt), [str(i) for i in range(10)], (1, 28, 28),
                        "multiclass", "image", {})
    def dlkit_epoch(model: nn.Module, data: DataBundle) -> float:
        return fit(model, data, cfg, device=device, precision=precision,
                   generator=torch.Generator().manual_seed(0)).train_seconds

    # warm-up on throwaway copies: oneDNN builds its kernels on first use, for each dtype and layout
    warm = DataBundle(TensorSplit(x[:2048], y[:2048]), None, bundle.test, bundle.classes, (1, 28, 28),
                      "multiclass", "image", {})
    dlkit_epoch(copy.deepcopy(dlkit_model), warm)
    plain_epoch(copy.deepcopy(plain_model), x[:2048], y[:2048], opt.lr, opt.eps)

    torch.manual_seed(0)
    dlkit_s = dlkit_epoch(dlkit_model, bundle)
    torch.manual_seed(0)
    plain_s = plain_epoch(plain_model, x, y, opt.lr, opt.eps)
    torch.manual_seed(0)
    same_s = plain_epoch(same_model, x, y, opt.lr, opt.eps)

    acc_dlkit, acc_plain = accuracy(dlkit_model, xt, yt), accuracy(plain_model, xt, yt)
    print(json.dumps({
        "benchmark": "train_speed/seed_cnn_mnist_epoch",
        "n_train": n_train, "n_test": n_test, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
        "dlkit_seconds": round(dlkit_s, 3), "dlkit_precision": precision, "plain_seconds": round(plain_s, 3),
        "plain_same_model_seconds": round(same_s, 3),
        "dlkit_test_accuracy": round(acc_dlkit, 4), "plain_test_accuracy": round(acc_plain, 4),
        "accuracy_gap_points": round(100 * (acc_dlkit - acc_plain), 2),
        "speedup": round(plain_s / dlkit_s, 3), "speedup_engine_only": round(same_s / dlkit_s, 3),
    }))


if __name__ == "__main__":
    main()
