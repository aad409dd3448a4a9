"""The training loop as plain functions: `fit` runs stages of `train_one_epoch` + `evaluate`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlkit.config import StageCfg, TrainCfg
from dlkit.data.bundle import DataBundle, Task, TensorSplit
from dlkit.engine.callbacks import Callback, FitState
from dlkit.engine.optim import Schedule, build_optimizer
from dlkit.engine.progress import PlainProgress, QuietProgress
from dlkit.engine.runtime import autocast, eval_mode
from dlkit.errors import TrainingError

LossFn = Callable[[Tensor, Tensor], Tensor]
Augment = Callable[[Tensor, torch.Generator], Tensor]  # a training batch in, an augmented batch out


@dataclass
class History:
    """Per-epoch metrics of a whole fit, with where each stage began and ended."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_seconds: float = 0.0


def loss_for(task: Task, name: str = "auto") -> LossFn:
    """The loss for a task: cross-entropy, BCE on one logit, or MSE."""
    name = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}[task] if name == "auto" else name
    if name == "cross_entropy":
        return F.cross_entropy
    if name == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
    return lambda out, y: F.mse_loss(out.squeeze(-1) if y.dim() == 1 else out, y.float())


def count_correct(out: Tensor, y: Tensor, task: Task) -> Tensor:
    """Correct predictions in a batch (0 for regression)."""
    if task == "multiclass":
        return (out.argmax(1) == y).sum()
    if task == "binary":
        return ((out.squeeze(-1) > 0) == (y > 0.5)).sum()
    return torch.zeros((), dtype=torch.long, device=out.device)


@dataclass
class StepContext:
    """What one epoch of training needs besides the model and the data."""

    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    task: Task
    device: torch.device
    precision: str
    batch_size: int
    generator: torch.Generator
    after_backward: Sequence[Callback] = ()
    augment: Augment | None = None


def train_one_epoch(model: nn.Module, split: TensorSplit, ctx: StepContext, progress: PlainProgress) -> dict[str, float]:
    """One pass over `split` in a seeded random order; returns the mean train loss and accuracy."""
    model.train()
    total_loss = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    for xb, yb in split.batches(ctx.batch_size, shuffle=True, generator=ctx.generator):
        if ctx.augment is not None:
            xb = ctx.augment(xb, ctx.generator)
        with autocast(ctx.device, ctx.precision):
            out = model(xb)
            loss = ctx.loss_fn(out, yb)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for cb in ctx.after_backward:
            cb.on_after_backward(model)
        ctx.optimizer.step()
        ctx.schedule.on_batch()
        # sums stay on the device: no host sync per step
        total_loss += loss.detach().float() * len(yb)
        correct += count_correct(out.detach(), yb, ctx.task)
        progress.advance()
    n = len(split)
    metrics = {"train_loss": total_loss.item() / n}
    if ctx.task != "regression":
        metrics["train_accuracy"] = correct.item() / n
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorSplit, task: Task, loss_fn: LossFn, *, device: torch.device,
             precision: str = "fp32", batch_size: int = 512, prefix: str = "") -> dict[str, float]:
    """Mean loss and accuracy over `split`, streamed batch by batch in eval mode."""
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for xb, yb in split.batches(batch_size):
            with autocast(device, precision):
                out = model(xb)
            total_loss += loss_fn(out.float(), yb) * len(yb)
            correct += count_correct(out, yb, task)
    n = max(1, len(split))
    metrics = {f"{prefix}loss": total_loss.item() / n}
    if task != "regression":
        metrics[f"{prefix}accuracy"] = correct.item() / n
    return metrics


@torch.no_grad()
def predict_outputs(model: nn.Module, x: Tensor, *, device: torch.device, precision: str = "fp32",
                    batch_size: int = 512) -> Tensor:
    """The model's raw outputs (logits) for every row of `x`, as fp32 on the CPU."""
    outs = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            with autocast(device, precision):
                outs.append(model(x[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def resolve_stages(cfg: TrainCfg) -> list[StageCfg]:
    """The recipe's stages with every unset field filled from the train section."""
    stages = cfg.stages or [StageCfg()]
    return [
        StageCfg(
            name=s.name or f"stage {i + 1}",
            epochs=cfg.epochs if s.epochs is None else s.epochs,
            optimizer=s.optimizer or cfg.optimizer,
            schedule=s.schedule or cfg.schedule,
        )
        for i, s in enumerate(stages)
    ]


def fit(model: nn.Module, data: DataBundle, cfg: TrainCfg, *, device: torch.device, precision: str,
        generator: torch.Generator, callbacks: Sequence[Callback] = (),
        progress: PlainProgress | None = None, augment: Augment | None = None) -> History:
    """Train `model` on `data` through every stage of `cfg`; callbacks see every epoch.

    `augment`, when given, transforms each training batch (drawing from `generator`) before the
    forward pass; validation and test data are never augmented.
    """
    progress = progress or QuietProgress()
    model.to(device)
    loss_fn = loss_for(data.task, cfg.loss)
    history = History()
    state = FitState(model=model)
    channels_last = cfg.channels_last and is_conv_on_images(model, data.train.x)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train = on_device(data.train, device, channels_last)
    val = on_device(data.val, device, channels_last) if data.val is not None and len(data.val) else None
    steps = math.ceil(len(train) / cfg.batch_size)
    stages = resolve_stages(cfg)
    total_epochs = sum(s.epochs for s in stages)
    after_backward = [cb for cb in callbacks if type(cb).on_after_backward is not Callback.on_after_backward]
    started = time.perf_counter()
    for index, stage in enumerate(stages):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, stage.optimizer, device)
        ctx = StepContext(loss_fn, optimizer, Schedule(optimizer, stage.schedule, stage.epochs, steps),
                          data.task, device, precision, cfg.batch_size, generator, after_backward, augment)
        state.stage, state.stop_stage = index, False
        first = state.epoch + 1
        for cb in callbacks:
            cb.on_stage_start(state)
        for _ in range(stage.epochs):
            state.epoch += 1
            tick = time.perf_counter()
            progress.start_epoch(state.epoch, total_epochs, steps)
            lr = optimizer.param_groups[0]["lr"]
            metrics: dict[str, Any] = {"epoch": state.epoch, "stage": index}
            metrics |= train_one_epoch(model, train, ctx, progress)
            _check_finite(metrics["train_loss"], state.epoch)
            if val is not None:
                metrics |= evaluate(model, val, data.task, loss_fn, device=device, precision=precision,
                                    batch_size=cfg.eval_batch_size, prefix="val_")
            metrics["lr"] = lr
            metrics["seconds"] = round(time.perf_counter() - tick, 4)
            ctx.schedule.on_epoch(metrics)
            history.epochs.append(metrics)
            for cb in callbacks:
                cb.on_epoch_end(state, metrics)
            progress.end_epoch(metrics)
            if state.stop_stage:
                break
        for cb in callbacks:
            cb.on_stage_end(state)
        history.stages.append({"index": index, "name": stage.name, "first_epoch": first, "last_epoch": state.epoch})
    history.train_seconds = time.perf_counter() - started
    history.notes = state.notes
    progress.close()
    return history


def is_conv_on_images(model: nn.Module, x: Tensor) -> bool:
    """True for a conv net fed image batches: the case where channels_last pays."""
    return x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def on_device(split: TensorSplit, device: torch.device, channels_last: bool = False) -> TensorSplit:
    """`split` on `device`; image tensors in channels_last layout when asked (indexing keeps it)."""
    split = split.to(device)
    if channels_last:
        split = TensorSplit(split.x.contiguous(memory_format=torch.channels_last), split.y)
    return split


def _check_finite(loss: float, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"the training loss became {loss} in epoch {epoch}; lower train.optimizer.lr or set train.grad_clip"
        )
