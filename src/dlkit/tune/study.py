"""The study in its Optuna storage: opening the storage (SQLite by default, any RDB URL Optuna takes),
creating or joining the study (one that differs in its settings is refused), its sampler and pruner."""
from __future__ import annotations

import time
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlkit.errors import ConfigError
from dlkit.tune.settings import TuneSettings

HEARTBEAT_S = 30  # a running trial's process writes a heartbeat this often
GRACE_S = 120  # a running trial with no heartbeat for this long is failed (its process died) and not counted
SQLITE_WAIT_S = 60  # processes sharing a SQLite file wait this long for its lock
CREATE_TRIES = 10  # opening a new database that another process is creating tables in


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
