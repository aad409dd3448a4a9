"""The training loop as plain functions: `fit` runs stages of `train_one_epoch` + `evaluate`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlkit.config import StageCfg, TrainCfg
from dlkit.data.bundle import DataBundle, Task, TensorSplit
from dlkit.data.transforms import Augment
from dlkit.engine.callbacks import Callback, FitState
from dlkit.engine.distributed import SINGLE, Dist
from dlkit.engine.feature_cache import FeatureCache, stage_cache
from dlkit.engine.freeze import param_groups, set_trainable, train_mode
from dlkit.engine.optim import Schedule, build_optimizer
from dlkit.engine.progress import PlainProgress, QuietProgress
from dlkit.engine.resume import Checkpointer, StopFlag, TrainState, rng_state, set_rng_state
from dlkit.engine.runtime import autocast, eval_mode
from dlkit.errors import ConfigError, TrainingError

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class History:
    """Per-epoch metrics of a whole fit, with where each stage began and ended."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_seconds: float = 0.0


def loss_for(task: Task, name: str = "auto", label_smoothing: float = 0.0) -> LossFn:
    """The loss for a task: cross-entropy (with `label_smoothing`), BCE on one logit, or MSE."""
    name = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}[task] if name == "auto" else name
    if name == "cross_entropy":
        return partial(F.cross_entropy, label_smoothing=label_smoothing) if label_smoothing else F.cross_entropy
    if label_smoothing:
        raise ConfigError(f"train.label_smoothing applies to cross-entropy (multiclass tasks); this loss is {name}: "
                          "set train.label_smoothing: 0")
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
    dist: Dist = SINGLE
    # many processes: seeds this rank's dropout for the coming step and returns its augmentation generator
    reseed: Callable[[], torch.Generator] | None = None


@dataclass
class Cursor:
    """Where an epoch of training is: its batches (row indices, in order), the steps taken, the running
    sums of loss and correct answers, the learning rate it began with and the time it has taken."""

    order: list[Tensor]
    loss_sum: Tensor
    correct: Tensor
    lr: float
    step: int = 0
    seconds: float = 0.0

    @classmethod
    def begin(cls, split: TensorSplit, ctx: StepContext) -> Cursor:
        """A new epoch: its batch order drawn from the run's generator."""
        return cls(split.order(ctx.batch_size, ctx.generator), torch.zeros((), device=ctx.device),
                   torch.zeros((), dtype=torch.long, device=ctx.device), ctx.optimizer.param_groups[0]["lr"])

    def state(self) -> dict[str, Any]:
        return {"order": torch.cat(self.order) if self.order else torch.empty(0, dtype=torch.long),
                "sizes": [len(b) for b in self.order], "loss_sum": self.loss_sum, "correct": self.correct,
                "lr": self.lr, "step": self.step, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Cursor:
        return cls(list(state["order"].split(state["sizes"])), state["loss_sum"].to(device),
                   state["correct"].to(device), state["lr"], state["step"], state["seconds"])


def train_one_epoch(model: nn.Module, split: TensorSplit, ctx: StepContext, progress: PlainProgress,
                    cursor: Cursor | None = None, after_step: Callable[[Cursor], None] | None = None) -> dict[str, float]:
    """One pass over `split` in a seeded random order; returns the mean train loss and accuracy.
    Frozen batch norms stay in eval mode (see engine.freeze). With `cursor`, the epoch continues where
    the cursor stands (a resumed run); `after_step(cursor)` sees every step's end."""
    train_mode(model)
    cursor = cursor or Cursor.begin(split, ctx)
    dist = ctx.dist
    for idx in cursor.order[cursor.step:]:
        generator, weight = ctx.generator, None
        if dist.enabled:
            # this rank's share of the global batch, its loss weighted by that share, so that DDP's mean
            # over ranks is the gradient of the whole batch's mean loss
            mine = dist.share(idx)
            weight = len(mine) * dist.world / len(idx)
            idx = mine if len(mine) else idx[:1]  # no rows: a stand-in row with weight 0 keeps DDP in step
            generator = ctx.reseed()
        xb, yb = split.take(idx)
        if ctx.augment is not None:
            xb = ctx.augment(xb, generator)
        with autocast(ctx.device, ctx.precision):
            out = model(xb)
            loss = ctx.loss_fn(out, yb)
        ctx.optimizer.zero_grad(set_to_none=True)
        (loss if weight is None else loss * weight).backward()
        for cb in ctx.after_backward:
            cb.on_after_backward(model)
        ctx.optimizer.step()
        ctx.schedule.on_batch()
        if weight != 0:
            # sums stay on the device: no host sync per step
            cursor.loss_sum += loss.detach().float() * len(yb)
            cursor.correct += count_correct(out.detach(), yb, ctx.task)
        cursor.step += 1
        progress.advance()
        if after_step is not None:
            after_step(cursor)
    n = len(split)
    metrics = {"train_loss": dist.all_sum(cursor.loss_sum).item() / n}
    if ctx.task != "regression":
        metrics["train_accuracy"] = dist.all_sum(cursor.correct).item() / n
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorSplit, task: Task, loss_fn: LossFn, *, device: torch.device,
             precision: str = "fp32", batch_size: int = 512, prefix: str = "", dist: Dist = SINGLE) -> dict[str, float]:
    """Mean loss and accuracy over `split`, streamed batch by batch in eval mode. With many processes
    each rank computes a block of whole batches and the per-batch sums are added in batch order: the
    numbers one process gets with the same weights."""
    if dist.enabled:
        return _evaluate_sharded(model, split, task, loss_fn, device, precision, batch_size, prefix, dist)
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


def _evaluate_sharded(model: nn.Module, split: TensorSplit, task: Task, loss_fn: LossFn, device: torch.device,
                      precision: str, batch_size: int, prefix: str, dist: Dist) -> dict[str, float]:
    losses, hits = [], []
    with eval_mode(model):
        for b in dist.my_batches(math.ceil(len(split) / batch_size)):
            xb, yb = split.rows(b * batch_size, (b + 1) * batch_size)
            with autocast(device, precision):
                out = model(xb)
            losses.append(loss_fn(out.float(), yb) * len(yb))
            hits.append(count_correct(out, yb, task))
    losses = dist.gather_rows(torch.stack(losses) if losses else torch.zeros(0, device=device))
    hits = dist.gather_rows(torch.stack(hits) if hits else torch.zeros(0, dtype=torch.long, device=device))
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for loss, hit in zip(losses, hits):  # in batch order, as one process adds them
        total_loss += loss
        correct += hit
    n = max(1, len(split))
    metrics = {f"{prefix}loss": total_loss.item() / n}
    if task != "regression":
        metrics[f"{prefix}accuracy"] = correct.item() / n
    return metrics


@torch.no_grad()
def sharded_outputs(model: nn.Module, split: TensorSplit, dist: Dist, *, device: torch.device,
                    batch_size: int = 512) -> Tensor:
    """The model's fp32 outputs for every row of `split`, each rank computing a block of whole batches
    (the batches one process would make), gathered in order on every rank, on the CPU."""
    outs = []
    with eval_mode(model):
        for b in dist.my_batches(math.ceil(len(split) / batch_size)):
            xb, _ = split.rows(b * batch_size, (b + 1) * batch_size)
            outs.append(model(xb.to(device)).float())
    mine = torch.cat(outs) if outs else torch.zeros((0, *_output_shape(model, split, device)), device=device)
    return dist.gather_rows(mine).cpu()


def _output_shape(model: nn.Module, split: TensorSplit, device: torch.device) -> tuple[int, ...]:
    with eval_mode(model):
        return tuple(model(split.rows(0, 1)[0].to(device)).shape[1:])


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


@torch.no_grad()
def predict_split(model: nn.Module, split: TensorSplit, *, device: torch.device, precision: str = "fp32",
                  batch_size: int = 512) -> Tensor:
    """`predict_outputs` over a split's model inputs (its transform applied batch by batch)."""
    outs = []
    with eval_mode(model):
        for xb, _ in split.batches(batch_size):
            with autocast(device, precision):
                outs.append(model(xb.to(device)).float().cpu())
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
            freeze=s.freeze or cfg.freeze,
            unfreeze=s.unfreeze if s.freeze is not None or s.unfreeze is not None else cfg.unfreeze,
        )
        for i, s in enumerate(stages)
    ]


def fit(model: nn.Module, data: DataBundle, cfg: TrainCfg, *, device: torch.device, precision: str,
        generator: torch.Generator, callbacks: Sequence[Callback] = (),
        progress: PlainProgress | None = None, augment: Augment | None = None,
        checkpointer: Checkpointer | None = None, resume: TrainState | None = None,
        stop: StopFlag | None = None, dist: Dist = SINGLE, seed: int = 0) -> History:
    """Train `model` on `data` through every stage of `cfg`; callbacks see every epoch and may end the
    stage (`FitState.stop_stage`) or the whole fit (`FitState.stop_run`) after it.

    Each stage sets what trains (`freeze`, `unfreeze`) and builds its own optimizer over the trainable
    parameters only. A stage whose base is frozen trains the head on the base's features computed
    once (`cache_features: auto`, engine.feature_cache), unless augmentation changes the base's input
    every epoch. `augment`, when given, transforms each training batch (drawing from `generator`)
    before the forward pass; validation and test data are never augmented.

    `checkpointer` writes a resumable checkpoint after every epoch and when it is due inside one;
    `resume` (a checkpoint read back) continues a run exactly where that checkpoint was written, so
    it ends with the weights and history the uninterrupted run would have. When `stop` is set (the
    first Ctrl-C or SIGTERM), training writes a checkpoint at the next step boundary and raises.

    `dist` (many processes under torchrun): each stage trains through DistributedDataParallel on this
    rank's share of every global batch; every rank runs the same stages, epochs and callbacks and
    agrees at each step on stopping and checkpointing (the checkpointer, on rank 0 only, writes).
    `seed` seeds each rank's augmentation and dropout per step (engine.distributed).
    """
    progress = progress or QuietProgress()
    model.to(device)
    channels_last = cfg.channels_last and is_conv_on_images(model, data.train.x)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train = on_device(data.train, device, channels_last)
    val = on_device(data.val, device, channels_last) if data.val is not None and len(data.val) else None
    run = _Run(model, data, cfg, train, val, device, precision, generator, callbacks, progress, augment,
               checkpointer, stop or StopFlag(), dist, seed)
    started = time.perf_counter()
    first_stage = run.restore_run(resume) if resume is not None else 0
    cache: FeatureCache | None = None
    for index, stage in enumerate(run.stages):
        if index >= first_stage and not run.state.stop_run:
            cache = run.stage(index, stage, cache, resume if index == first_stage else None)
    run.history.train_seconds = time.perf_counter() - started
    run.history.notes = run.state.notes
    progress.close()
    return run.history


@dataclass
class _Run:
    """What every stage of one `fit` shares, and the history it fills."""

    model: nn.Module
    data: DataBundle
    cfg: TrainCfg
    train: TensorSplit
    val: TensorSplit | None
    device: torch.device
    precision: str
    generator: torch.Generator
    callbacks: Sequence[Callback]
    progress: PlainProgress
    augment: Augment | None
    checkpointer: Checkpointer | None
    stop: StopFlag
    dist: Dist = SINGLE
    seed: int = 0

    def __post_init__(self) -> None:
        self.loss_fn = loss_for(self.data.task, self.cfg.loss)
        # label smoothing shapes the training loss only; validation and test losses stay the plain one
        self.train_loss_fn = loss_for(self.data.task, self.cfg.loss, self.cfg.label_smoothing)
        self.history = History()
        self.state = FitState(model=self.model)
        self.steps = math.ceil(len(self.train) / self.cfg.batch_size)
        self.stages = resolve_stages(self.cfg)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.after_backward = [cb for cb in self.callbacks
                               if type(cb).on_after_backward is not Callback.on_after_backward]
        # where the run stands, as a checkpoint records it
        self.global_step = 0
        self.stage_first = 1  # the current stage's first epoch
        self.stage_done = 0  # epochs the current stage has finished
        self.ctx: StepContext | None = None
        self.cursor: Cursor | None = None
        self.rank_generator = torch.Generator(device=self.device)

    def stage(self, index: int, stage: StageCfg, cache: FeatureCache | None,
              resume: TrainState | None = None) -> FeatureCache | None:
        """Set up and train one stage (from where `resume` stands in it, when given); returns the
        feature cache a later frozen stage may reuse."""
        cfg, state = self.cfg, self.state
        where = f"train.stages.{index}" if cfg.stages else "train"
        trainable = set_trainable(self.model, stage.freeze, stage.unfreeze, where)
        model, train, val, cached = self.model, self.train, self.val, False
        if stage.freeze == "base" and stage.unfreeze is None and stage.epochs and cfg.cache_features == "auto":
            # training-size batches: at 512 a conv base's activations outgrow the CPU caches
            # (measured 2.3x slower for MobileNetV2 at 160 px)
            cache, why = stage_cache(self.model, cache, self.train, self.val, self.augment, self.device,
                                     self.precision, cfg.batch_size, self.dist)
            if why:
                if resume is None:
                    state.notes.append(f"{stage.name}: features not cached: {why}")
            else:
                model, train, val, cached = cache.rest, cache.train, cache.val, True
        if not cached:
            cache = None  # this stage may change the base: a later frozen stage computes its features anew
        optimizer = build_optimizer(param_groups(self.model, stage.optimizer), stage.optimizer, self.device)
        ctx = StepContext(self.train_loss_fn, optimizer, Schedule(optimizer, stage.schedule, stage.epochs, self.steps),
                          self.data.task, self.device, self.precision, cfg.batch_size, self.generator,
                          self.after_backward, self.augment, self.dist, self.reseed)
        self.ctx, state.stage, state.optimizer = ctx, index, optimizer
        if resume is None:
            state.stop_stage, self.stage_first, self.stage_done = False, state.epoch + 1, 0
            for cb in self.callbacks:
                cb.on_stage_start(state)
        else:
            self.restore_stage(resume, ctx)
        cursor, self.cursor = self.cursor, None
        trained = _ddp(model, self.device) if self.dist.enabled else model
        while self.stage_done < stage.epochs and not state.stop_stage and not state.stop_run:
            self.epoch(trained, model, train, val, ctx, index, cursor)
            cursor = None
        for cb in self.callbacks:
            cb.on_stage_end(state)
        self.history.stages.append({"index": index, "name": stage.name, "first_epoch": self.stage_first,
                                    "last_epoch": state.epoch, "freeze": stage.freeze,
                                    "trainable_params": trainable.trainable, "frozen_params": trainable.frozen,
                                    "cached_features": cached,
                                    "cache_seconds": round(cache.seconds, 3) if cached else 0.0})
        return cache

    def epoch(self, trained: nn.Module, model: nn.Module, train: TensorSplit, val: TensorSplit | None,
              ctx: StepContext, index: int, cursor: Cursor | None = None) -> None:
        """One epoch (or the rest of one, from `cursor`): train, validate, let the schedule and the
        callbacks see its metrics, write a checkpoint."""
        state = self.state
        if cursor is None:
            state.epoch += 1
            cursor = Cursor.begin(train, ctx)
        self.cursor = cursor
        tick = time.perf_counter() - cursor.seconds
        self.progress.start_epoch(state.epoch, self.total_epochs, len(cursor.order))
        metrics: dict[str, Any] = {"epoch": state.epoch, "stage": index}
        metrics |= train_one_epoch(trained, train, ctx, self.progress, cursor,
                                   lambda c: self.after_step(c, tick))
        _check_finite(metrics["train_loss"], state.epoch)
        self.dist.sync_buffers(self.model)
        if val is not None:
            metrics |= evaluate(model, val, self.data.task, self.loss_fn, device=self.device,
                                precision=self.precision, batch_size=self.cfg.eval_batch_size, prefix="val_",
                                dist=self.dist)
        metrics["lr"] = cursor.lr
        metrics["seconds"] = round(time.perf_counter() - tick, 4)
        ctx.schedule.on_epoch(metrics)
        self.history.epochs.append(metrics)
        self.cursor = None
        self.stage_done += 1
        for cb in self.callbacks:
            cb.on_epoch_end(state, metrics)
        self.progress.end_epoch(metrics)
        if self.checkpointer is not None or self.dist.enabled:
            self.save()
        if self.dist.agree(self.stop.signum is not None, device=self.device)[0]:
            raise (self.stop.exception() if self.stop.signum is not None else KeyboardInterrupt())

    def after_step(self, cursor: Cursor, tick: float) -> None:
        """After each optimizer step: a checkpoint when one is due or a stop was asked for, then stop.
        With many processes every rank takes the same decision at the same step."""
        self.global_step += 1
        if self.checkpointer is None and not self.dist.enabled:
            return
        due = self.checkpointer is not None and self.checkpointer.due(self.global_step)
        due, stop = self.dist.agree(due, self.stop.signum is not None, device=self.device)
        if due or stop:
            cursor.seconds = time.perf_counter() - tick
            self.save()
        if self.checkpointer is not None:
            self.checkpointer.hold(self.global_step, self.stop)
        if not stop and self.stop.signum is not None and not self.dist.enabled:
            self.save()  # asked for while held (the test hook); many processes agree at the next step
            stop = True
        if stop:
            raise (self.stop.exception() if self.stop.signum is not None else KeyboardInterrupt())

    def save(self) -> None:
        """A checkpoint of this moment, written by the checkpointer (rank 0); every rank takes part."""
        state = self.snapshot()
        if self.checkpointer is not None:
            self.checkpointer.save(self.global_step, state)

    def reseed(self) -> torch.Generator:
        """Many processes: seed this rank's dropout (torch's generator) and augmentation for the next step."""
        seed = self.dist.step_seed(self.seed, self.global_step + 1)
        torch.manual_seed(seed)
        return self.rank_generator.manual_seed(seed)

    # ---- checkpoints ------------------------------------------------------------------------------

    def snapshot(self) -> TrainState:
        """Everything needed to continue from here: tensors in `tree`, the rest in `meta`."""
        ctx, state = self.ctx, self.state
        assert ctx is not None
        scheduler = ctx.schedule.scheduler
        tree = {"model": self.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                "schedule": scheduler.state_dict() if scheduler is not None else None,
                "callbacks": [cb.state_dict() for cb in self.callbacks],
                "rng": rng_state(self.generator),
                "cursor": self._cursor_state()}
        meta = {"position": {"stage": state.stage, "epoch": state.epoch, "stage_first": self.stage_first,
                             "stage_done": self.stage_done, "global_step": self.global_step,
                             "step": self.cursor.step if self.cursor is not None else None,
                             "stop_stage": state.stop_stage, "stop_run": state.stop_run},
                "callbacks": [type(cb).__name__ for cb in self.callbacks],
                "history": {"epochs": self.history.epochs, "stages": self.history.stages},
                "notes": state.notes}
        return TrainState(tree, meta)

    def _cursor_state(self) -> dict[str, Any] | None:
        """The epoch's cursor with the running sums of every rank."""
        if self.cursor is None:
            return None
        state = self.cursor.state()
        state["loss_sum"], state["correct"] = self.dist.all_sum(state["loss_sum"]), self.dist.all_sum(state["correct"])
        return state

    def restore_run(self, resume: TrainState) -> int:
        """The run-wide part of a resume (weights, history, position); returns the stage to start in."""
        names = [type(cb).__name__ for cb in self.callbacks]
        if resume.meta["callbacks"] != names:
            raise TrainingError(f"the checkpoint was written with callbacks {resume.meta['callbacks']}, this run "
                                f"has {names}; resume with the recipe it was written with")
        self.model.load_state_dict(resume.tree["model"])
        pos = resume.meta["position"]
        self.history.epochs = list(resume.meta["history"]["epochs"])
        self.history.stages = list(resume.meta["history"]["stages"])
        self.state.notes = list(resume.meta["notes"])
        self.state.epoch, self.state.stage, self.state.stop_stage = pos["epoch"], pos["stage"], pos["stop_stage"]
        self.state.stop_run = pos.get("stop_run", False)  # checkpoints from before stop_run have none
        self.stage_first, self.stage_done, self.global_step = pos["stage_first"], pos["stage_done"], pos["global_step"]
        if self.checkpointer is not None:
            self.checkpointer.last_step = self.global_step
        return pos["stage"]

    def restore_stage(self, resume: TrainState, ctx: StepContext) -> None:
        """The stage's part of a resume: optimizer, schedule, callbacks, generators, the epoch's cursor."""
        tree = resume.tree
        ctx.optimizer.load_state_dict(_tuple_betas(tree["optimizer"]))
        _match_layouts(ctx.optimizer)
        if ctx.schedule.scheduler is not None and tree["schedule"] is not None:
            ctx.schedule.scheduler.load_state_dict(tree["schedule"])
        for cb, cb_state in zip(self.callbacks, tree["callbacks"], strict=True):
            cb.load_state_dict(cb_state)
        set_rng_state(tree["rng"], self.generator)
        self.cursor = Cursor.from_state(tree["cursor"], self.device) if tree["cursor"] is not None else None
        if self.cursor is not None and not self.dist.is_main:  # the sums of every rank live on rank 0
            self.cursor.loss_sum.zero_()
            self.cursor.correct.zero_()


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped for training on many processes (built per stage: a stage changes what trains)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor its parameter's memory layout again. `load_state_dict`
    restores them contiguous; for a channels_last conv weight the fused kernels would then pair
    elements by memory position, not by index, and silently train differently."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _tuple_betas(state: dict[str, Any]) -> dict[str, Any]:
    # JSON keeps Adam's betas as a list; the optimizer was built with a tuple
    for group in state["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return state


def is_conv_on_images(model: nn.Module, x: Tensor) -> bool:
    """True for a conv net fed image batches: the case where channels_last pays."""
    return x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def on_device(split: TensorSplit, device: torch.device, channels_last: bool = False) -> TensorSplit:
    """`split` on `device`; image tensors in channels_last layout when asked (indexing keeps it)."""
    split = split.to(device)
    if channels_last and split.transform is not None:
        inner = split.transform
        split = replace(split, transform=lambda x: inner(x).contiguous(memory_format=torch.channels_last))
    elif channels_last:
        split = replace(split, x=split.x.contiguous(memory_format=torch.channels_last))
    return split


def _check_finite(loss: float, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"the training loss became {loss} in epoch {epoch}; lower train.optimizer.lr or set train.grad_clip"
        )
