"""Re-test a finished run: rebuild its model from the bundle and its data from the recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dlkit.data import DataBundle, load_data
from dlkit.engine.checkpoint import load_run_model
from dlkit.errors import DataError, RunDirError
from dlkit.evaluate.predictions import measure_test
from dlkit.rundir import RunDir


def load_run(run_dir: str | Path, model: nn.Module | None = None, data: DataBundle | None = None, *,
             data_path: str | Path | None = None, data_dir: str | Path | None = None,
             ) -> tuple[RunDir, nn.Module, DataBundle]:
    """The run with its model and data: those given, else rebuilt from the bundle and the recipe
    (the data must be the data it was trained on). `data_path` / `data_dir` say where the data are
    now when they moved: they replace the recipe's data.path / data.data_dir before loading."""
    run = RunDir.open(run_dir)
    if model is None:
        model = load_run_model(run)
    if data is None:
        recipe = run.recipe()
        moved = {"path": data_path, "data_dir": data_dir}
        for field, value in moved.items():
            if value is not None:
                setattr(recipe.data, field, str(Path(value).expanduser()))
        try:
            data = load_data(recipe.data, recipe.seed)
        except DataError as exc:
            recorded = [f"data.{f}" for f, v in moved.items() if v is None and getattr(recipe.data, f)]
            if not recorded:
                raise
            options = " or ".join({"data.path": "--data PATH", "data.data_dir": "--data-dir DIR"}[r] for r in recorded)
            raise DataError(f"{exc} (as the run recorded its {' and '.join(recorded)}; if the data moved, "
                            f"pass {options})") from None
        if data.fingerprint() != run.bundle()["data_fingerprint"]:
            raise RunDirError(f"the data loaded for {run.path} differ from the data it was trained on "
                              "(files changed?); evaluate on the original data")
    return run, model, data


def evaluate_run(path: str | Path, *, data_path: str | Path | None = None,
                 data_dir: str | Path | None = None) -> dict[str, Any]:
    """Test metrics of a finished run, recomputed (on the CPU, in fp32), on its data where they are now."""
    run, model, data = load_run(path, data_path=data_path, data_dir=data_dir)
    metrics, _ = measure_test(model, data, run.recipe().train.eval_batch_size)
    return {"run": str(run.path), "recipe": run.recipe().name, "n_test": len(data.test), **metrics}
