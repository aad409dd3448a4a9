"""`run`: a recipe in, a finished run directory out (train, test, save the bundle)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlkit.config import Recipe, TrainCfg
from dlkit.data import DataBundle, load_data
from dlkit.engine import Callback, Checkpoint, EarlyStopping, GradClip, MetricsLog, fit
from dlkit.engine.distributed import SINGLE, Dist, check_sync_batchnorm, device_for, from_env
from dlkit.engine.loop import resolve_stages, sharded_outputs
from dlkit.engine.outcome import RunResult, complete_run, guarded, library_versions
from dlkit.engine.progress import PlainProgress, QuietProgress, make_progress
from dlkit.engine.resume import Checkpointer, TrainState, graceful_stop, latest_state
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.errors import ConfigError, RunDirError, RunInterrupted
from dlkit.evaluate.predictions import evaluation_notes, measure_test
from dlkit.models import build_model, family, model_args, with_model_defaults
from dlkit.models.surface import DlkitModel
from dlkit.recipes import load_recipe
from dlkit.rundir import RunDir, check_out
from dlkit.track import (
    finish_tracking,
    resume_tracker,
    start_tracking,
    sync_after,
    tracking_callbacks,
    tracking_outcome,
)


def run(recipe: str | Path | Recipe, *, overrides: list[str] | tuple[str, ...] = (), epochs: int | None = None,
        seed: int | None = None, out: str | Path | None = None, fields: dict[str, Any] | None = None,
        quiet: bool = True, runs_root: str | Path = "runs", report: bool | None = None,
        callbacks: Sequence[Callback] = (), track_tags: Mapping[str, str] | None = None) -> RunResult:
    """Train, test and save a recipe (a packaged name, a YAML path or a Recipe), then write its report
    (`report`: None follows the DLKIT_REPORT environment variable, on unless it is 0). `callbacks` join
    the run's own (after them), e.g. the one by which `dlkit tune` watches and prunes a trial;
    `track_tags` join its MLflow run's tags when the recipe is tracked (a trial's parent run and number)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, epochs=epochs, seed=seed, fields=fields)
    return execute(recipe, out=out, progress=make_progress(quiet), runs_root=runs_root, report=report,
                   callbacks=callbacks, track_tags=track_tags)


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
            runs_root: str | Path = "runs", report: bool | None = None, callbacks: Sequence[Callback] = (),
            track_tags: Mapping[str, str] | None = None) -> RunResult:
    """Run a resolved recipe; the run directory is created only once data and model are ready (a
    path that could not be created is refused before the data are loaded). `callbacks` see every
    epoch after the run's own (the NumPy engine takes none).

    The run is complete (bundle, summary, status finished) before its report is written, so a report
    that fails or is interrupted loses nothing: `dlkit report RUN` writes it again. The first Ctrl-C or
    SIGTERM during training stops at the next step with a resumable checkpoint (`dlkit resume RUN`),
    marks the run interrupted and raises RunInterrupted; a second one stops at once."""
    report = report_default() if report is None else report
    # a recipe's tune section is dlkit tune's search space: it changes nothing in a run, so the run does not record it
    recipe = with_model_defaults(recipe).model_copy(update={"tune": None})
    check_out(out, runs_root)
    if recipe.train.engine == "numpy":
        from dlkit.scratch_run import execute_numpy

        if callbacks:
            raise ConfigError("train.engine numpy trains without callbacks (it reports no epoch while it trains); "
                              "use train.engine torch")
        return sync_after(recipe, execute_numpy(recipe, out=out, runs_root=runs_root, report=report), runs_root,
                          track_tags)
    progress = progress or QuietProgress()
    dist = from_env()
    if not dist.is_main:
        progress.close()
        progress = QuietProgress()
    ready = _prepare(recipe, progress, "stopped before training started; nothing was written", dist)
    dist.barrier()  # every rank checked --out before rank 0 creates it
    run = RunDir.create(recipe, out, runs_root) if dist.is_main else None
    return _train(run, recipe, ready, progress, report, extra_callbacks=callbacks, runs_root=runs_root,
                  track_tags=track_tags)


def resume(run_dir: str | Path, *, force: bool = False, quiet: bool = True, report: bool | None = None,
           progress: PlainProgress | None = None) -> RunResult:
    """Continue an interrupted, failed or killed run from its newest whole checkpoint and finish it
    (test, bundle, report) in the same run directory; on the same machine, seed, versions and thread
    count it ends with the weights and metrics.jsonl the uninterrupted run has.

    Refused in one line: a finished run, one still running, one without a checkpoint, and one whose
    recipe, data or library versions differ from the checkpoint's (`force`: continue anyway, with a
    note in the summary and report saying what differed)."""
    report = report_default() if report is None else report
    run = RunDir.resumable(run_dir)
    recipe = with_model_defaults(run.recipe())
    if recipe.train.engine == "numpy":
        raise RunDirError(f"{run.path} is a NumPy-engine run; those keep no checkpoints (they train in seconds): "
                          "re-run the recipe")
    state, notes = latest_state(run.checkpoints)
    differ = _differences(state.meta, {"recipe_sha256": recipe_sha256(recipe), "versions": library_versions()})
    if differ and not force:
        raise RunDirError(f"cannot resume {run.path}: {'; '.join(differ)}; pass --force to continue anyway")
    dist = from_env()
    progress = progress or make_progress(quiet)
    if not dist.is_main:
        progress.close()
        progress = QuietProgress()
    ready = _prepare(recipe, progress, f"stopped before training resumed; {run.path} is as it was", dist)
    differ += _differences(state.meta, {"data_fingerprint": ready.data.fingerprint()})
    if differ and not force:
        raise RunDirError(f"cannot resume {run.path}: {'; '.join(differ)}; pass --force to continue anyway")
    pos = state.meta["position"]
    where = f"epoch {pos['epoch']}, step {pos['step']}" if pos["step"] is not None else f"the end of epoch {pos['epoch']}"
    notes.append(f"resumed from checkpoints/{state.path.name} ({where})")
    notes += [f"resumed with --force although {d}" for d in differ]
    if dist.world != state.meta.get("world", 1):
        notes.append(f"resumed on {dist.world} process(es); the checkpoint was written by {state.meta.get('world', 1)} "
                     "(the batches are the same; augmentation and dropout draw differently)")
    dist.barrier()
    if dist.is_main:
        run.mark("running", "training (resumed)")
    return _train(run if dist.is_main else None, recipe, ready, progress, report, state, notes)


@dataclass
class _Ready:
    """What training needs, built from the recipe before the run directory is touched."""

    device: torch.device
    precision: str
    data: DataBundle
    generator: torch.Generator
    model: nn.Module
    train_cfg: TrainCfg
    notes: list[str]
    extra: dict[str, Any]
    dist: Dist = SINGLE


def _prepare(recipe: Recipe, progress: PlainProgress, interrupted: str, dist: Dist = SINGLE) -> _Ready:
    """Device, data, seeded generators, model (pretrained weights loaded) and checked settings; Ctrl-C
    here stops at once with `interrupted` as the message."""
    try:
        device = device_for(dist, resolve_device(recipe.train.device))
        precision = resolve_precision(recipe.train.precision, device)
        check_sync_batchnorm(recipe.train.sync_batchnorm, dist, device)
        data = load_data(recipe.data, recipe.seed)
        generator = seed_everything(recipe.seed)
        extra = data_args(recipe, data)
        model = build_model(recipe, data.num_outputs, data.input_shape, extra)
        train_cfg, notes = _check_monitors(recipe.train, data)
        notes += _check_text_model(model, data)
        loaded = load_pretrained(recipe, model, progress=not isinstance(progress, QuietProgress))
        if loaded:
            notes.insert(0, loaded)
        if dist.enabled and recipe.train.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    except KeyboardInterrupt as exc:
        progress.close()
        raise RunInterrupted(interrupted, exc) from None
    if dist.enabled:
        notes.append(f"trained on {dist.world} processes (torchrun); batch_size {recipe.train.batch_size} is the "
                     "global batch")
    return _Ready(device, precision, data, generator, model, train_cfg, notes, extra, dist)


def _train(run: RunDir | None, recipe: Recipe, ready: _Ready, progress: PlainProgress, report: bool,
           resume_from: TrainState | None = None, resume_notes: list[str] | None = None,
           extra_callbacks: Sequence[Callback] = (), runs_root: str | Path = "runs",
           track_tags: Mapping[str, str] | None = None) -> RunResult:
    """Fit (from `resume_from` when given), test, complete the run directory, write the report. With
    many processes every rank trains and tests; rank 0 alone (`run` given) writes anything."""
    data, model, cfg, dist = ready.data, ready.model, ready.train_cfg, ready.dist
    augment = None
    if recipe.data.augment.enabled():
        from dlkit.data.transforms import make_augment

        augment = make_augment(recipe.data.augment, data.preprocessing)
    total = sum(s.epochs for s in resolve_stages(cfg))
    checkpointer = tracker = None
    if run is not None:
        checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint_every, cfg.checkpoint_keep,
                                    {"recipe_sha256": recipe_sha256(recipe), "data_fingerprint": data.fingerprint(),
                                     "versions": library_versions(), "world": dist.world})
        # None unless the recipe is tracked (MLflow loads only then); a resumed run continues its MLflow run
        tracker = (resume_tracker(run.path) if resume_from is not None
                   else start_tracking(recipe, run, runs_root, track_tags))
    watched = guarded(run, total, progress) if run is not None else _quiet_rank(progress)
    with tracking_outcome(tracker), watched, graceful_stop() as stop:
        history = fit(model, data, cfg, device=ready.device, precision=ready.precision, generator=ready.generator,
                      callbacks=[*_callbacks(cfg, run), *extra_callbacks, *tracking_callbacks(tracker)],
                      progress=progress, augment=augment, checkpointer=checkpointer, resume=resume_from, stop=stop,
                      dist=dist, seed=recipe.seed)
        history.notes[:0] = ready.notes + (resume_notes or [])
        # tested in fp32 and the default memory layout, as `predict`, `evaluate` and `serve` run the saved
        # bundle, so their answers agree with summary.json to the last bit on the same device
        model.to(memory_format=torch.contiguous_format)
        outputs = None
        if dist.enabled:
            outputs = sharded_outputs(model, data.test, dist, device=ready.device,
                                      batch_size=recipe.train.eval_batch_size)
        if run is None:
            return RunResult(None, {}, history.epochs)
        test, predictions = measure_test(model, data, recipe.train.eval_batch_size, outputs)
        history.notes += evaluation_notes(predictions, data.classes)
        summary = complete_run(run, recipe, data, model, history, test, ready.device, ready.precision, ready.extra)
    try:
        if report:
            from dlkit.evaluate.report import report_after_run  # matplotlib loads only when a report is written

            report_after_run(run.path, model, data, predictions)
    finally:
        finish_tracking(tracker)  # the run is finished whatever its report did: FINISHED, with what exists
    return RunResult(run.path, summary, history.epochs)


@contextmanager
def _quiet_rank(progress: PlainProgress) -> Iterator[None]:
    """A rank other than 0: it writes nothing and says nothing; rank 0 reports for the run."""
    try:
        yield
    finally:
        progress.close()


def recipe_sha256(recipe: Recipe) -> str:
    """A digest of the resolved recipe, as recipe.yaml records it."""
    text = json.dumps(recipe.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(meta: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's record and this process: `the recipe differs from the
    checkpoint's`, `torch is 2.13.0 here but 2.12.0 in the checkpoint`, ..."""
    out = []
    if "recipe_sha256" in now and meta.get("recipe_sha256") != now["recipe_sha256"]:
        out.append("recipe.yaml differs from the recipe the checkpoint was written with")
    if "data_fingerprint" in now and meta.get("data_fingerprint") != now["data_fingerprint"]:
        out.append("the data differ from the data the checkpoint was trained on (fingerprint "
                   f"{now['data_fingerprint'][:12]} here, {str(meta.get('data_fingerprint'))[:12]} in the checkpoint)")
    then = meta.get("versions") or {}
    for name, version in (now.get("versions") or {}).items():
        if then.get(name) != version:
            out.append(f"{name} is {version} here but {then.get(name)} in the checkpoint")
    return out


def _discard(rows: list[dict[str, Any]]) -> None: ...


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


def _callbacks(cfg: TrainCfg, run: RunDir | None) -> list[Callback]:
    """The run's callbacks; on ranks other than 0 (`run` None) the same list, writing nothing, so that
    every rank decides alike (early stopping) and a checkpoint's callback states fit any rank."""
    callbacks: list[Callback] = [MetricsLog(run.write_epochs if run is not None else _discard)]
    ck = cfg.checkpoint
    if ck.best or ck.last:
        writes = run is not None
        callbacks.append(Checkpoint(run.checkpoints if writes else Path(), ck.monitor, ck.mode, ck.best and writes,
                                    ck.last and writes))
    if cfg.early_stopping is not None:
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta, es.restore_best))
    if cfg.grad_clip is not None:
        callbacks.append(GradClip(cfg.grad_clip))
    return callbacks
