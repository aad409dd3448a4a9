"""The MLflow parent run of a tracked study: one per study, named after it, each trial's MLflow run nested
under it (tag mlflow.parentRunId, with dlkit.study, dlkit.trial and the trial's drawn values).

Its id lives in the study's Optuna storage, as the study's user attr `dlkit.mlflow`, written once: a
database row only one process can insert (Optuna's own set_study_user_attr would let the last writer
win), so `dlkit tune` run again, its --jobs helpers and other processes or machines on the same storage
all nest their trials under the same parent; a process that lost the race deletes the run it made.

When this process's part of the study ends, the parent gets the best value (metric best_<metric>, its
step the number of trials ended), the best trial's values (tags best.<field>: MLflow params cannot
change once logged, and a continued study may find a better trial), study.json, best.yaml and
study.html, and its status: FINISHED, KILLED after Ctrl-C or SIGTERM, FAILED when an error ended the
study; left RUNNING while another process still runs trials of it (the last one to end sets it).

Tracking never stops a study: a background thread opens the parent while the first trial waits for it
(track's START_WAIT_S at most); any MLflow error is one warning line and the trials are tracked on their
own. MLflow is imported only when the recipe is tracked.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

import dlkit
from dlkit.errors import error_line
from dlkit.space import shown
from dlkit.tune.settings import TuneSettings
from dlkit.tune.study import SeededTPE, open_storage, shown_url, startup_trials

ATTR = "dlkit.mlflow"  # the study's user attr: {"tracking_uri", "experiment_id", "run_id"} of its parent run
OUTCOMES = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


class StudyRun:
    """The parent run as this `dlkit tune` process sees it: opened in the background, ended by `end`."""

    def __init__(self, study: optuna.Study, settings: TuneSettings, budget: int) -> None:
        from dlkit.track.settings import client_env, tracking_uri

        assert settings.recipe.track is not None
        self.study, self.settings, self.budget = study, settings, budget
        self.uri = tracking_uri(settings.recipe.track, settings.folder.parent)
        self.experiment = settings.recipe.track.experiment or settings.recipe.name
        self.run_id: str | None = None
        self.failure: str | None = None
        self.client: Any = None
        self._waited = False
        client_env()  # here, not in the thread: setting environment variables races with C code reading them
        self._thread = threading.Thread(target=self._guarded, args=(self._open,), name="dlkit-mlflow-study",
                                        daemon=True)
        self._thread.start()

    def parent_id(self) -> str | None:
        """The parent run's id for a trial about to start; the first call waits for it (START_WAIT_S at most)."""
        if not self._waited:
            from dlkit.track.mlflow_logger import START_WAIT_S

            self._waited = True
            self._thread.join(START_WAIT_S)
        return self.run_id

    def end(self, outcome: str, files: dict[str, Path], message: str = "") -> None:
        """Log the best trial, the study's files and `outcome` (finished, interrupted or failed) on the
        parent; after Ctrl-C it waits at most track's INTERRUPTED_WAIT_S for MLflow."""
        from dlkit.track.mlflow_logger import INTERRUPTED_WAIT_S, START_WAIT_S

        wait = INTERRUPTED_WAIT_S if outcome == "interrupted" else None
        self._thread.join(wait if wait is not None else START_WAIT_S)
        if self.run_id is None or self.failure is not None:
            return
        finisher = threading.Thread(target=self._guarded, args=(lambda: self._finish(outcome, files, message),),
                                    name="dlkit-mlflow-study-end", daemon=True)
        finisher.start()
        finisher.join(wait)
        if finisher.is_alive() and self.failure is None:
            print(f"warning: the study's MLflow parent run at {self.uri} had not been updated when the study stopped; "
                  "`dlkit tune` with the same options updates it", file=sys.stderr, flush=True)

    # ---- the sending threads ------------------------------------------------------------------------

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # MLflow failing stops the study's tracking, never the study
            self.failure = error_line(exc)[:400]
            print(f"warning: MLflow tracking of study '{self.settings.study}' at {self.uri} stopped ({self.failure}); "
                  "the study goes on, its trials tracked on their own", file=sys.stderr, flush=True)

    def _open(self) -> None:
        """Find the study's parent run (set RUNNING again) or create it and claim it for the study."""
        from mlflow import MlflowClient

        from dlkit.track.sync import TrackingError, find_experiment, quiet_mlflow_logs

        quiet_mlflow_logs()
        client = MlflowClient(tracking_uri=self.uri)
        record = self.study.user_attrs.get(ATTR)
        if record is None:
            experiment = find_experiment(client, self.experiment, self.uri)
            made = client.create_run(experiment, run_name=self.settings.study, tags=self._tags())
            self._log_space(client, made.info.run_id)
            record = claim(self.settings, ATTR, {"tracking_uri": self.uri, "experiment_id": experiment,
                                                 "run_id": made.info.run_id})
            if record["run_id"] != made.info.run_id:  # another process claimed the study first: its run is the one
                client.delete_run(made.info.run_id)
        if record["tracking_uri"] != self.uri:
            raise TrackingError(f"the study's parent run is at {record['tracking_uri']}; this process tracks at "
                                f"{self.uri}, so its trials are not nested under it")
        run = client.get_run(record["run_id"])
        if run.info.status != "RUNNING":  # the study continued: running again, its old outcome forgotten
            client.update_run(record["run_id"], status="RUNNING")
            if "dlkit.error" in run.data.tags:
                client.delete_tag(record["run_id"], "dlkit.error")
        client.set_tag(record["run_id"], "dlkit.budget", str(self.budget))
        self.client, self.run_id = client, record["run_id"]

    def _finish(self, outcome: str, files: dict[str, Path], message: str) -> None:
        from mlflow.entities import Metric, RunTag

        from dlkit.track.content import MAX_TAG_VALUE
        from dlkit.tune.report import best_trial

        trials = self.study.get_trials(deepcopy=False)
        ended = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        best = best_trial(self.study)
        metrics, tags = [], []
        if best is not None:
            values = {k: self.settings.space[k].value_of(best.params[k]) for k in self.settings.space if k in best.params}
            now = int(time.time() * 1000)
            metrics = [Metric(f"best_{self.settings.metric}", float(best.value), now, ended),
                       Metric("best_trial", float(best.number), now, ended)]
            tags = [RunTag(f"best.{k}", shown(v)) for k, v in values.items()]
            tags.append(RunTag("dlkit.best_run_dir", str(best.user_attrs.get("run_dir", ""))))
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        for name in ("best", "json", "html"):
            if name in files and Path(files[name]).is_file():
                self.client.log_artifact(self.run_id, str(files[name]))
        # another process still runs trials of this study: the last one to end says how it ended
        if any(t.state == TrialState.RUNNING for t in trials):
            return
        state = [RunTag("dlkit.status", outcome)]
        if outcome != "finished" and message:
            state.append(RunTag("dlkit.error", message[:MAX_TAG_VALUE]))
        self.client.log_batch(self.run_id, tags=state)
        self.client.set_terminated(self.run_id, status=OUTCOMES[outcome])

    def _tags(self) -> dict[str, str]:
        settings, recipe = self.settings, self.settings.recipe
        sampler = SeededTPE(recipe.seed, startup_trials(self.budget))
        tags = {"dlkit.version": dlkit.__version__, "dlkit.recipe": recipe.name, "dlkit.study": settings.study,
                "dlkit.direction": settings.direction, "dlkit.metric": settings.metric,
                "dlkit.sampler": f"TPE seeded by seed {sampler.seed} and the trial's number, {sampler.startup} "
                                 "random trials first",
                "dlkit.pruner": settings.pruner, "dlkit.storage": shown_url(settings.storage),
                "dlkit.study_dir": str(settings.folder.resolve()), "mlflow.source.type": "LOCAL",
                "mlflow.source.name": "dlkit tune"}
        if recipe.expect.source:
            tags["dlkit.writeup"] = str(recipe.expect.source)
        if recipe.description:
            tags["mlflow.note.content"] = recipe.description
        return tags

    def _log_space(self, client: Any, run_id: str) -> None:
        """The search space as params (`space.train.optimizer.lr` = `loguniform(0.0001, 0.01)`): a study's
        space never changes, so they are logged once, when the parent is created."""
        from mlflow.entities import Param

        from dlkit.track.content import MAX_PARAM_VALUE, within_limits

        params, _ = within_limits({f"space.{k}": str(d) for k, d in self.settings.space.items()}, MAX_PARAM_VALUE)
        client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(params.items())])


def trial_tags(settings: TuneSettings, number: int, values: dict[str, Any], parent: str | None) -> dict[str, str]:
    """The tags of trial `number`'s MLflow run: its study, number, drawn values and parent run."""
    tags = {"dlkit.study": settings.study, "dlkit.trial": str(number),
            "dlkit.trial_params": json.dumps({k: shown(v) for k, v in values.items()})}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    return tags


def stored_parent(study: optuna.Study, wait_s: float = 0.0) -> str | None:
    """The parent run's id as the study records it (a helper process reads it there), waiting at most
    `wait_s` for the process that opens it."""
    deadline = time.monotonic() + wait_s
    while True:
        record = study.user_attrs.get(ATTR)
        if record is not None or time.monotonic() >= deadline:
            return record["run_id"] if record is not None else None
        time.sleep(0.2)


def claim(settings: TuneSettings, key: str, value: Any) -> Any:
    """Store `value` as the study's user attr `key` unless one is there; returns the value stored. One
    INSERT into Optuna's study_user_attributes table, whose (study_id, key) is unique: of processes
    claiming at once exactly one succeeds, and the others read its value."""
    import sqlalchemy
    from sqlalchemy.exc import IntegrityError

    storage = open_storage(settings.storage)
    study_id = storage.get_study_id_from_name(settings.study)
    attrs = storage.get_study_user_attrs(study_id)
    if key in attrs:
        return attrs[key]
    table = sqlalchemy.Table("study_user_attributes", sqlalchemy.MetaData(), autoload_with=storage.engine)
    try:
        with storage.engine.begin() as connection:
            connection.execute(table.insert().values(study_id=study_id, key=key, value_json=json.dumps(value)))
    except IntegrityError:
        pass  # another process inserted first
    return storage.get_study_user_attrs(study_id)[key]
