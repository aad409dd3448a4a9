"""Reading runs back from MLflow (`dlkit compare --experiment NAME`) and `dlkit ui`, MLflow's UI over a store.

compare reads each finished run's own summary.json and recipe.yaml artifacts (the copies of its run
directory), so a run compares the same from MLflow as from its folder.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dlkit.errors import ConfigError
from dlkit.evaluate.compare import RunRecord, fields_of
from dlkit.rundir import SummarySpec
from dlkit.track.settings import ARTIFACTS, client_env, sqlite_path

HOST = "127.0.0.1"  # the UI answers this machine only
PAGE = 1000  # runs per search request


def experiment_records(name: str, uri: str, given: Sequence[str | Path] = ()) -> tuple[list[RunRecord], list[str]]:
    """(recipe fields, summary) of each finished dlkit run of MLflow experiment `name`, oldest first, and
    notes on the runs left out. A run whose directory is among `given` is left out silently (it is in the
    table already)."""
    client_env()
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"no MLflow experiment '{name}' at {uri}; `dlkit ui` shows the experiments there "
                          "(MLFLOW_TRACKING_URI or --uri chooses the store)")
    seen = {Path(p).expanduser().resolve() for p in given}
    records: list[RunRecord] = []
    unfinished: Counter[str] = Counter()
    unsent, foreign = 0, 0
    with tempfile.TemporaryDirectory(prefix="dlkit-compare-") as tmp:
        for run in _all_runs(client, experiment.experiment_id):
            tags = run.data.tags
            if "dlkit.recipe" not in tags:
                foreign += 1
                continue
            if run.info.status != "FINISHED":
                unfinished[run.info.status] += 1
                continue
            if tags.get("dlkit.run_dir") and Path(tags["dlkit.run_dir"]).resolve() in seen:
                continue
            folder = Path(tmp, run.info.run_id)
            try:
                files = [Path(download_artifacts(run_id=run.info.run_id, artifact_path=f, dst_path=str(folder),
                                                 tracking_uri=uri)) for f in ("summary.json", "recipe.yaml")]
                record = _record(*files)
            except Exception:  # not sent yet (`dlkit track sync`), or not a dlkit summary
                unsent += 1
                continue
            records.append(record)
    notes = []
    if unfinished:
        counts = ", ".join(f"{status} {n}" for status, n in sorted(unfinished.items()))
        notes.append(f"{sum(unfinished.values())} runs of experiment {name} are not finished ({counts}): left out")
    if unsent:
        notes.append(f"{unsent} finished runs of experiment {name} have no readable summary.json and recipe.yaml "
                     "in MLflow (`dlkit track sync RUN` sends them): left out")
    if foreign:
        notes.append(f"{foreign} runs of experiment {name} were not made by dlkit: left out")
    return records, notes


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every run of the experiment (active ones), oldest first, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=PAGE, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _record(summary_file: Path, recipe_file: Path) -> RunRecord:
    """A run's (recipe fields, summary) from its downloaded artifacts, checked as the run directory's are."""
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    SummarySpec.model_validate(summary)
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    if not isinstance(recipe, dict):
        raise ValueError("recipe.yaml holds no mapping")
    return fields_of(recipe), summary


def ui_command(uri: str, port: int) -> list[str]:
    """The `mlflow server` command line of `dlkit ui`: the store `uri`, HOST only, one worker, artifacts
    proxied from mlartifacts/ beside a SQLite file. A store that is already a server is refused."""
    if uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc"):
        raise ConfigError(f"the tracking URI {uri} is a server already: open it in a browser (dlkit ui starts a "
                          "UI over a local store: unset MLFLOW_TRACKING_URI or pass --uri sqlite:///FILE.db)")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST,
               "--port", str(port), "--workers", "1"]
    path = sqlite_path(uri)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"no MLflow store at {path} yet: track a run first (dlkit run RECIPE --track mlflow), "
                              "or pass --uri")
        command += ["--artifacts-destination", str(path.parent / ARTIFACTS)]
    return command


def run_ui(uri: str, port: int) -> int:
    """Start MLflow's UI over `uri` on HOST:`port` and wait; Ctrl-C or SIGTERM stops it (and its server
    process) cleanly, as `dlkit serve` stops: exit code 0. Returns the server's exit code otherwise."""
    command = ui_command(uri, port)
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            raise ConfigError(f"port {port} on {HOST} is in use; pass --port N") from None
    # MLflow's job runner would start eight more processes that outlive a stopped server
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on http://{HOST}:{port} over {uri} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    server = subprocess.Popen(command, env=env)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (dlkit's Terminated): the way to stop a server
        return 0
    finally:
        if server.poll() is None:
            server.terminate()  # mlflow server hands SIGTERM on to its uvicorn process
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def summary_line(state: dict[str, Any]) -> str:
    """`dlkit track sync`'s answer: where the run is in MLflow and what it holds now, as one JSON line."""
    sent = state["sent"]
    return json.dumps({"tracking_uri": state["tracking_uri"], "experiment": state["experiment"],
                       "run_id": state["run_id"], "status": sent.get("status"), "epochs": sent.get("epochs"),
                       "files": len(sent.get("files", {})), "model": sent.get("model"),
                       "registered_version": sent.get("registered")})

