"""Prediction from a run's bundle alone: rebuild the model, prepare inputs as in training."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dlkit.data.folders import IMAGE_SUFFIXES
from dlkit.data.preprocess import ImagePrep, prep_from_dict, read_input_noted
from dlkit.engine.checkpoint import load_run_model
from dlkit.engine.loop import predict_outputs
from dlkit.errors import DlkitError, InputError
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

    def predict_tensor(self, x: Tensor, note: str | None = None) -> list[dict[str, Any]]:
        """Label, confidence and per-class probabilities for each row of a prepared batch, and `note`
        (why the input does not look like the training data) on each when given."""
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
                **({"note": note} if note else {}),
            })
        return results

    def predict(self, sources: list[str], *, errors: Literal["raise", "report"] = "raise") -> list[dict[str, Any]]:
        """One result per input example; a CSV of several rows gives one result per row, and (image
        models) a folder stands for the image files directly inside it, by name; other files skipped.

        `errors="raise"`: the first input that cannot be read raises its one-line DlkitError (nothing
        is returned). `errors="report"`: that input's result is `{"input": ..., "error": message}`,
        in its place, and the other inputs are still predicted; an empty folder is such an error.
        A digit model's result has a `note` when its picture does not look like the training digits
        (a colour photo, no ink, far more or less ink than a digit: `mnist_layout.digit_note`)."""
        spec = prep_from_dict(self.bundle["preprocessing"])
        results = []
        for source, problem in _expand(sources, isinstance(spec, ImagePrep)):
            try:
                if problem is not None:
                    raise problem
                rows = self.predict_tensor(*read_input_noted(source, spec))
            except DlkitError as exc:
                if errors == "raise":
                    raise
                results.append({"input": source, "error": str(exc)})
                continue
            for i, row in enumerate(rows):
                label = source if len(rows) == 1 else f"{source}:{i + 1}"
                results.append({"input": label, **row})
        return results


PREDICT_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")  # what a folder given to an image model contributes


def _expand(sources: list[str], images: bool) -> Iterator[tuple[str, InputError | None]]:
    """(input, None) for each input, a folder (for an image model) replaced by its image files in
    name order; (folder, its InputError) for a folder with none."""
    for source in sources:
        folder = Path(source).expanduser()
        if not images or not folder.is_dir():
            yield source, None
            continue
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PREDICT_SUFFIXES and p.is_file())
        if not files:
            yield source, InputError(f"{source}: folder holds no image files ({', '.join(PREDICT_SUFFIXES)}); "
                                     "give image files or a folder of them")
        yield from ((str(Path(source) / name), None) for name in files)
