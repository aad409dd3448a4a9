"""Data-set registry: each source loads a DataBundle from the recipe's DataCfg and the seed."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dlkit.config import DataCfg
from dlkit.data.bundle import DataBundle, Task, TensorSplit
from dlkit.registry import Registry

Loader = Callable[[DataCfg, int], DataBundle]


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know of a data set before any data is loaded."""

    input_shape: tuple[int, ...]
    num_classes: int
    task: Task

    @property
    def num_outputs(self) -> int:
        return 1 if self.task in ("binary", "regression") else self.num_classes


@dataclass(frozen=True)
class DataSource:
    """A registered data set: its loader, for data that may not be on disk its shape, and a line
    saying what it is (`dlkit list datasets`)."""

    load: Loader
    shape: Callable[[DataCfg], DataShape] | None = None
    description: str | None = None


DATASETS: Registry[DataSource] = Registry("dataset")


def register_dataset(name: str, shape: Callable[[DataCfg], DataShape] | None = None, *,
                     description: str | None = None) -> Callable[[Loader], Loader]:
    """Decorator registering a loader; give `shape` when the data may be absent (downloads). Write
    `description` as a string literal (or a module-level string constant): `dlkit list` reads it from
    the source without importing the loader (dlkit.registry.declared)."""

    def add(load: Loader) -> Loader:
        DATASETS.add(name, DataSource(load, shape, description))
        return load

    return add


def load_data(cfg: DataCfg, seed: int) -> DataBundle:
    """Load the data set the recipe names, split and preprocessed (seeded by `data.split_seed` when set)."""
    return DATASETS.get(cfg.name).load(cfg, seed if cfg.split_seed is None else cfg.split_seed)


def data_shape(cfg: DataCfg) -> DataShape:
    """The data set's input shape and classes; small bundled data is simply loaded to find out."""
    source = DATASETS.get(cfg.name)
    if source.shape is not None:
        return source.shape(cfg)
    bundle = source.load(cfg, 0)
    return DataShape(tuple(bundle.input_shape), len(bundle.classes), bundle.task)


from dlkit.data import cifar, folders, idx, tabular, text, vision  # noqa: E402,F401  (registers the loaders)

__all__ = ["DATASETS", "DataBundle", "DataShape", "DataSource", "TensorSplit", "data_shape", "load_data",
           "register_dataset"]
