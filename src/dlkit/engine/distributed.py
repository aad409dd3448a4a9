"""Many processes (torchrun): which rank this is, and the few collective steps training needs.

dlkit's meaning of a recipe does not change with the number of processes. `train.batch_size` is the
global batch: every rank draws the same seeded global order and takes its contiguous share of each
global batch (`share`), and each rank's loss is weighted by its share of the batch, so the averaged
gradient is the one-process gradient. Validation and test are split into whole evaluation batches,
contiguous blocks per rank, with no padded duplicates; their per-batch sums (`gather_sums`) and
outputs (`gather_rows`) come back in order, so the metrics are those one process computes with the
same weights. Rank 0 alone writes the run directory. Augmentation and dropout draw from generators
seeded by the run's seed, the rank and the step (`step_seed`), so they differ across ranks and a
resumed run draws the same numbers.

Launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment):
NCCL on CUDA, gloo on the CPU. Without those variables everything here is a no-op (`SINGLE`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from dlkit.collective import gather_rows, my_block
from dlkit.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place among `world` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- training -----------------------------------------------------------------------------------

    def share(self, idx: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch's row indices (sizes differ by one at most)."""
        if not self.enabled:
            return idx
        return torch.tensor_split(idx, self.world)[self.rank]

    def step_seed(self, seed: int, step: int) -> int:
        """A seed for this rank's augmentation and dropout at a global step."""
        digest = hashlib.sha256(f"{seed}/{self.rank}/{step}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def agree(self, *flags: bool, device: torch.device) -> list[bool]:
        """Each flag true on every rank if it is true on any (a stop asked for, a checkpoint due)."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def all_sum(self, t: Tensor) -> Tensor:
        """`t` summed over ranks (a copy; `t` itself is left as it was)."""
        if not self.enabled:
            return t
        out = t.detach().clone()
        tdist.all_reduce(out)
        return out

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch norm's running statistics) on every rank, so that evaluation and
        checkpoints use the model rank 0 saves."""
        if self.enabled:
            for b in model.buffers():
                tdist.broadcast(b, 0)

    # ---- evaluation ---------------------------------------------------------------------------------

    def my_batches(self, n_batches: int) -> range:
        """The evaluation batches this rank computes: a contiguous block, none twice, none padded."""
        return my_block(n_batches) if self.enabled else range(n_batches)

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's rows of `t`, concatenated in rank order, on every rank (rows may differ in number)."""
        return gather_rows(t) if self.enabled else t


SINGLE = Dist()


def from_env() -> Dist:
    """The Dist torchrun's environment describes (SINGLE without it); joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not tdist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank)
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """A rank's device: its own GPU (LOCAL_RANK) on CUDA."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def check_sync_batchnorm(wanted: bool, dist: Dist, device: torch.device) -> None:
    if wanted and dist.enabled and device.type != "cuda":
        raise ConfigError("train.sync_batchnorm needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU; "
                          "set train.sync_batchnorm: false (each rank then keeps its own batch statistics)")


def close() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
