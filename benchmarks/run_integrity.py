"""What the run-directory guarantees cost: an atomic, fsynced checkpoint with its metadata in the file,
against safetensors' plain save_file; and a model loaded after checking its sha256 (as predict,
evaluate and report do), against a plain load_file.

The weights are ResNet-50-sized (25.6M float32 parameters, about 100 MB) in one state dict of 160
tensors; each way runs REPEATS times after a warm-up and the median is kept. Prints one JSON line:
seconds each way and their ratios. The page cache is warm for both loads: the ratio is the price
of hashing the bytes, not of reading them from disk.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dlkit.engine.checkpoint import load_weights, save_weights
from dlkit.files import sha256_file

PARAMS, TENSORS, REPEATS = 25_600_000, 160, 5


class Weights(nn.Module):
    """A module holding TENSORS parameters of PARAMS floats in all."""

    def __init__(self) -> None:
        super().__init__()
        size = PARAMS // TENSORS
        gen = torch.Generator().manual_seed(0)
        self.params = nn.ParameterList(nn.Parameter(torch.randn(size, generator=gen)) for _ in range(TENSORS))


def median_seconds(step: Callable[[], object]) -> float:
    step()  # warm-up
    times = []
    for _ in range(REPEATS):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    model = Weights()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"epoch": 7, "stage": 0, "metrics": {"train_loss": 0.1, "val_loss": 0.2}}
    with tempfile.TemporaryDirectory() as folder:
        plain, ours = Path(folder) / "plain.safetensors", Path(folder) / "last.safetensors"
        save_plain = median_seconds(lambda: save_file(state, str(plain)))
        save_ours = median_seconds(lambda: save_weights(model, ours, meta))
        digest = sha256_file(ours)

        def verified_load() -> None:
            assert sha256_file(ours) == digest  # as RunDir.verify checks before a load
            load_weights(model, ours)

        load_plain = median_seconds(lambda: model.load_state_dict(load_file(str(plain))))
        load_ours = median_seconds(verified_load)
        size_mb = ours.stat().st_size / 1e6
    print(json.dumps({
        "benchmark": "run_integrity/checkpoint_and_verified_load",
        "megabytes": round(size_mb, 1), "threads": torch.get_num_threads(),
        "save_plain_s": round(save_plain, 4), "save_atomic_fsync_s": round(save_ours, 4),
        "save_ratio": round(save_ours / save_plain, 2),
        "load_plain_s": round(load_plain, 4), "load_sha256_checked_s": round(load_ours, 4),
        "load_ratio": round(load_ours / load_plain, 2),
    }))


if __name__ == "__main__":
    main()
