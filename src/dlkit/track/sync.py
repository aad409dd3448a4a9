"""Sending a run directory to MLflow, part by part, each part recorded in the run's tracking.json once MLflow
has it: the run itself, params and tags, the epochs, the results, the files, the model, the status.

The live tracker sends through a `Sender` while the run trains; `dlkit track sync RUN` sends whatever is
still missing (a tracking server that was down, a model exported later, a run never tracked), so sending
twice sends nothing twice: params keep their values, epochs and files are sent once (a file again only
when its sha256 changed), the model is logged once.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlkit.config import TrackCfg
from dlkit.errors import DlkitError, RunDirError
from dlkit.files import sha256_file
from dlkit.rundir import RunDir, process_alive
from dlkit.track import content
from dlkit.track.logged_model import log_bundle_model, register
from dlkit.track.settings import artifact_location, client_env, sqlite_path, tracking_uri


class TrackingError(DlkitError):
    """MLflow refused or could not be reached; what was not sent stays recorded in tracking.json."""


def new_state(run: RunDir, cfg: TrackCfg | None, recipe_name: str, runs_root: str | Path = "runs",
              tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """tracking.json for a run not yet sent anywhere: where it goes, and nothing sent. `tags` join the run's
    own when it is created (a study's trial: its parent run, study and number), kept here so that
    `dlkit track sync` creates a run the live tracker could not with the same ones."""
    cfg = cfg or TrackCfg()
    return {"backend": "mlflow", "tracking_uri": tracking_uri(cfg, runs_root),
            "experiment": cfg.experiment or recipe_name, "run_name": run.path.name, "run_id": None,
            "experiment_id": None, "register": cfg.registered_model, "group": cfg.group, "log_model": cfg.log_model,
            "tags": dict(tags or {}),
            "sent": {"start": False, "epochs": 0, "results": False, "files": {}, "model": None,
                     "registered": None, "status": None}}


class Sender:
    """Sends one run directory to MLflow and records each part in tracking.json as soon as it is sent."""

    def __init__(self, run: RunDir, state: dict[str, Any]) -> None:
        client_env()
        from mlflow import MlflowClient

        quiet_mlflow_logs()

        self.run, self.state = run, state
        self.sent: dict[str, Any] = state["sent"]
        path = sqlite_path(state["tracking_uri"])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        self.client = MlflowClient(tracking_uri=state["tracking_uri"])

    def save(self) -> None:
        self.run.write_tracking(self.state)

    # ---- the parts, in the order a run sends them -----------------------------------------------

    def open_run(self) -> str:
        """The MLflow run's id, creating the experiment and the run the first time."""
        if self.state["run_id"] is not None:
            return self.state["run_id"]
        experiment_id = find_experiment(self.client, self.state["experiment"], self.state["tracking_uri"])
        recipe = self._recipe()
        tags = content.start_tags(self.run, recipe, self.state.get("group")) | (self.state.get("tags") or {})
        created = self.client.create_run(experiment_id, run_name=self.state["run_name"], tags=tags)
        self.state.update(run_id=created.info.run_id, experiment_id=experiment_id)
        self.save()
        return created.info.run_id

    def reopen(self) -> None:
        """A resumed run: the same MLflow run is running again, its old outcome forgotten."""
        run_id = self.open_run()
        if self.sent.get("status") is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.sent["status"] = None
        if "dlkit.error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "dlkit.error")
        self.sent["results"] = False
        self.save()

    def send_start(self) -> None:
        """The resolved recipe as params (cut to MLflow's limits; the names cut are a tag)."""
        if self.sent["start"]:
            return
        from mlflow.entities import Param, RunTag

        params, cut = content.within_limits(content.flatten_params(self._recipe()), content.MAX_PARAM_VALUE)
        run_id = self.open_run()
        for part in content.chunks(sorted(params.items()), content.PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in part])
        if cut:
            self.client.log_batch(run_id, tags=[RunTag("dlkit.params_cut", ", ".join(cut)[: content.MAX_TAG_VALUE])])
        self.sent["start"] = True
        self.save()

    def send_epochs(self, rows: list[tuple[dict[str, Any], int]]) -> None:
        """Epochs (metrics.jsonl rows, each with its time in ms) not yet sent, each metric at its epoch as step."""
        from mlflow.entities import Metric

        fresh = [(row, ms) for row, ms in rows if int(row["epoch"]) > self.sent["epochs"]]
        if not fresh:
            return
        metrics = [Metric(k, v, ms, int(row["epoch"])) for row, ms in fresh
                   for k, v in content.epoch_metrics(row).items()]
        run_id = self.open_run()
        for part in content.chunks(metrics, content.METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=part)
        self.sent["epochs"] = max(int(row["epoch"]) for row, _ in fresh)
        self.save()

    def send_results(self) -> None:
        """A finished run's test metrics (and the claims beside them) at its last epoch, and its result tags."""
        if self.sent["results"] or self.run.status()["state"] != "finished":
            return
        from mlflow.entities import Metric, RunTag

        summary, now = self.run.summary(), _now_ms()
        step = int(summary.get("epochs_run") or 0)
        metrics = [Metric(k, v, now, step) for k, v in content.result_metrics(summary).items()]
        bundle = self.run.read_json("bundle.json") if (self.run.path / "bundle.json").is_file() else None
        tags = [RunTag(k, v) for k, v in content.result_tags(summary, bundle).items()]
        run_id = self.open_run()
        for part in content.chunks(metrics, content.METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=part)
        for part in content.chunks(tags, content.PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=part)
        self.sent["results"] = True
        self.save()

    def send_files(self) -> None:
        """The run directory's files (content.ARTIFACT_FILES, plots/) not sent yet, or changed since."""
        run_id = self.open_run()
        for name in content.artifact_files(self.run):
            digest = sha256_file(self.run.path / name)
            if self.sent["files"].get(name) == digest:
                continue
            folder = str(Path(name).parent) if "/" in name else None
            self.client.log_artifact(run_id, str(self.run.path / name), artifact_path=folder)
            self.sent["files"][name] = digest
            self.save()

    def send_model(self) -> None:
        """A finished run's bundle as an MLflow pyfunc model, logged once; registered when asked."""
        if not self.state.get("log_model", True) or self.run.status()["state"] != "finished":
            return
        if self.sent["model"] is None:
            self.sent["model"] = log_bundle_model(self.client, self.run, self.open_run(), self.state["experiment_id"])
            self.save()
        name = self.state.get("register")
        if name and self.sent.get("registered") is None:
            self.sent["registered"] = register(self.client, name, self.sent["model"], self.state["run_id"])
            self.save()

    def send_status(self, fallback: tuple[str, str] | None = None) -> None:
        """The run's end as MLflow's status: FINISHED, FAILED or KILLED, from status.json (or `fallback`,
        (state, message), when the run directory still says running), the error line as `dlkit.error`."""
        state, message = _dir_outcome(self.run)
        if state == "running" and fallback is not None:
            state, message = fallback
        if state == "running":
            return
        status = content.MLFLOW_STATUS[state]
        if self.sent.get("status") == status:
            return
        from mlflow.entities import RunTag

        run_id = self.open_run()
        tags = [RunTag("dlkit.status", state)]
        if state != "finished" and message:
            tags.append(RunTag("dlkit.error", message[: content.MAX_TAG_VALUE]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)
        self.sent["status"] = status
        self.save()

    def send_all(self, fallback: tuple[str, str] | None = None) -> None:
        """Everything not sent yet, the status last (see `send_status` for `fallback`)."""
        self.open_run()
        self.send_start()
        self.send_epochs([(row, _now_ms()) for row in self.run.history()])
        self.send_results()
        self.send_files()
        self.send_model()
        self.send_status(fallback)

    # ---- helpers ----------------------------------------------------------------------------------

    def _recipe(self) -> dict[str, Any]:
        return self.run.recipe().model_dump(mode="json", exclude_none=True)


def find_experiment(client: Any, name: str, uri: str) -> str:
    """Experiment `name`'s id, created (with a SQLite store's artifact folder) when missing; a deleted one
    is one TrackingError line."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException:  # created meanwhile by another run (seeds side by side)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore "
                            f"--experiment-id {found.experiment_id}) or set track.experiment")
    return found.experiment_id


def sync_run(run_dir: str | Path, cfg: TrackCfg | None = None, runs_root: str | Path = "runs") -> dict[str, Any]:
    """Send whatever of a run MLflow does not have yet; returns tracking.json after. A run never tracked is
    tracked now (`cfg` says where; by default as `dlkit run --track mlflow` would). A run that is still
    running is refused: its own tracker is sending it."""
    path = Path(run_dir).expanduser()
    if not (path / "status.json").is_file():
        raise RunDirError(f"{path} is not a run directory (no status.json); pass the folder `dlkit run` printed")
    run = RunDir(path)
    status = run.status()
    if status["state"] == "running" and _alive(status.get("pid")):
        raise RunDirError(f"{path} is still running (process {status['pid']}); it sends itself, sync it once it ends")
    state = run.tracking()
    if state is None:
        state = new_state(run, cfg, run.recipe().name, runs_root)
    elif cfg is not None and cfg.uri and tracking_uri(cfg, runs_root) != state["tracking_uri"]:
        raise TrackingError(f"{path} is tracked at {state['tracking_uri']}, not {cfg.uri}; sync sends a run "
                            "where it started")
    sender = Sender(run, state)
    sender.send_all()
    return state


def _dir_outcome(run: RunDir) -> tuple[str, str]:
    """(state, message) from status.json; a run left `running` by a process that is gone was killed."""
    status = run.status()
    state, message = status["state"], status.get("message", "")
    if state == "running" and not _alive(status.get("pid")):
        return "interrupted", "the process ended without marking the run (killed, or the machine stopped)"
    return state, message


def _alive(pid: Any) -> bool:
    """Whether the run's process lives: this one, or another running dlkit."""
    return pid == os.getpid() or process_alive(pid)


def quiet_mlflow_logs() -> None:
    """MLflow's INFO lines (database migrations, 'Created version 1') would interleave with dlkit's own
    progress lines; its warnings and errors still show."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _now_ms() -> int:
    return int(time.time() * 1000)
