"""Small in-memory data bundles made from seeded random tensors, for the engine tests."""
from __future__ import annotations

import pytest
import torch

from dlkit.data.bundle import DataBundle, Task, TensorSplit


def random_bundle(task: Task = "multiclass", n: int = 64, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10,
                  n_val: int = 0, seed: int = 0) -> DataBundle:
    """Gaussian inputs with random labels (multiclass, binary) or a noiseless linear target (regression)."""
    g = torch.Generator().manual_seed(seed)

    def split(rows: int) -> TensorSplit:
        x = torch.randn(rows, *shape, generator=g)
        if task == "multiclass":
            y = torch.randint(0, classes, (rows,), generator=g)
        elif task == "binary":
            y = torch.randint(0, 2, (rows,), generator=g).float()
        else:
            y = x.flatten(1) @ weights
        return TensorSplit(x, y)

    weights = torch.randn(int(torch.tensor(shape).prod()), generator=g) / 4
    train = split(n)
    val = split(n_val) if n_val else None
    names = [str(i) for i in range(classes)] if task == "multiclass" else (["0", "1"] if task == "binary" else [])
    return DataBundle(train=train, val=val, test=split(8), classes=names, input_shape=shape, task=task,
                      input_kind="image" if len(shape) == 3 else "tabular", preprocessing={})


@pytest.fixture
def make_bundle():
    """The `random_bundle` factory."""
    return random_bundle


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: a second intra-op thread only adds OpenMP hand-offs, which stall for
    # hundreds of milliseconds per epoch when another process keeps the other core busy
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
