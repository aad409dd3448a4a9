"""Re-test a finished run: rebuild its model from the bundle and its data from the recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dlkit.data import DataBundle, load_data
from dlkit.engine.checkpoint import load_run_model
from dlkit.errors import RunDirError
from dlkit.evaluate.predictions import measure_test
from dlkit.rundir import RunDir


def load_run(run_dir: str | Path, model: nn.Module | None = None,
             data: DataBundle | None = None) -> tuple[RunDir, nn.Module, DataBundle]:
    """The run with its model and data: those given, else rebuilt from the bundle and the recipe
    (the data must be the data it was trained on)."""
    run = RunDir.open(run_dir)
    if model is None:
        model = load_run_model(run)
    if data is None:
        recipe = run.recipe()
        data = load_data(recipe.data, recipe.seed)
        if data.fingerprint() != run.bundle()["data_fingerprint"]:
            raise RunDirError(f"the data loaded for {run.path} differ from the data it was trained on "
                              "(files changed?); evaluate on the original data")
    return run, model, data


def evaluate_run(path: str | Path) -> dict[str, Any]:
    """Test metrics of a finished run, recomputed (on the CPU, in fp32)."""
    run, model, data = load_run(path)
    metrics, _ = measure_test(model, data, run.recipe().train.eval_batch_size)
    return {"run": str(run.path), "recipe": run.recipe().name, "n_test": len(data.test), **metrics}
