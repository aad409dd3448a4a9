"""Small objects with named hooks that the training loop calls: no event framework."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlkit.engine.checkpoint import save_weights
from dlkit.engine.optim import metric_mode
from dlkit.files import write_text


@dataclass
class FitState:
    """What callbacks may read (and `stop_stage` / `stop_run`, which they may set) during `fit`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None  # the current stage's
    epoch: int = 0  # global epoch, counted from 1 across stages
    stage: int = 0
    stop_stage: bool = False
    stop_run: bool = False  # end the whole fit after this epoch: later stages are skipped (a pruned trial)
    notes: list[str] = field(default_factory=list)


class Callback:
    """Base class: override the hooks you need; each does nothing by default."""

    def on_stage_start(self, state: FitState) -> None: ...

    def on_after_backward(self, model: nn.Module) -> None: ...

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None: ...

    def on_stage_end(self, state: FitState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this callback exactly (tensors and JSON values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Monitor:
    """Tracks the best value of one metric, min or max."""

    def __init__(self, name: str, mode: str = "auto", min_delta: float = 0.0):
        self.name = name
        self.mode = metric_mode(name) if mode == "auto" else mode
        self.min_delta = min_delta
        self.best: float | None = None

    def improved(self, metrics: dict[str, float]) -> bool:
        """Record the epoch's value; True when it beats the best so far by more than min_delta."""
        value = metrics[self.name]
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best = value
        return better


class EarlyStopping(Callback):
    """Ends a stage when the monitored metric has not improved for `patience` epochs."""

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", patience: int = 5,
                 min_delta: float = 0.0, restore_best: bool = True):
        self.monitor_args = (monitor, mode, min_delta)
        self.patience = patience
        self.restore_best = restore_best

    def on_stage_start(self, state: FitState) -> None:
        self.monitor = Monitor(*self.monitor_args)
        self.wait = 0
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if self.monitor.improved(metrics):
            self.wait, self.best_epoch = 0, state.epoch
            if self.restore_best:
                self.best_state = copy.deepcopy(state.model.state_dict())
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stop_stage = True
            state.notes.append(
                f"early stopping at epoch {state.epoch}: {self.monitor.name} has not improved for "
                f"{self.patience} epochs (best {self.monitor.best:.4f} at epoch {self.best_epoch})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor = Monitor(*self.monitor_args)
        self.monitor.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]
        self.best_state = state["best_state"]

    def on_stage_end(self, state: FitState) -> None:
        if self.restore_best and self.best_state is not None:
            state.model.load_state_dict(self.best_state)
            state.notes.append(f"restored the weights of epoch {self.best_epoch}")


class Checkpoint(Callback):
    """Saves `last.safetensors` after every epoch and `best.safetensors` when the metric improves."""

    def __init__(self, directory: Path, monitor: str = "val_loss", mode: str = "auto",
                 best: bool = True, last: bool = True):
        self.directory = directory
        self.monitor = Monitor(monitor, mode)
        self.best, self.last = best, last

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        meta = {"epoch": state.epoch, "stage": state.stage, "metrics": metrics}
        if self.last:
            save_weights(state.model, self.directory / "last.safetensors", meta)
        if self.best and self.monitor.improved(metrics):
            save_weights(state.model, self.directory / "best.safetensors", meta | {"monitor": self.monitor.name})

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = state["best"]


class GradClip(Callback):
    """Clips the global gradient norm to `max_norm` after every backward pass."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_after_backward(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


class MetricsLog(Callback):
    """Records the metrics of every epoch as soon as it ends: `sink(epochs so far)`, or given a path,
    that JSON-lines file rewritten whole and atomically (a kill never leaves half a line)."""

    def __init__(self, sink: Path | Callable[[list[dict[str, float]]], object]):
        self.sink = sink if callable(sink) else partial(_write_lines, Path(sink))
        self.epochs: list[dict[str, float]] = []

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        self.epochs.append(dict(metrics))
        self.sink(list(self.epochs))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # rewritten at once: epochs written after the checkpoint (a kill in between) are dropped, to come again
        self.epochs = [dict(e) for e in state["epochs"]]
        self.sink(list(self.epochs))


def _write_lines(path: Path, rows: list[dict[str, float]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
