"""Frozen-base feature caching: a stage that trains only the head on a frozen base computes the
base's outputs once and trains the head on them, instead of running the base every batch."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from dlkit.data.bundle import TensorSplit
from dlkit.data.transforms import Augment
from dlkit.engine.distributed import SINGLE, Dist
from dlkit.engine.freeze import frozen_prefix, run_prefix
from dlkit.engine.runtime import autocast

CACHE_LIMIT = 4 << 30  # bytes of cached features kept on the device at most


@dataclass
class FeatureCache:
    """A frozen prefix's outputs for the train and validation splits, computed once."""

    prefix: list[nn.Module]
    train: TensorSplit
    val: TensorSplit | None
    seconds: float
    rest: nn.Module | None = None  # the part of the model that trains on the cached features


def build_cache(prefix: list[nn.Module], train: TensorSplit, val: TensorSplit | None, *, device: torch.device,
                precision: str, batch_size: int, dist: Dist = SINGLE) -> FeatureCache | str:
    """Run the frozen prefix once over train and val; the reason instead when it would not fit in memory.
    With many processes each rank computes a block of the batches and every rank gets them all: the
    features are computed once, in the batches one process uses (the same numbers)."""
    tick = time.perf_counter()
    with autocast(device, precision):
        probe = run_prefix(prefix, next(train.batches(1))[0])
    need = probe[0].numel() * probe.element_size() * (len(train) + (len(val) if val is not None else 0))
    if need > CACHE_LIMIT:
        return f"the features would take {need / 2**30:.1f} GiB (more than {CACHE_LIMIT / 2**30:.0f} GiB)"

    def cached(split: TensorSplit) -> TensorSplit:
        parts = []
        for b in dist.my_batches(math.ceil(len(split) / batch_size)):
            xb, _ = split.rows(b * batch_size, (b + 1) * batch_size)
            with autocast(device, precision):
                parts.append(run_prefix(prefix, xb))
        mine = torch.cat(parts) if parts else probe[:0]
        return TensorSplit(dist.gather_rows(mine), split.y)

    return FeatureCache(prefix, cached(train), cached(val) if val is not None else None, time.perf_counter() - tick)


def stage_cache(model: nn.Module, previous: FeatureCache | None, train: TensorSplit, val: TensorSplit | None,
                 augment: Augment | None, device: torch.device, precision: str,
                 batch_size: int, dist: Dist = SINGLE) -> tuple[FeatureCache | None, str]:
    """The cache a frozen-base stage trains on (reused from the previous stage when its prefix is the
    same frozen modules), or None and the reason it cannot have one."""
    if augment is not None:
        return previous, "augmentation changes the base's input every epoch (turn data.augment off to train on cached features)"
    split = frozen_prefix(model)
    if isinstance(split, str):
        return previous, split
    prefix, rest = split
    if previous is not None and len(previous.prefix) == len(prefix) and all(
            a is b for a, b in zip(previous.prefix, prefix)):
        return replace(previous, rest=rest), ""
    cache = build_cache(prefix, train, val, device=device, precision=precision, batch_size=batch_size, dist=dist)
    if isinstance(cache, str):
        return previous, cache
    return replace(cache, rest=rest), ""
