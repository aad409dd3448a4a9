"""The data every recipe trains on: tensors in memory, split three ways, with their metadata."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

Task = Literal["multiclass", "binary", "regression"]
InputKind = Literal["image", "tabular", "tokens"]


@dataclass
class TensorSplit:
    """One split held as two tensors; batches are taken by indexing, never sample by sample.

    `transform`, when set, turns each batch of stored `x` into model inputs (e.g. small uint8 images
    resized and normalised on the fly, when holding them at the model's size would take gigabytes).
    `lengths`, when set (token ids), makes shuffled batches hold rows of similar length, so a batch
    is only as long as its longest row.
    """

    x: Tensor
    y: Tensor
    transform: Callable[[Tensor], Tensor] | None = None
    lengths: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> TensorSplit:
        """This split on `device` (no copy when already there)."""
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (x, y) batches of model inputs; with `shuffle`, a fresh permutation drawn from `generator`."""
        if shuffle:
            for idx in self.order(batch_size, generator):
                yield self.take(idx)
            return
        for start in range(0, len(self), batch_size):
            yield self.rows(start, start + batch_size)

    def rows(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """The (x, y) batch of rows start..end-1 in stored order, x as model inputs (a view where it can)."""
        x = self.x[start:end]
        return (self.transform(x) if self.transform is not None else x), self.y[start:end]

    def order(self, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """One epoch's batches as row indices (CPU int64), drawn from `generator`: a random permutation
        cut into batches, or length-bucketed batches for token rows. A checkpoint keeps this list, so
        a resumed epoch takes the same batches in the same order."""
        if self.lengths is None:
            return list(torch.randperm(len(self), generator=generator).split(batch_size))
        return bucketed(self.lengths, batch_size, generator)

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The (x, y) batch of rows `idx`, x as model inputs."""
        idx = idx.to(self.x.device)
        x = self.x[idx]
        return (self.transform(x) if self.transform is not None else x), self.y[idx]

    def inputs(self) -> Tensor:
        """Every model input at once (the stored tensor itself when there is no transform)."""
        return self.x if self.transform is None else self.transform(self.x)

    def class_counts(self, num_classes: int) -> list[int]:
        """How many examples of each class this split holds."""
        return torch.bincount(self.y.long().flatten().cpu(), minlength=num_classes).tolist()


BUCKET_BATCHES = 50  # rows are sorted by length within windows of this many batches


def bucketed(lengths: Tensor, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Shuffled batches of row indices where each batch holds rows of similar length.

    A random permutation is cut into windows of BUCKET_BATCHES batches, each window sorted by
    length and cut into batches, and the batches shuffled: every epoch still sees new batches.
    """
    perm = torch.randperm(len(lengths), generator=generator)
    window = batch_size * BUCKET_BATCHES
    ordered = torch.cat([w[torch.argsort(lengths[w], stable=True)] for w in perm.split(window)])
    batches = ordered.split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@dataclass
class DataBundle:
    """Train / val / test splits plus what a model and a predictor need to know about them.

    `preprocessing` is the JSON-able spec (see data.preprocess) that turns a raw input into the
    model's input; the training tensors were made with that same spec.
    """

    train: TensorSplit
    val: TensorSplit | None
    test: TensorSplit
    classes: list[str]
    input_shape: tuple[int, ...]
    task: Task
    input_kind: InputKind
    preprocessing: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        """Output units of the model: one for binary (a sigmoid logit) and regression."""
        return 1 if self.task in ("binary", "regression") else len(self.classes)

    def fingerprint(self) -> str:
        """sha256 over every split's bytes: the same data gives the same fingerprint."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            if split is None:
                continue
            for t in (split.x, split.y):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
