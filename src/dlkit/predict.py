"""Prediction from a run's bundle alone: rebuild the model, prepare inputs as in training."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dlkit.data.preprocess import prep_from_dict, read_input
from dlkit.engine.checkpoint import load_run_model
from dlkit.engine.loop import predict_outputs
from dlkit.evaluate.metrics import probabilities
from dlkit.rundir import RunDir


@dataclass
class Predictor:
    """A trained model plus the preprocessing and class names it was trained with."""

    model: nn.Module
    bundle: dict[str, Any]

    @classmethod
    def from_run(cls, path: str | Path) -> Predictor:
        """Load a finished run's bundle and weights (safetensors, sha256-checked) onto the CPU."""
        run = RunDir.open(path)
        model = load_run_model(run)
        return cls(model, run.bundle())

    @property
    def classes(self) -> list[str]:
        return self.bundle["classes"]

    def predict_tensor(self, x: Tensor) -> list[dict[str, Any]]:
        """Label, confidence and per-class probabilities for each row of a prepared batch."""
        logits = predict_outputs(self.model, x, device=torch.device("cpu"))
        if self.bundle["task"] == "regression":
            return [{"value": float(v)} for v in logits.reshape(len(x), -1)[:, 0]]
        probs = probabilities(logits, self.bundle["task"])
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({
                "label": self.classes[best],
                "confidence": round(float(row[best]), 6),
                "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, row)},
            })
        return results

    def predict(self, sources: list[str]) -> list[dict[str, Any]]:
        """One result per input example; a CSV of several rows gives one result per row."""
        spec = prep_from_dict(self.bundle["preprocessing"])
        results = []
        for source in sources:
            x = read_input(source, spec)
            rows = self.predict_tensor(x)
            for i, row in enumerate(rows):
                label = source if len(rows) == 1 else f"{source}:{i + 1}"
                results.append({"input": label, **row})
        return results
