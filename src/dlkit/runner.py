"""`run`: a recipe in, a finished run directory out (train, test, save the bundle)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlkit.config import Recipe, TrainCfg
from dlkit.data import DataBundle, load_data
from dlkit.engine import Callback, Checkpoint, EarlyStopping, GradClip, MetricsLog, fit
from dlkit.engine.loop import resolve_stages
from dlkit.engine.outcome import RunResult, complete_run, guarded
from dlkit.engine.progress import PlainProgress, QuietProgress, make_progress
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.errors import ConfigError, RunInterrupted
from dlkit.evaluate.predictions import evaluation_notes, measure_test
from dlkit.models import build_model, family, model_args, with_model_defaults
from dlkit.models.surface import DlkitModel
from dlkit.recipes import load_recipe
from dlkit.rundir import RunDir, check_out
from dlkit.track import finish_tracking, start_tracking, sync_after, tracking_callbacks, tracking_outcome


def run(recipe: str | Path | Recipe, *, overrides: list[str] | tuple[str, ...] = (), epochs: int | None = None,
        seed: int | None = None, out: str | Path | None = None, fields: dict[str, Any] | None = None,
        quiet: bool = True, runs_root: str | Path = "runs", report: bool | None = None) -> RunResult:
    """Train, test and save a recipe (a packaged name, a YAML path or a Recipe), then write its report
    (`report`: None follows the DLKIT_REPORT environment variable, on unless it is 0)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, epochs=epochs, seed=seed, fields=fields)
    return execute(recipe, out=out, progress=make_progress(quiet), runs_root=runs_root, report=report)


def report_default() -> bool:
    """Whether a run writes its report when not told: yes, unless DLKIT_REPORT is 0 / false / no / off
    (sweeps and test suites that only want the numbers save the few seconds the plots take)."""
    return os.environ.get("DLKIT_REPORT", "1").strip().lower() not in ("0", "false", "no", "off")


def data_args(recipe: Recipe, data: DataBundle) -> dict[str, Any]:
    """Builder arguments the data decide: a token model's vocabulary size, unless the recipe sets it."""
    vocab = data.meta.get("vocab_size")
    if data.input_kind != "tokens" or vocab is None or "vocab_size" not in model_args(recipe.model.name):
        return {}
    given = recipe.model.args().get("vocab_size")
    if given is None:
        return {"vocab_size": vocab}
    if given < vocab:
        raise ConfigError(f"model.vocab_size is {given} but the tokenizer makes {vocab} ids; set model.vocab_size "
                          f">= {vocab} or lower data.text.max_words")
    return {}


def load_pretrained(recipe: Recipe, model: nn.Module, progress: bool = False) -> str | None:
    """Load `model.weights` (ImageNet or a file) into the model's base; the one-line report, or None.

    With no weights (`none`: random initialisation) and a frozen base, the report is a warning, also
    printed on stderr: the head would train on random features."""
    if recipe.model.weights is None:
        warning = _frozen_random_base(recipe)
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
        return warning
    if family(recipe.model.name).hub_default:
        return model.load_report  # loaded with the model by build_model
    from dlkit.models.pretrained import load_into, load_state, source_name

    state = load_state(recipe.model.weights, recipe.model.name, progress=progress)
    return load_into(model, state, source_name(recipe.model.weights, recipe.model.name)).line()


def _frozen_random_base(recipe: Recipe) -> str | None:
    """The warning for a base that is frozen in some stage while it holds random weights, or None."""
    train = recipe.train
    frozen = [s.freeze or train.freeze for s in train.stages] if train.stages else [train.freeze]
    if "base" not in frozen:
        return None
    where = "train.freeze: base" if not train.stages else "a stage freezes the base"
    return (f"model.weights is none (random initialisation) but {where}: the head trains on random features; "
            "set model.weights (e.g. imagenet) or train.freeze: none")


def execute(recipe: Recipe, *, out: str | Path | None = None, progress: PlainProgress | None = None,
            runs_root: str | Path = "runs", report: bool | None = None) -> RunResult:
    """Run a resolved recipe; the run directory is created only once data and model are ready (a
    path that could not be created is refused before the data are loaded).

    The run is complete (bundle, summary, status finished) before its report is written, so a report
    that fails or is interrupted loses nothing: `dlkit report RUN` writes it again. Ctrl-C or SIGTERM
    during training marks the run interrupted, keeps its last checkpoint and raises RunInterrupted."""
    report = report_default() if report is None else report
    recipe = with_model_defaults(recipe)
    check_out(out, runs_root)
    if recipe.train.engine == "numpy":
        from dlkit.scratch_run import execute_numpy

        return sync_after(recipe, execute_numpy(recipe, out=out, runs_root=runs_root, report=report), runs_root)
    progress = progress or QuietProgress()
    try:
        device = resolve_device(recipe.train.device)
        precision = resolve_precision(recipe.train.precision, device)
        data = load_data(recipe.data, recipe.seed)
        generator = seed_everything(recipe.seed)
        extra = data_args(recipe, data)
        model = build_model(recipe, data.num_outputs, data.input_shape, extra)
        train_cfg, notes = _check_monitors(recipe.train, data)
        notes += _check_text_model(model, data)
        loaded = load_pretrained(recipe, model, progress=not isinstance(progress, QuietProgress))
        if loaded:
            notes.insert(0, loaded)
    except KeyboardInterrupt as exc:
        progress.close()
        raise RunInterrupted("stopped before training started; nothing was written", exc) from None

    run = RunDir.create(recipe, out, runs_root)
    tracker = start_tracking(recipe, run, runs_root)  # None unless the recipe is tracked (MLflow loads only then)
    augment = None
    if recipe.data.augment.enabled():
        from dlkit.data.transforms import make_augment

        augment = make_augment(recipe.data.augment, data.preprocessing)
    total = sum(s.epochs for s in resolve_stages(train_cfg))
    with tracking_outcome(tracker), guarded(run, total, progress):
        history = fit(model, data, train_cfg, device=device, precision=precision, generator=generator,
                      callbacks=_callbacks(train_cfg, run) + tracking_callbacks(tracker), progress=progress,
                      augment=augment)
        history.notes[:0] = notes
        # tested in fp32 and the default memory layout, as `predict`, `evaluate` and `serve` run the saved
        # bundle, so their answers agree with summary.json to the last bit on the same device
        model.to(memory_format=torch.contiguous_format)
        test, predictions = measure_test(model, data, recipe.train.eval_batch_size)
        history.notes += evaluation_notes(predictions, data.classes)
        summary = complete_run(run, recipe, data, model, history, test, device, precision, extra)
    try:
        if report:
            from dlkit.evaluate.report import report_after_run  # matplotlib loads only when a report is written

            report_after_run(run.path, model, data, predictions)
    finally:
        finish_tracking(tracker)  # the run is finished whatever its report did: FINISHED, with what exists
    return RunResult(run.path, summary, history.epochs)


def _check_monitors(cfg: TrainCfg, data: DataBundle) -> tuple[TrainCfg, list[str]]:
    """Refuse an early-stopping metric the run cannot have. A best checkpoint whose metric is not
    measured (no validation split) monitors train_loss instead: returned as a new TrainCfg and a note,
    the caller's recipe untouched (recipe.yaml keeps the recipe as given; re-running it falls back again)."""
    available = ["train_loss"] + (["train_accuracy"] if data.task != "regression" else [])
    if data.val is not None and len(data.val):
        available += [m.replace("train_", "val_") for m in available]
    es = cfg.early_stopping
    if es is not None and es.monitor not in available:
        raise ConfigError(f"train.early_stopping.monitor '{es.monitor}' is not a metric of this run; "
                          f"allowed: {', '.join(available)}")
    if cfg.checkpoint.monitor in available:
        return cfg, []
    fallback = cfg.checkpoint.model_copy(update={"monitor": "train_loss", "mode": "auto"})
    note = f"best checkpoint monitors train_loss ({cfg.checkpoint.monitor} is not measured in this run)"
    return cfg.model_copy(update={"checkpoint": fallback}), [note]


def _check_text_model(model: DlkitModel, data: DataBundle) -> list[str]:
    """A Hugging Face model must pad with its tokenizer's id; a trained head's labels are noted beside ours."""
    pad = model.pad_id
    if pad is None or data.input_kind != "tokens":
        return []
    if data.meta.get("pad_id") != pad:
        raise ConfigError(f"the tokenizer pads with id {data.meta.get('pad_id')} but the model masks id {pad}; "
                          "use the model's own tokenizer (leave data.text.tokenizer unset)")
    names = model.label_names
    if names and [n.lower() for n in names] != [c.lower() for c in data.classes]:
        return [f"the checkpoint's classifier labels {', '.join(names)} stand for the data's classes "
                f"{', '.join(data.classes)}, in that order"]
    return []


def _callbacks(cfg: TrainCfg, run: RunDir) -> list[Callback]:
    callbacks: list[Callback] = [MetricsLog(run.write_epochs)]
    ck = cfg.checkpoint
    if ck.best or ck.last:
        callbacks.append(Checkpoint(run.checkpoints, ck.monitor, ck.mode, ck.best, ck.last))
    if cfg.early_stopping is not None:
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta, es.restore_best))
    if cfg.grad_clip is not None:
        callbacks.append(GradClip(cfg.grad_clip))
    return callbacks
