"""The Optuna side of a study: its storage, the study itself, and the trials this process runs.

Each trial is an ordinary run (`runner.run`) into `runs/<study>/trial-<n>/`; a callback reports each
epoch's metric to the trial and, when the pruner says so, ends the fit early: the run is still tested
and bundled, and the trial is recorded as pruned. The study's budget (`--trials N`) counts trials that
are finished, failed or under way, over every process that shares the storage: a process
takes the next trial only while fewer are counted, and a trial that two processes took at once
beyond the budget is dropped before it runs, so a study ends with N trials. A trial stopped by
Ctrl-C, or whose process died (no heartbeat for GRACE_S), does not count: running the command again
fills its place.
"""
from __future__ import annotations

import math
import re
import socket
import time
import warnings
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

HEARTBEAT_S = 30  # a running trial's process writes a heartbeat this often
GRACE_S = 120  # a running trial with no heartbeat for this long is failed (its process died) and not counted
SQLITE_WAIT_S = 60  # processes sharing a SQLite file wait this long for its lock
CREATE_TRIES = 10  # opening a new database that another process is creating tables in


class MetricMissing(ConfigError):
    """The followed metric is not among the run's epoch metrics: every trial would fail the same way."""


class TrialFailed(Exception):
    """This trial failed (recorded with its reason); the study goes on."""


class Surplus(Exception):
    """This trial was taken beyond the budget by two processes at once; it is dropped unrun."""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (tables created on first use); a bad URL, a missing database
    driver or a database that cannot be reached is one ConfigError line."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"--storage '{url}' is not a database URL; use e.g. sqlite:///study.db or "
                          "postgresql://user@host/dbname") from None
    shown = parsed.render_as_string(hide_password=True)
    engine: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine = {"connect_args": {"timeout": SQLITE_WAIT_S}}
    for attempt in range(CREATE_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise ConfigError(f"--storage {shown} needs a database driver that is not installed ({exc}); install it, "
                              "e.g. pip install psycopg2-binary for PostgreSQL or pymysql for MySQL") from None
        except sqlalchemy.exc.SQLAlchemyError as exc:
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
            # processes started together on a new database race to create its tables: the loser tries again
            racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in reason
            if not racing or attempt == CREATE_TRIES - 1:
                raise ConfigError(f"cannot open --storage {shown}: {reason[:300]}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def shown_url(url: str) -> str:
    """The storage URL with its password hidden, for messages and files."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_study(settings: TuneSettings, budget: int, *, create: bool = True) -> optuna.Study:
    """Create the study or join the one of that name, refusing one that differs in recipe, space,
    metric, direction or pruner (every process must run the same trials). A new study's first
    trial is the recipe as given, when the space can draw its values."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # dlkit says what happens, trial by trial
    storage = open_storage(settings.storage)
    where = f"study '{settings.study}' in {shown_url(settings.storage)}"
    exists = settings.study in optuna.study.get_all_study_names(storage)
    if not exists and not create:
        raise ConfigError(f"{where} does not exist")
    if not exists:
        taken = sorted(p.name for p in settings.folder.glob("trial-*")) if settings.folder.is_dir() else []
        if taken:
            raise ConfigError(f"{settings.folder} holds trials ({', '.join(taken[:3])}) of a study that {where} is not; "
                              "choose another --study NAME or move that folder away")
    kwargs = {"study_name": settings.study, "storage": storage, "pruner": make_pruner(settings),
              "sampler": SeededTPE(settings.recipe.seed, startup_trials(budget))}
    try:
        study = optuna.create_study(direction=settings.direction, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        _check_same(study, settings, where)
        return study
    study.set_user_attr("dlkit", settings.identity())
    base = settings.base_values()
    if base is not None:
        study.enqueue_trial({k: settings.space[k].label_of(v) for k, v in base.items()}, user_attrs={"as_given": True})
    return study


def _check_same(study: optuna.Study, settings: TuneSettings, where: str) -> None:
    stored = None
    for _ in range(100):  # the process that created the study records its settings a moment later
        stored = study.user_attrs.get("dlkit")
        if stored is not None:
            break
        time.sleep(0.1)
    if stored is None or stored.get("format") != settings.identity()["format"]:
        raise ConfigError(f"{where} was not made by dlkit tune; choose another --study NAME")
    differ = settings.differences(stored)
    direction = study.direction.name.lower()
    if direction != settings.direction:
        differ.insert(0, f"it is to {direction}")
    if differ:
        raise ConfigError(f"{where} was started with other settings: {'; '.join(differ)}; run it with the same recipe "
                          "and options, or start another with --study NAME")


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """median (Optuna's defaults: after 5 trials, a trial below the median of earlier ones at the same
    epoch stops), hyperband (1 epoch to all of them, a third kept each round) or none."""
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, settings.epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def startup_trials(budget: int) -> int:
    """Random trials before TPE models the results: a third of the budget, 3 to 10 (Optuna's default 10
    would leave a study of 8 trials a random search)."""
    return max(3, min(10, budget // 3))


class SeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler seeded anew for each trial by the recipe's seed and the trial's number: the
    same study run again draws the same trials, and processes sharing a study never draw the same
    random start (a single seed would give every process the same first draws)."""

    def __init__(self, seed: int, startup: int = 10):
        self.seed, self.startup = seed, startup
        self.inner = self._tpe(0)

    def _tpe(self, number: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + number) % 2**32,
                                          n_startup_trials=self.startup)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner = self._tpe(trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.inner.after_trial(study, trial, state, values)


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
                 report: bool | None):
        self.study, self.settings, self.budget = study, settings, budget
        self.quiet, self.report = quiet, report
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
            result = run(recipe, out=out, quiet=self.quiet, report=self.report,
                         callbacks=[pruning] if pruning is not None else ())
            value = kept_value(result.history, result.summary, settings.metric)
        except (RunInterrupted, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)
            if (out / STATUS).is_file():
                RunDir(out).mark("interrupted", f"trial {trial.number} of study '{settings.study}', stopped by Ctrl-C or "
                                 "SIGTERM: the study does not count it, and `dlkit tune` with the same options runs "
                                 "another trial in its place")
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


def run_trials(study: optuna.Study, settings: TuneSettings, budget: int, *, deadline: float, quiet: bool,
               report: bool | None, say: Callable[[FrozenTrial], None]) -> list[int]:
    """Take trials one after another until the study counts `budget` of them or `deadline` (a
    time.monotonic() value) has passed; `say(trial)` after each. Returns the numbers this process ran."""
    objective = Objective(study, settings, budget, quiet=quiet, report=report)
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
