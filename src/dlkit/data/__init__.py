"""Data-set registry: each loader takes the recipe's DataCfg and the seed and returns a DataBundle."""
from __future__ import annotations

from collections.abc import Callable

from dlkit.config import DataCfg
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.registry import Registry

DATASETS: Registry[Callable[[DataCfg, int], DataBundle]] = Registry("dataset")


def load_data(cfg: DataCfg, seed: int) -> DataBundle:
    """Load the data set the recipe names, split and preprocessed."""
    return DATASETS.get(cfg.name)(cfg, seed)


from dlkit.data import tabular, vision  # noqa: E402,F401  (registers the loaders)

__all__ = ["DATASETS", "DataBundle", "TensorSplit", "load_data"]
