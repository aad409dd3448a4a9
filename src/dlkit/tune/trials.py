"""The trials this process runs. Each is an ordinary run (`runner.run`) into `runs/<study>/trial-<n>/`; a
callback reports each epoch's metric to the trial and, when the pruner says so, ends the fit early: the
run is still tested and bundled, and the trial is recorded as pruned.

The study's budget (`--trials N`) counts trials that are finished, failed or under way, over every
process that shares the storage: a process takes the next trial only while fewer are counted, and a
trial that two processes took at once beyond the budget is dropped before it runs, so a study ends
with N trials. A trial stopped by Ctrl-C, or whose process died (no heartbeat for study.GRACE_S), does
not count: running the command again fills its place with a new trial (new values, a new number).

A trial is never resumed (`dlkit resume` refuses its folder), so the folder of one that ended unfinished
keeps its record (status, recipe, the epochs it ran) but not its checkpoints: `clear_unfinished` deletes
them once Optuna has ended the trial.
"""
from __future__ import annotations

import math
import re
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from dlkit.engine.callbacks import Callback, FitState
from dlkit.errors import ConfigError, DataError, DlkitError, RunDirError, RunInterrupted, error_line
from dlkit.rundir import STATUS, RunDir
from dlkit.runner import run
from dlkit.space import Distribution
from dlkit.tune.settings import TuneSettings


class MetricMissing(ConfigError):
    """The followed metric is not among the run's epoch metrics: every trial would fail the same way."""


class TrialFailed(Exception):
    """This trial failed (recorded with its reason); the study goes on."""


class Surplus(Exception):
    """This trial was taken beyond the budget by two processes at once; it is dropped unrun."""


class Pruning(Callback):
    """Reports each epoch's metric to the trial; when the pruner says stop, ends the whole fit after
    that epoch (the run is then tested and bundled as any other) with a note saying why."""

    def __init__(self, trial: Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.note: str | None = None

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        value = epoch_value(metrics, self.metric)
        self.trial.report(value, state.epoch)
        if self.trial.should_prune():
            state.stop_run = True
            self.note = f"pruned by the study after epoch {state.epoch} ({self.metric} {value:.4g})"
            state.notes.append(self.note)


def epoch_value(metrics: dict[str, Any], metric: str) -> float:
    """The followed metric of one epoch; MetricMissing when the run does not measure it."""
    if metric not in metrics:
        measured = [k for k in metrics if k.startswith(("train_", "val_"))]
        raise MetricMissing(f"--metric {metric} is not measured in this run (its epochs have {', '.join(measured)}); "
                            "choose one of those")
    return float(metrics[metric])


def counted(trial: FrozenTrial) -> bool:
    """Whether the budget counts `trial`: finished, failed for a reason of its own, or under way; not one
    waiting to be taken (the next `ask` takes it), stopped by Ctrl-C, lost with its process, dropped as
    surplus or aborting the study."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


class Objective:
    """One trial: draw the values, run the recipe with them, return the followed metric of the weights
    the run kept (pruned: raise TrialPruned; failed: TrialFailed with the reason recorded)."""

    def __init__(self, study: optuna.Study, settings: TuneSettings, budget: int, *, quiet: bool,
                 report: bool | None, parent: Callable[[], str | None] | None = None):
        self.study, self.settings, self.budget = study, settings, budget
        self.quiet, self.report = quiet, report
        self.parent = parent  # the study's MLflow parent run id, when the recipe is tracked
        self.number: int | None = None

    def __call__(self, trial: Trial) -> float:
        self.number = trial.number
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
        if len(earlier) >= self.budget:
            trial.set_user_attr("surplus", True)
            raise Surplus()
        settings = self.settings
        values = {key: suggest(trial, key, dist) for key, dist in settings.space.items()}
        out = settings.folder / f"trial-{trial.number}"
        trial.set_user_attr("run_dir", str(out))
        trial.set_user_attr("host", socket.gethostname())
        torch_engine = settings.recipe.train.engine == "torch"
        pruning = Pruning(trial, settings.metric) if torch_engine else None
        try:
            # the seam for tracking: a trial is an ordinary `runner.run`, so whatever a run records, a trial does
            recipe = settings.trial_recipe(values, origin=f"trial {trial.number}")
            tags = None
            if recipe.track is not None:
                from dlkit.tune.tracking import trial_tags

                tags = trial_tags(settings, trial.number, values, self.parent() if self.parent else None)
            result = run(recipe, out=out, quiet=self.quiet, report=self.report, runs_root=settings.folder.parent,
                         callbacks=[pruning] if pruning is not None else (), track_tags=tags)
            value = kept_value(result.history, result.summary, settings.metric)
        except (RunInterrupted, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)
            if (out / STATUS).is_file():
                RunDir(out).mark("interrupted", stopped_message(trial.number, settings))
            raise
        except Exception as exc:
            if self._ends_study(exc):
                trial.set_user_attr("aborted", error_line(exc))
                raise
            trial.set_user_attr("error", error_line(exc))
            raise TrialFailed(error_line(exc)) from exc
        trial.set_user_attr("test", {k: v for k, v in result.summary.items()
                                     if k.startswith("test_") and isinstance(v, int | float)})
        if pruning is not None and pruning.note is not None:
            trial.set_user_attr("note", pruning.note)
            raise optuna.TrialPruned(pruning.note)
        return value

    def _ends_study(self, exc: Exception) -> bool:
        """Errors no other values would mend: a metric the runs lack, data that cannot be read (unless
        the search varies the data settings), a runs folder that cannot be written."""
        if isinstance(exc, MetricMissing | RunDirError):
            return True
        searches_data = any(k.startswith("data.") for k in self.settings.space)
        return isinstance(exc, DataError) and not searches_data


def suggest(trial: Trial, key: str, dist: Distribution) -> Any:
    """Draw the value of `key` for this trial (a choice's value, not its stored label)."""
    if dist.kind == "choice":
        return dist.value_of(trial.suggest_categorical(key, dist.labels()))
    if dist.kind in ("int", "logint"):
        return trial.suggest_int(key, int(dist.low), int(dist.high), step=dist.step or 1, log=dist.log)
    return trial.suggest_float(key, float(dist.low), float(dist.high), log=dist.log)


_BEST = re.compile(r"best \(epoch (\d+)")


def kept_value(history: list[dict[str, Any]], summary: dict[str, Any], metric: str) -> float:
    """The metric of the epoch whose weights the run kept and tested: the last one, or the best one
    that early stopping restored."""
    if not history:
        raise DlkitError("the run trained no epoch")
    restored = _BEST.match(str(summary.get("tested_weights", "")))
    epoch = int(restored.group(1)) if restored else history[-1]["epoch"]
    row = next((e for e in history if e["epoch"] == epoch), history[-1])
    value = epoch_value(row, metric)
    if not math.isfinite(value):
        raise DlkitError(f"{metric} is {value} at epoch {epoch}")
    return value


def stopped_message(number: int, settings: TuneSettings) -> str:
    """status.json's message for a trial stopped before it finished."""
    return (f"trial {number} of study '{settings.study}', stopped by Ctrl-C or SIGTERM: the study does not count it, "
            "and `dlkit tune` with the same options runs another trial in its place")


def clear_unfinished(study: optuna.Study, settings: TuneSettings) -> list[int]:
    """Delete the checkpoints of this machine's trials that Optuna has ended but whose runs did not finish
    (stopped by Ctrl-C, failed, or lost with a killed process; no trial is resumed, so they would only
    take space and suggest `dlkit resume`); a run left `running` by a dead process is marked interrupted.
    Returns the trial numbers cleared."""
    cleared = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        path = settings.folder / f"trial-{t.number}"
        if not (path / STATUS).is_file():
            continue
        run_dir = RunDir(path)
        status = run_dir.status()
        if status["state"] == "finished":
            continue
        if run_dir.owner_alive():
            continue
        if status["state"] == "running":  # Optuna failed it: its process stopped beating
            run_dir.mark("interrupted", stopped_message(t.number, settings))
        if run_dir.checkpoints.is_dir():
            shutil.rmtree(run_dir.checkpoints)
            cleared.append(t.number)
    return cleared


def run_trials(study: optuna.Study, settings: TuneSettings, budget: int, *, deadline: float, quiet: bool,
               report: bool | None, say: Callable[[FrozenTrial], None],
               parent: Callable[[], str | None] | None = None) -> list[int]:
    """Take trials one after another until the study counts `budget` of them or `deadline` (a
    time.monotonic() value) has passed; `say(trial)` after each; `parent()` gives the study's MLflow parent
    run id for a tracked trial. Returns the numbers this process ran."""
    objective = Objective(study, settings, budget, quiet=quiet, report=report, parent=parent)
    ran = []
    while time.monotonic() < deadline:
        if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= budget:
            break
        objective.number = None
        try:
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        except Surplus:
            break
        if objective.number is not None:
            ran.append(objective.number)
            say(next(t for t in study.get_trials(deepcopy=False) if t.number == objective.number))
    return ran
