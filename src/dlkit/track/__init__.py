"""Experiment tracking with MLflow. The run directory stays the source of truth; MLflow is where runs are
found, compared and handed on. How a training run uses it (runner.execute does exactly this):

    tracker = start_tracking(recipe, run, runs_root)      # None when the recipe is not tracked
    with tracking_outcome(tracker), guarded(run, ...):    # FAILED / KILLED (+ the error line) if it stops
        fit(..., callbacks=[*callbacks, *tracking_callbacks(tracker)])
        complete_run(...)
    try:
        report ...
    finally:
        finish_tracking(tracker)                          # results, files, the model, then FINISHED

A resumed run directory continues the same MLflow run: `tracker = resume_tracker(run_dir)`, used the same
way. `sync_run(RUN)` sends whatever did not reach MLflow (`dlkit track sync RUN`).

Nothing here imports MLflow, or torch, until a run is tracked: `dlkit list` pays nothing for it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlkit.errors import ConfigError, RunInterrupted, error_line
from dlkit.rundir import RunDir

if TYPE_CHECKING:
    from dlkit.config import Recipe, TrackCfg
    from dlkit.engine.callbacks import Callback
    from dlkit.track.mlflow_logger import MlflowTracker


def start_tracking(recipe: Recipe, run: RunDir, runs_root: str | Path = "runs",
                   tags: Mapping[str, str] | None = None) -> MlflowTracker | None:
    """The tracker of a run just created, already creating its MLflow run in the background (with `tags`
    beside its own: a study's trial names its parent run); None when the recipe has no `track` section.
    A tracking setting that cannot work (MLflow not installed, a URI MLflow does not read) marks the run
    failed and raises one ConfigError line."""
    if recipe.track is None:
        return None
    from dlkit.track.settings import require_mlflow
    from dlkit.track.sync import new_state

    try:
        require_mlflow()
        state = new_state(run, recipe.track, recipe.name, runs_root, tags)
    except ConfigError as exc:
        run.mark("failed", str(exc))
        raise
    run.write_tracking(state)
    return _tracker(run, state, resumed=False)


def resume_tracker(run_dir: str | Path) -> Callback | None:
    """The tracker of a run directory being resumed: the SAME MLflow run (its id is in tracking.json), set
    running again, its earlier error tag removed; None for a run that was not tracked. Use it as
    `start_tracking`'s tracker. Epochs MLflow has already (up to tracking.json's `sent.epochs`) are not
    sent again: an exact resume computes them again to the same values. Without MLflow installed any
    more: a warning and None (training resumes; `dlkit track sync RUN` sends it once MLflow is back)."""
    run = RunDir(Path(run_dir).expanduser())
    state = run.tracking()
    recipe = run.recipe()
    if state is None and recipe.track is None:
        return None
    from dlkit.track.settings import require_mlflow
    from dlkit.track.sync import new_state

    try:
        require_mlflow()
    except ConfigError as exc:
        print(f"warning: {exc}; resuming without tracking", file=sys.stderr)
        return None
    if state is None:  # tracked, but its record was never written: start one now
        state = new_state(run, recipe.track, recipe.name, run.path.parent)
        run.write_tracking(state)
        return _tracker(run, state, resumed=False)
    return _tracker(run, state, resumed=True)


def tracking_callbacks(tracker: MlflowTracker | None) -> list[Callback]:
    """The tracker as fit's callback list entry: [] when not tracking."""
    return [] if tracker is None else [tracker]


@contextmanager
def tracking_outcome(tracker: MlflowTracker | None) -> Iterator[None]:
    """Around `guarded`: when training stops (an error, a non-finite loss, Ctrl-C, SIGTERM) the MLflow run
    ends FAILED or KILLED with the run directory's error line as `dlkit.error`. After Ctrl-C / SIGTERM it
    waits at most a few seconds for MLflow: `dlkit track sync RUN` sends what did not make it."""
    try:
        yield
    except BaseException as exc:
        if tracker is not None:
            stopped = isinstance(exc, KeyboardInterrupt | RunInterrupted)
            fallback = ("interrupted" if stopped else "failed", error_line(exc))
            _end(tracker, fallback, interrupted=stopped)
        raise


def finish_tracking(tracker: MlflowTracker | None) -> None:
    """After a finished run (and its report): the results, the files, the model, then FINISHED; waits
    until MLflow has them (or a few seconds, when Ctrl-C stopped the report)."""
    if tracker is None:
        return
    stopped = isinstance(sys.exc_info()[1], KeyboardInterrupt | RunInterrupted)
    _end(tracker, None, interrupted=stopped)


def sync_after(recipe: Recipe, result: Any, runs_root: str | Path = "runs", tags: Mapping[str, str] | None = None) -> Any:
    """A run made without a live tracker (the NumPy engine trains in seconds, before its run directory
    exists) is sent whole once finished; MLflow failing is one warning. Returns `result` (a RunResult)."""
    if recipe.track is None:
        return result
    from dlkit.track.settings import require_mlflow
    from dlkit.track.sync import Sender, new_state

    run = RunDir(result.run_dir)
    try:
        require_mlflow()
        state = new_state(run, recipe.track, recipe.name, runs_root, tags)
        run.write_tracking(state)
        Sender(run, state).send_all()
    except Exception as exc:  # the run is finished and kept; tracking it is what failed
        print(f"warning: MLflow tracking failed ({error_line(exc)[:400]}); the run is finished in {run.path}, "
              f"and `dlkit track sync {run.path}` sends it", file=sys.stderr, flush=True)
    return result


def sync_run(run_dir: str | Path, uri: str | None = None, experiment: str | None = None,
             runs_root: str | Path = "runs") -> dict[str, Any]:
    """Send what MLflow does not have of a run (tracking it now if it never was); returns tracking.json."""
    from dlkit.config import TrackCfg
    from dlkit.track.settings import require_mlflow
    from dlkit.track.sync import sync_run as sync

    require_mlflow()
    cfg = TrackCfg(uri=uri, experiment=experiment) if uri or experiment else None
    return sync(run_dir, cfg, runs_root)


def tracked(recipe: Recipe, track: str | None, register: str | None = None) -> Recipe:
    """The recipe with `--track` (mlflow, none, or None: as the recipe says) and `--register NAME` applied;
    when it is tracked, MLflow is checked installed and its URI readable (one ConfigError line each)."""
    if track not in (None, "mlflow", "none"):
        raise ConfigError(f"--track must be mlflow or none, got '{track}'")
    if track == "none":
        if register:
            raise ConfigError("--register needs tracking; drop --track none")
        return recipe.model_copy(update={"track": None})
    if track == "mlflow" or register:
        from dlkit.config import TrackCfg

        cfg = recipe.track or TrackCfg()
        recipe = recipe.model_copy(update={"track": cfg.model_copy(update={"registered_model": register or
                                                                           cfg.registered_model})})
    if recipe.track is None:
        return recipe
    from dlkit.track.settings import checked_uri, require_mlflow

    require_mlflow()
    if recipe.track.uri:
        checked_uri(recipe.track.uri)
    return recipe


def tracking_uri(cfg: TrackCfg | None = None, runs_root: str | Path = "runs") -> str:
    """The tracking URI a run would use (`track.uri`, $MLFLOW_TRACKING_URI, or the local SQLite store)."""
    from dlkit.track.settings import tracking_uri as resolve

    return resolve(cfg, runs_root)


def _tracker(run: RunDir, state: dict[str, Any], resumed: bool) -> MlflowTracker:
    from dlkit.track.mlflow_logger import MlflowTracker

    return MlflowTracker(run, state, resumed=resumed)


def _end(tracker: MlflowTracker, fallback: tuple[str, str] | None, interrupted: bool) -> None:
    from dlkit.track.mlflow_logger import INTERRUPTED_WAIT_S

    complete = tracker.end(fallback, wait=INTERRUPTED_WAIT_S if interrupted else None)
    if not complete and tracker.failure is None:
        print(f"warning: MLflow tracking had not sent everything when the run stopped; `dlkit track sync "
              f"{tracker.run.path}` sends the rest", file=sys.stderr, flush=True)
