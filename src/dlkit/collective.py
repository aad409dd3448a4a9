"""The two collective steps lower layers need when many processes run one recipe (torchrun): which
block of the work is this process's, and everyone's results gathered back in order. Without a
process group (one process) the block is everything and gathering returns its input."""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor


def rank_world() -> tuple[int, int]:
    """(rank, number of processes) of the process group, (0, 1) without one."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def my_block(n: int) -> range:
    """This process's contiguous share of `n` items (sizes differ by one at most)."""
    rank, world = rank_world()
    if world == 1:
        return range(n)
    bounds = torch.tensor_split(torch.arange(n), world)[rank]
    return range(int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else range(0)


def gather_rows(t: Tensor) -> Tensor:
    """Every process's rows of `t`, concatenated in rank order, on every process (counts may differ)."""
    rank, world = rank_world()
    if world == 1:
        return t
    home = t.device
    if tdist.get_backend() == "nccl":  # NCCL moves GPU tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    rows = [int(s) for s in sizes]
    padded = torch.zeros((max(rows), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(home)
