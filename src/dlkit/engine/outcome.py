"""What a finished run records, the same for both engines: the bundle (how to rebuild the model and
prepare its inputs), the summary (test metrics, cost, environment, the claim beside ours), and
`complete_run`, which hands them with the weights to the run directory."""
from __future__ import annotations

import platform
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from torch import nn

import dlkit
from dlkit.config import Recipe
from dlkit.data import DataBundle
from dlkit.engine.checkpoint import read_meta, save_weights
from dlkit.engine.loop import History
from dlkit.engine.optim import metric_mode
from dlkit.engine.progress import PlainProgress
from dlkit.engine.resume import read_position, state_files
from dlkit.errors import RunInterrupted, TrainingError, error_line
from dlkit.models.surface import DlkitModel
from dlkit.rundir import RunDir

LEARNED_VALUES = ("weight", "bias")  # claims of a value to learn (S2.1's 1.8 and 32), neither min nor max


@dataclass
class RunResult:
    """What `run` returns: where the run is, its summary and its per-epoch history (on a rank other
    than 0 of many processes, which writes nothing: no folder and an empty summary)."""

    run_dir: Path | None
    summary: dict[str, Any]
    history: list[dict[str, Any]]


@contextmanager
def guarded(run: RunDir, total_epochs: int, progress: PlainProgress | None = None) -> Iterator[None]:
    """Mark `run` interrupted (Ctrl-C, SIGTERM) or failed (any error) when the block does not finish;
    the progress display is closed (the terminal's cursor restored) either way."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if progress is not None:
            progress.close()
        message = _interrupted_message(run, total_epochs)
        run.mark("interrupted", message.split("\n")[0])
        if "\n" not in message:
            message += f"; the run is in {run.path}"
        raise RunInterrupted(message, exc) from None
    except BaseException as exc:
        if progress is not None:
            progress.close()
        if isinstance(exc, TrainingError):
            last = run.checkpoints / "last.safetensors"
            kept = f"; the last good weights are in {last}" if last.is_file() else ""
            exc = TrainingError(f"{exc}{kept}")
        run.mark("failed", error_line(exc))
        if isinstance(exc, TrainingError):
            raise exc from None
        raise


def _interrupted_message(run: RunDir, total_epochs: int) -> str:
    """`stopped in epoch 3 of 10 (step 17 of 50); kept checkpoints/state-000000117.safetensors`, then
    `resume with: dlkit resume RUN`, from what is on disk (a NumPy run keeps last.safetensors only)."""
    states = state_files(run.checkpoints)
    if states:
        pos = read_position(states[-1])
        if pos is not None:
            where = (f"stopped in epoch {pos['epoch']} of {total_epochs} (step {pos['step']})" if pos["step"] is not None
                     else f"stopped after epoch {pos['epoch']} of {total_epochs}")
            return f"{where}; kept checkpoints/{states[-1].name}\nresume with: dlkit resume {run.path}"
    last = run.checkpoints / "last.safetensors"
    done = len(run.history())
    message = f"stopped after epoch {done} of {total_epochs}"
    if last.is_file():
        meta = read_meta(last) or {}
        return f"{message}; kept checkpoints/last.safetensors (epoch {meta.get('epoch', '?')})"
    return f"{message}; no checkpoint was written yet"


def complete_run(run: RunDir, recipe: Recipe, data: DataBundle, model: nn.Module, history: History,
                 test: dict[str, float], device: torch.device, precision: str,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the final weights, bundle and summary and mark the run finished; returns the summary."""
    summary = summarize_run(recipe, data, model, history, test, device, precision)
    run.finish(lambda path: save_weights(model, path), bundle_meta(recipe, data, model, extra), summary)
    for state in state_files(run.checkpoints):  # a finished run is not resumed: free their space
        state.unlink(missing_ok=True)
    return summary


def bundle_meta(recipe: Recipe, data: DataBundle, model: DlkitModel,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the model and prepare its inputs, without the training code.

    `extra`: builder arguments the data decided; a model's own `bundle_args` (a Hugging Face
    config) rebuild its architecture offline.
    """
    own = model.bundle_args()
    return {
        "recipe": recipe.name,
        "model": {"name": recipe.model.name, "args": recipe.model.args() | (extra or {}) | own | {
            "num_classes": data.num_outputs, "input_shape": list(data.input_shape)},
            "head": recipe.model.head.model_dump() if recipe.model.head is not None else None,
            "weights": recipe.model.weights},
        "task": data.task,
        "classes": data.classes,
        "input_kind": data.input_kind,
        "input_shape": list(data.input_shape),
        "input_dtype": str(model.input_dtype).removeprefix("torch."),
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
        "tested_weights": tested_weights(recipe, history),
        "expect": expect_vs_achieved(recipe, test, len(data.train)),
        "notes": history.notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dlkit_version": dlkit.__version__,
    }


_RESTORED = re.compile(r"restored the weights of epoch (\d+)")


def tested_weights(recipe: Recipe, history: History) -> str:
    """Which weights the test split saw: `last (epoch 10)`, or `best (epoch 7, val_loss)` when early
    stopping restored the best epoch's weights at the end of the last stage (EarlyStopping's note)."""
    last = history.epochs[-1]["epoch"] if history.epochs else 0
    restored = [int(m.group(1)) for note in history.notes if (m := _RESTORED.fullmatch(note))]
    first_of_last_stage = history.stages[-1]["first_epoch"] if history.stages else 1
    es = recipe.train.early_stopping
    if restored and es is not None and restored[-1] >= first_of_last_stage:
        return f"best (epoch {restored[-1]}, {es.monitor})"
    return f"last (epoch {last})"


def expect_vs_achieved(recipe: Recipe, achieved: dict[str, float], n_train: int | None = None) -> dict[str, Any]:
    """Each claimed metric beside ours; 'met' when ours is at most one point worse (a learned value
    such as a weight: within 1% of the claim). With `expect.n_train`, the training-set sizes too."""
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
    out: dict[str, Any] = {"source": recipe.expect.source, "note": recipe.expect.note, "claims": rows}
    claimed_n = recipe.expect.n_train
    if claimed_n is not None:
        out["n_train"] = claimed_n
        if n_train is not None:
            out["training_set"] = training_set_line(n_train, claimed_n)
    return out


def training_set_line(ours: int, claimed: int) -> str:
    """`trained on 4,000 of the claim's 60,000 examples`, or the same number, or more."""
    if ours == claimed:
        return f"trained on {ours:,} examples, as the claim"
    if ours < claimed:
        return f"trained on {ours:,} of the claim's {claimed:,} examples"
    return f"trained on {ours:,} examples, more than the claim's {claimed:,}"


def library_versions() -> dict[str, str]:
    """Versions that matter for reloading a bundle."""
    return {"dlkit": dlkit.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "scikit-learn": version("scikit-learn"),
            "python": platform.python_version()}
