"""Epochs of the S0.2 IMDb LSTM over 25,000 generated reviews of up to 200 ids, two ways in one process.

The data: a vocabulary of 10,000 ids; review lengths drawn like IMDb's (log-normal, median 174
words, as in aclImdb's training set) and cut at 200, pre-padded as Keras' pad_sequences does; the
label is decided by sentiment ids scattered among random words (learnable, not trivial: 4-8 of
them among up to 200). Test: 5,000 more reviews.

plain: the notebook way, fp32 at batch 32: Embedding(10000, 128) -> LSTM(128) over the padded batch,
the last step's output -> Linear(1), BCE, Adam, a DataLoader over shuffled rows.
dlkit: the imdb-lstm recipe's model and settings (batch 32, Adam 1e-3, dropout 0.2 and recurrent
dropout 0.2) through the engine: left-aligned ids read without packing, batches of similar length
(each only as long as its longest review), bf16 autocast where the CPU has it, fused Adam.
Both train three epochs (timed per epoch) and are tested after them.
Prints one JSON line. Target: speedup >= 1.5 with test accuracy within a point.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from dlkit.data import DataBundle, TensorSplit
from dlkit.engine import fit, predict_outputs
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.models import build
from dlkit.recipes import load_recipe
from reference import plain_loop_seconds

VOCAB, MAX_LEN = 10_000, 200
EPOCHS = 3  # one epoch leaves both loops mid-way up the learning curve, where accuracy is noise
SENTIMENT = 20  # ids 2..21 say positive, 22..41 negative


def reviews(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-padded ids (n, 200) and 0/1 labels: random words plus 3-6 sentiment ids of the label's kind."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(174), 0.6, n), 10, MAX_LEN).astype(int)
    labels = rng.integers(0, 2, n)
    x = np.zeros((n, MAX_LEN), dtype=np.int64)
    for i, (length, label) in enumerate(zip(lengths, labels)):
        row = rng.integers(2 + 2 * SENTIMENT, VOCAB, length)
        k = min(length, int(rng.integers(4, 9)))
        first = 2 if label else 2 + SENTIMENT
        row[rng.choice(length, k, replace=False)] = rng.integers(first, first + SENTIMENT, k)
        x[i, MAX_LEN - length:] = row
    return torch.from_numpy(x), torch.from_numpy(labels).float()


class NotebookLSTM(nn.Module):
    """S0.2 as a PyTorch notebook writes it: embedding, LSTM over the padded batch, last step, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128)
        self.drop = nn.Dropout(0.2)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.out = nn.Linear(128, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.drop(self.embed(ids)))
        return self.out(out[:, -1]).squeeze(1)


def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), y)


def plain_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, eps: float, epochs: int) -> float:
    """DataLoader epochs over shuffled rows, fp32; seconds in all."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
    dataset = torch.utils.data.TensorDataset(x, y)
    g = torch.Generator().manual_seed(0)
    seconds = 0.0
    for _ in range(epochs):
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=torch.randperm(len(x), generator=g).tolist())
        seconds += plain_loop_seconds(model, loader, optimizer, bce)
    return seconds


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """fp32 test accuracy of a one-logit model."""
    logits = predict_outputs(model, x, device=torch.device("cpu"), batch_size=500)
    return ((logits.reshape(-1) > 0).float() == y).float().mean().item()


def main() -> None:
    n_train, n_test = 25_000, 5_000
    x, y = reviews(n_train, seed=1)
    xt, yt = reviews(n_test, seed=2)
    recipe = load_recipe("imdb-lstm", epochs=EPOCHS)
    cfg = recipe.train
    opt = cfg.optimizer
    seed_everything(0)
    dlkit_model = build("lstm", num_classes=1, input_shape=(MAX_LEN,), **recipe.model.args())
    plain_model = NotebookLSTM()
    device = resolve_device("cpu")
    precision = resolve_precision(cfg.precision, device)
    lengths = (x != 0).sum(1)
    bundle = DataBundle(TensorSplit(x, y, lengths=lengths), None, TensorSplit(xt, yt), ["neg", "pos"], (MAX_LEN,),
                        "binary", "tokens", {})

    def dlkit_epoch(model: nn.Module, data: DataBundle) -> float:
        return fit(model, data, cfg, device=device, precision=precision,
                   generator=torch.Generator().manual_seed(0)).train_seconds

    # warm-up on throwaway copies: oneDNN builds its kernels on first use, for each dtype and shape
    warm = DataBundle(TensorSplit(x[:1024], y[:1024], lengths=lengths[:1024]), None, bundle.test, bundle.classes,
                      (MAX_LEN,), "binary", "tokens", {})
    dlkit_epoch(copy.deepcopy(dlkit_model), warm)
    plain_epochs(copy.deepcopy(plain_model), x[:1024], y[:1024], opt.lr, opt.eps, 1)

    torch.manual_seed(0)
    dlkit_s = dlkit_epoch(dlkit_model, bundle)
    torch.manual_seed(0)
    plain_s = plain_epochs(plain_model, x, y, opt.lr, opt.eps, EPOCHS)
    acc_dlkit, acc_plain = accuracy(dlkit_model, xt, yt), accuracy(plain_model, xt, yt)
    print(json.dumps({
        "benchmark": "lstm_speed/imdb_lstm_epochs",
        "n_train": n_train, "n_test": n_test, "max_len": MAX_LEN, "mean_length": round(float(lengths.float().mean()), 1),
        "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
        "epochs": EPOCHS, "dlkit_seconds_per_epoch": round(dlkit_s / EPOCHS, 3), "dlkit_precision": precision,
        "plain_seconds_per_epoch": round(plain_s / EPOCHS, 3),
        "dlkit_test_accuracy": round(acc_dlkit, 4), "plain_test_accuracy": round(acc_plain, 4),
        "accuracy_gap_points": round(100 * (acc_dlkit - acc_plain), 2),
        "speedup": round(plain_s / dlkit_s, 3),
    }))


if __name__ == "__main__":
    main()
