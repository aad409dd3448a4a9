"""One `dlkit tune`: check the settings, create or join the study, run trials here (and in `jobs - 1`
helper processes on this machine) until the study's budget is spent, then write the study's files.

Helpers are `python -m dlkit tune-worker` processes given the study's storage and name on stdin (a
storage URL may hold a password: it is kept off the command line); they take the study's settings
from the study itself. They run in a session of their own, so the terminal's Ctrl-C reaches this
process alone, which passes one stop on to each and waits for them before it writes the files.

A tracked study (`--track mlflow` or the recipe's track section) has one MLflow parent run with every
trial's run nested under it (dlkit.tune.tracking); helpers find its id in the study.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlkit.config import Recipe, TrackCfg, parse_duration
from dlkit.errors import ConfigError, RunInterrupted, Terminated, error_line
from dlkit.tune.report import table, trial_line, write_study_files
from dlkit.tune.settings import TuneSettings, resolve
from dlkit.tune.study import open_storage, open_study
from dlkit.tune.trials import clear_unfinished, counted, run_trials

HELPER_STOP_S = 120  # after a stop, how long helpers get to finish their step, checkpoint and record the trial


@dataclass
class TuneResult:
    """A study after this command: its folder, trials, best trial and files."""

    folder: Path
    study: str
    metric: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    files: dict[str, Path]
    table: str
    ran: list[int] = field(default_factory=list)  # the trials this process ran


def tune(recipe: str | Path | Recipe, *, trials: int, space: Sequence[str] | Mapping[str, str] = (),
         overrides: Sequence[str] = (), epochs: int | None = None, seed: int | None = None,
         fields: dict[str, Any] | None = None, metric: str = "val_accuracy", direction: str | None = None,
         pruner: str = "median", storage: str | None = None, study: str | None = None,
         timeout: str | float | None = None, jobs: int = 1, quiet: bool = True, report: bool | None = None,
         runs_root: str | Path = "runs", plots: bool = True, track: str | None = None) -> TuneResult:
    """Search `space` (FIELD=DIST items or a mapping, over the recipe's own tune section) for the values of
    the recipe that give the best `metric`, in a study of `trials` trials shared with every process
    that names the same `storage` and `study`; `track` is `--track` (mlflow, none, or None: as the recipe
    says); see the module and `dlkit tune --help`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's: every rank would run a study of its own
        raise ConfigError("dlkit tune runs each trial in one process; start it without torchrun (--jobs J runs "
                          "trials side by side)")
    if trials < 1:
        raise ConfigError(f"--trials must be 1 or more, got {trials}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be 1 or more, got {jobs}")
    seconds = _seconds(timeout)
    settings = resolve(recipe, space=space, overrides=overrides, epochs=epochs, seed=seed, fields=fields,
                       metric=metric, direction=direction, pruner=pruner, study=study, storage=storage,
                       runs_root=runs_root)
    if track is not None:
        from dlkit.track import tracked

        settings.recipe = tracked(settings.recipe, track)
    if storage is None:
        settings.folder.mkdir(parents=True, exist_ok=True)  # the study's SQLite file goes there
    optuna_study = open_study(settings, trials)
    settings.folder.mkdir(parents=True, exist_ok=True)
    clear_unfinished(optuna_study, settings)  # trials an earlier command left stopped: no checkpoints to resume
    parent = None
    if settings.recipe.track is not None:
        from dlkit.tune.tracking import StudyRun

        parent = StudyRun(optuna_study, settings, trials)
    deadline = time.monotonic() + seconds
    threads = _share_cores(jobs)
    helpers = [_start_helper(settings, trials, seconds, report, jobs, quiet) for _ in range(jobs - 1)]
    say = (lambda t: None) if quiet else (lambda t: print(trial_line(t, settings), file=sys.stderr, flush=True))
    try:
        # epoch by epoch on a terminal (a transient bar); in a log, the trial lines say enough
        epochs_quiet = quiet or jobs > 1 or not sys.stderr.isatty()
        ran = run_trials(optuna_study, settings, trials, deadline=deadline, quiet=epochs_quiet, report=report,
                         say=say, parent=parent.parent_id if parent is not None else None)
        codes = [proc.wait() for proc in helpers]
    except (RunInterrupted, KeyboardInterrupt) as exc:
        terminated = _terminated(exc)
        _stop(helpers, signal.SIGTERM if terminated else signal.SIGINT)
        clear_unfinished(optuna_study, settings)
        files, _ = write_study_files(optuna_study, settings, trials, plots)
        done = sum(counted(t) and t.state.is_finished() for t in optuna_study.get_trials(deepcopy=False))
        stopped = RunInterrupted(f"study '{settings.study}' stopped with {done} of {trials} trials finished; the trial "
                                 "under way does not count, and the same command continues the study "
                                 f"({settings.folder})")
        stopped.exit_code = 143 if terminated else 130
        if parent is not None:
            parent.end("interrupted", files, str(stopped))
        raise stopped from None
    except BaseException as exc:
        _stop(helpers, signal.SIGINT)
        if parent is not None:
            parent.end("failed", {}, error_line(exc))
        raise
    finally:
        _restore_cores(threads)
    for proc, code in zip(helpers, codes):
        if code:
            print(f"warning: helper process {proc.pid} stopped with exit code {code} (its error is above)",
                  file=sys.stderr)
    clear_unfinished(optuna_study, settings)
    files, summary = write_study_files(optuna_study, settings, trials, plots)
    if parent is not None:
        parent.end("finished", files)
    rows = summary["trials"]
    return TuneResult(settings.folder, settings.study, settings.metric, rows, summary["best"], files,
                      table(rows, settings), ran)


def work(spec: Mapping[str, Any]) -> list[int]:
    """A helper process: join the study `spec` names and run its trials (see the module)."""
    import optuna

    _share_cores(int(spec["jobs"]))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    found = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]))
    settings = TuneSettings.from_identity(found.user_attrs["dlkit"], direction=found.direction.name.lower(),
                                          study=spec["study"], storage=spec["storage"], folder=Path(spec["folder"]))
    if spec.get("track") is not None:  # the study records no track section: where to track is the command's
        settings.recipe = settings.recipe.model_copy(update={"track": TrackCfg.model_validate(spec["track"])})
    study = open_study(settings, int(spec["trials"]), create=False)
    say = (lambda t: None) if spec["quiet"] else (lambda t: print(trial_line(t, settings), file=sys.stderr, flush=True))
    parent = None
    if settings.recipe.track is not None:
        from dlkit.track.mlflow_logger import START_WAIT_S
        from dlkit.tune.tracking import stored_parent

        waits = [START_WAIT_S]  # the first trial waits for the command that opens the parent run; later ones look
        parent = lambda: stored_parent(study, waits.pop() if waits else 0.0)  # noqa: E731
    try:
        return run_trials(study, settings, int(spec["trials"]), deadline=time.monotonic() + float(spec["seconds"]),
                          quiet=True, report=spec["report"], say=say, parent=parent)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        stopped = RunInterrupted(f"helper process {os.getpid()} of study '{settings.study}' stopped; its trial under "
                                 "way does not count")
        stopped.exit_code = 143 if _terminated(exc) else 130
        raise stopped from None


def _seconds(timeout: str | float | None) -> float:
    if timeout is None:
        return math.inf
    if isinstance(timeout, int | float):
        if timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {timeout}")
        return float(timeout)
    try:
        return parse_duration(timeout)
    except ValueError as exc:
        raise ConfigError(f"--timeout: {exc}") from None


def _share_cores(jobs: int) -> int | None:
    """With several trials at once on this machine, each process takes its share of the cores (two
    processes each running every core are slower than one); returns the thread count it replaced."""
    if jobs < 2:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // jobs))
    return before


def _restore_cores(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _start_helper(settings: TuneSettings, trials: int, seconds: float, report: bool | None, jobs: int,
                  quiet: bool) -> subprocess.Popen[bytes]:
    track = settings.recipe.track.model_dump(mode="json") if settings.recipe.track is not None else None
    spec = {"storage": settings.storage, "study": settings.study, "folder": str(settings.folder), "trials": trials,
            "seconds": seconds if math.isfinite(seconds) else 1e12, "report": report, "quiet": quiet, "jobs": jobs,
            "track": track}
    proc = subprocess.Popen([sys.executable, "-m", "dlkit", "tune-worker"], stdin=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc


def _stop(helpers: list[subprocess.Popen[bytes]], signum: int) -> None:
    """Ask each helper to stop (it records its trial as interrupted) and wait for it; a second Ctrl-C
    here, or a helper that does not stop in HELPER_STOP_S, is killed."""
    for proc in helpers:
        if proc.poll() is None:
            proc.send_signal(signum)
    try:
        for proc in helpers:
            try:
                proc.wait(HELPER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
    except KeyboardInterrupt:
        for proc in helpers:
            proc.kill()
        raise


def _terminated(exc: BaseException) -> bool:
    return isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated) or getattr(exc, "exit_code", 0) == 143
