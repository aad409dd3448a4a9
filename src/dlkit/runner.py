"""`run`: a recipe in, a finished run directory out (train, test, save the bundle)."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import sklearn
import torch
import yaml
from torch import nn

import dlkit
from dlkit.config import TEXT_MODELS, Recipe, TrainCfg
from dlkit.data import DataBundle, load_data
from dlkit.engine import Callback, Checkpoint, EarlyStopping, GradClip, History, MetricsLog, fit
from dlkit.engine.checkpoint import save_weights, write_json
from dlkit.engine.optim import metric_mode
from dlkit.engine.progress import PlainProgress, QuietProgress, make_progress
from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.errors import ConfigError, TrainingError
from dlkit.evaluate.predictions import TestPredictions, evaluation_notes, measure_test
from dlkit.models import build, model_args
from dlkit.recipes import load_recipe
from dlkit.rundir import BUNDLE_FORMAT, new_run_dir


LEARNED_VALUES = ("weight", "bias")  # claims of a value to learn (S2.1's 1.8 and 32), neither min nor max


@dataclass
class RunResult:
    """What `run` returns: where the run is, its summary and its per-epoch history."""

    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]


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


def build_model(recipe: Recipe, num_outputs: int, input_shape: tuple[int, ...],
                data_args: dict[str, Any] | None = None) -> nn.Module:
    """The recipe's model, shaped for the data, with its new head if the recipe gives one.

    ImageNet-style weights are loaded afterwards (`load_pretrained`); a Hugging Face model loads
    its config and weights here, since its architecture comes with them.
    """
    head = recipe.model.head.model_dump() if recipe.model.head is not None else None
    hub = {"weights": recipe.model.weights} if recipe.model.name in TEXT_MODELS else {}
    return build(recipe.model.name, head=head, num_classes=num_outputs, input_shape=tuple(input_shape),
                 **recipe.model.args(), **(data_args or {}), **hub)


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
    if recipe.model.name in TEXT_MODELS:
        return getattr(model, "report", None)  # loaded with the model by build_model
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
    """Run a resolved recipe; the run directory is created only once data and model are ready.

    The run is complete (bundle, summary) before its report is written, so a report that fails
    loses nothing: `dlkit report RUN` writes it again."""
    report = report_default() if report is None else report
    if recipe.train.engine == "numpy":
        from dlkit.scratch_run import execute_numpy

        return execute_numpy(recipe, out=out, runs_root=runs_root, report=report)
    device = resolve_device(recipe.train.device)
    precision = resolve_precision(recipe.train.precision, device)
    data = load_data(recipe.data, recipe.seed)
    generator = seed_everything(recipe.seed)
    extra = data_args(recipe, data)
    model = build_model(recipe, data.num_outputs, data.input_shape, extra)
    monitor_notes = _check_monitors(recipe.train, data) + _check_text_model(model, data)
    loaded = load_pretrained(recipe, model, progress=progress is not None and not isinstance(progress, QuietProgress))
    if loaded:
        monitor_notes.insert(0, loaded)

    run_dir = new_run_dir(recipe.name, out, runs_root)
    write_recipe(run_dir, recipe)
    (run_dir / "metrics.jsonl").touch()
    (run_dir / "checkpoints").mkdir()
    callbacks = _callbacks(recipe.train, run_dir)
    augment = None
    if recipe.data.augment.enabled():
        from dlkit.data.transforms import make_augment

        augment = make_augment(recipe.data.augment, data.preprocessing)
    try:
        history = fit(model, data, recipe.train, device=device, precision=precision, generator=generator,
                      callbacks=callbacks, progress=progress, augment=augment)
    except TrainingError as exc:
        last = run_dir / "checkpoints" / "last.safetensors"
        kept = f"; the last good weights are in {last}" if last.is_file() else ""
        raise TrainingError(f"{exc}{kept}") from None
    history.notes[:0] = monitor_notes

    # tested in fp32 and the default memory layout, as `predict`, `evaluate` and `serve` run the saved
    # bundle, so their answers agree with summary.json to the last bit on the same device
    model.to(memory_format=torch.contiguous_format)
    test, predictions = measure_test(model, data, recipe.train.eval_batch_size)
    history.notes += evaluation_notes(predictions, data.classes)
    save_weights(model, run_dir / "model.safetensors")
    write_json(run_dir / "bundle.json", bundle_meta(recipe, data, model, extra))
    summary = summarize_run(recipe, data, model, history, test, device, precision)
    write_json(run_dir / "summary.json", summary)
    if report:
        write_run_report(run_dir, model, data, predictions)
    return RunResult(run_dir, summary, history.epochs)


def write_run_report(run_dir: Path, model: nn.Module, data: DataBundle, predictions: TestPredictions | None) -> Path:
    """evaluation.json, plots/ and report.html of a finished run, from the predictions just made."""
    from dlkit.evaluate.report import build_report  # matplotlib loads only when a report is written

    return build_report(run_dir, model, data, predictions)


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """recipe.yaml: the resolved recipe, unset optional fields left out."""
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True),
                                                        sort_keys=False))


def bundle_meta(recipe: Recipe, data: DataBundle, model: nn.Module,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the model and prepare its inputs, without the training code.

    `extra`: builder arguments the data decided; a model's own `bundle_args` (a Hugging Face
    config) rebuild its architecture offline.
    """
    own = model.bundle_args() if hasattr(model, "bundle_args") else {}
    return {
        "format": BUNDLE_FORMAT,
        "recipe": recipe.name,
        "model": {"name": recipe.model.name, "args": recipe.model.args() | (extra or {}) | own | {
            "num_classes": data.num_outputs, "input_shape": list(data.input_shape)},
            "head": recipe.model.head.model_dump() if recipe.model.head is not None else None,
            "weights": recipe.model.weights},
        "task": data.task,
        "classes": data.classes,
        "input_kind": data.input_kind,
        "input_shape": list(data.input_shape),
        "input_dtype": str(getattr(model, "input_dtype", torch.float32)).removeprefix("torch."),
        "preprocessing": data.preprocessing,
        "data_fingerprint": data.fingerprint(),
        "versions": library_versions(),
    }


def summarize_run(recipe: Recipe, data: DataBundle, model: nn.Module, history: History,
                  test: dict[str, float], device: torch.device, precision: str) -> dict[str, Any]:
    """summary.json: test metrics, sizes, cost, environment and the seed's claim beside ours."""
    n_classes = len(data.classes) if data.task != "regression" else 0
    splits = {"train": data.train, "val": data.val, "test": data.test}
    return {
        "recipe": recipe.name,
        **test,
        "n_train": len(data.train),
        "n_val": len(data.val) if data.val is not None else 0,
        "n_test": len(data.test),
        "class_counts": {k: s.class_counts(n_classes) for k, s in splits.items() if s is not None and n_classes},
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(history.train_seconds, 3),
        "epochs_run": len(history.epochs),
        "stages": history.stages,
        "device": device.type,
        "precision": precision,
        "seed": recipe.seed,
        "data_source": data.meta.get("source"),
        "expect": expect_vs_achieved(recipe, test),
        "notes": history.notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dlkit_version": dlkit.__version__,
    }


def expect_vs_achieved(recipe: Recipe, achieved: dict[str, float]) -> dict[str, Any]:
    """Each claimed metric beside ours; 'met' when ours is at most one point worse (a learned value
    such as a weight: within 1% of the claim)."""
    rows = []
    for metric, claimed in recipe.expect.claims.items():
        ours = achieved.get(metric)
        row: dict[str, Any] = {"metric": metric, "claimed": claimed, "achieved": ours}
        if ours is not None:
            delta = ours - claimed
            row["delta"] = round(delta, 6)
            if metric in LEARNED_VALUES:
                row["status"] = "met" if abs(delta) <= 0.01 * max(1.0, abs(claimed)) else "off"
            else:
                worse = -delta if metric_mode(metric) == "max" else delta
                row["status"] = "met" if worse <= 0.01 else "below"
        else:
            row["status"] = "not measured"
        rows.append(row)
    return {"source": recipe.expect.source, "note": recipe.expect.note, "claims": rows}


def library_versions() -> dict[str, str]:
    """Versions that matter for reloading a bundle."""
    return {"dlkit": dlkit.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def _check_monitors(cfg: TrainCfg, data: DataBundle) -> list[str]:
    """Refuse an early-stopping metric the run cannot have; fall back to train_loss for checkpoints."""
    available = ["train_loss"] + (["train_accuracy"] if data.task != "regression" else [])
    if data.val is not None and len(data.val):
        available += [m.replace("train_", "val_") for m in available]
    notes = []
    es = cfg.early_stopping
    if es is not None and es.monitor not in available:
        raise ConfigError(f"train.early_stopping.monitor '{es.monitor}' is not a metric of this run; "
                          f"allowed: {', '.join(available)}")
    if cfg.checkpoint.monitor not in available:
        notes.append(f"best checkpoint monitors train_loss ({cfg.checkpoint.monitor} is not measured in this run)")
        cfg.checkpoint.monitor = "train_loss"
        cfg.checkpoint.mode = "auto"
    return notes


def _check_text_model(model: nn.Module, data: DataBundle) -> list[str]:
    """A Hugging Face model must pad with its tokenizer's id; a trained head's labels are noted beside ours."""
    pad = getattr(model, "pad_id", None)
    if pad is None or data.input_kind != "tokens":
        return []
    if data.meta.get("pad_id") != pad:
        raise ConfigError(f"the tokenizer pads with id {data.meta.get('pad_id')} but the model masks id {pad}; "
                          "use the model's own tokenizer (leave data.text.tokenizer unset)")
    names = getattr(model, "label_names", None)
    if names and [n.lower() for n in names] != [c.lower() for c in data.classes]:
        return [f"the checkpoint's classifier labels {', '.join(names)} stand for the data's classes "
                f"{', '.join(data.classes)}, in that order"]
    return []


def _callbacks(cfg: TrainCfg, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [MetricsLog(run_dir / "metrics.jsonl")]
    ck = cfg.checkpoint
    if ck.best or ck.last:
        callbacks.append(Checkpoint(run_dir / "checkpoints", ck.monitor, ck.mode, ck.best, ck.last))
    if cfg.early_stopping is not None:
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta, es.restore_best))
    if cfg.grad_clip is not None:
        callbacks.append(GradClip(cfg.grad_clip))
    return callbacks
