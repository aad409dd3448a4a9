"""Re-test a finished run: rebuild its model from the bundle and its data from the recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlkit.data import load_data
from dlkit.engine.loop import predict_split
from dlkit.errors import RunDirError
from dlkit.evaluate.metrics import classification_metrics
from dlkit.predict import Predictor
from dlkit.rundir import RunDir


def evaluate_run(path: str | Path) -> dict[str, Any]:
    """Test metrics of a finished run, recomputed; the data must be the data it was trained on."""
    run = RunDir.open(path)
    recipe = run.recipe()
    predictor = Predictor.from_run(run.path)
    data = load_data(recipe.data, recipe.seed)
    if data.fingerprint() != predictor.bundle["data_fingerprint"]:
        raise RunDirError(f"the data loaded for {run.path} differ from the data it was trained on "
                          "(files changed?); evaluate on the original data")
    logits = predict_split(predictor.model, data.test, device=torch.device("cpu"))
    return {"run": str(run.path), "recipe": recipe.name, "n_test": len(data.test),
            **classification_metrics(logits, data.test.y, data.task)}
