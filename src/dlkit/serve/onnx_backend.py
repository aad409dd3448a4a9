"""Predictions through ONNX Runtime: a run's `model.onnx` as a function from a batch to its logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlkit.rundir import RunDir
from dlkit.serve.export import ONNX_FILE, export_onnx, session


@dataclass
class OnnxBackend:
    """A run's exported model in an ONNX Runtime session: `backend(x)` gives the logits that
    `Predictor.predict_tensor` computes before its softmax, as float32 on the CPU."""

    sess: Any
    bundle: dict[str, Any]

    @classmethod
    def from_run(cls, run: RunDir, threads: int | None = None) -> OnnxBackend:
        """The run's model.onnx (exported first when the run has none), every bundle file sha256-checked."""
        if ONNX_FILE not in run.bundle()["files"]:
            export_onnx(run.path)
        bundle = run.verify()
        return cls(session(run.path / ONNX_FILE, threads), bundle)

    @property
    def input_kind(self) -> str:
        return self.bundle["input_kind"]

    @property
    def dtype(self) -> np.dtype:
        """What the graph reads: int64 token ids, float32 otherwise."""
        return np.dtype(np.int64) if self.input_kind == "tokens" else np.dtype(np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, outputs) for a prepared batch (N, *input_shape)."""
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.dtype)
        return torch.from_numpy(self.sess.run(None, {"input": feed})[0]).float()
