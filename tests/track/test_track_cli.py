"""The tracking commands and options from the command line: `dlkit train --track`, and every mistake is
one `error:` line with exit code 2, made before anything is trained."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

import dlkit
from dlkit.errors import ConfigError


def one_error(run_cli, *args: object) -> str:
    code, out, err = run_cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (code, out, err)
    return err.strip()


def test_train_tracks_into_runs_mlflow_db_and_registers(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = run_cli("train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--quiet",
                             "--track", "mlflow", "--register", "digits-mlp-adhoc", "--out", "adhoc")
    assert (code, err) == (0, "") and out.strip().splitlines()[-1] == "adhoc"
    state = json.loads(Path("adhoc/tracking.json").read_text())
    assert state["tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (state["register"], state["sent"]["registered"], state["sent"]["status"]) == ("digits-mlp-adhoc", "1",
                                                                                        "FINISHED")
    version = MlflowClient(state["tracking_uri"]).get_model_version("digits-mlp-adhoc", "1")
    assert version.run_id == state["run_id"]


@pytest.mark.parametrize("args, expected", [
    (["run", "digits-mlp", "--track", "wandb"], "error: --track must be mlflow or none, got 'wandb'"),
    (["run", "digits-mlp", "--track", "none", "--register", "m"], "error: --register needs tracking; drop --track none"),
    (["run", "digits-mlp", "--track", "mlflow", "--set", "track.uri=ftp://host/x"],
     "error: tracking URI 'ftp://host/x' is not one MLflow reads; give http://HOST:PORT, sqlite:///FILE.db or another "
     "of sqlite, http, https, file, postgresql, mysql, mssql, databricks, databricks-uc (MLFLOW_TRACKING_URI or "
     "track.uri)"),
    (["run", "digits-mlp", "--set", "track.server=x"],
     "error: recipe 'digits-mlp': unknown field 'track.server'; allowed here: backend, uri, experiment, "
     "registered_model, group, log_model"),
    (["compare"], "error: give run directories, --experiment NAME (an MLflow experiment), or both"),
    (["ui", "--uri", "http://127.0.0.1:5000"],
     "error: the tracking URI http://127.0.0.1:5000 is a server already: open it in a browser (dlkit ui starts a UI "
     "over a local store: unset MLFLOW_TRACKING_URI or pass --uri sqlite:///FILE.db)"),
    (["track", "sync", "nowhere"], "error: nowhere is not a run directory (no status.json); pass the folder `dlkit run` "
                                   "printed"),
], ids=["track", "register", "uri", "field", "compare", "ui-server", "sync"])
def test_a_tracking_mistake_is_one_error_line_before_anything_runs(tmp_path, run_cli, args, expected):
    assert one_error(run_cli, *args) == expected
    assert list(tmp_path.iterdir()) == []


def test_ui_refuses_a_store_that_is_not_there_and_a_port_in_use(tmp_path, run_cli):
    assert one_error(run_cli, "ui") == (f"error: no MLflow store at {tmp_path / 'runs' / 'mlflow.db'} yet: track a run "
                                       "first (dlkit run RECIPE --track mlflow), or pass --uri")
    (tmp_path / "m.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert one_error(run_cli, "ui", "--uri", "sqlite:///m.db", "--port", port) == (
            f"error: port {port} on 127.0.0.1 is in use; pass --port N")


def test_compare_names_an_experiment_that_is_not_there(tmp_path, run_cli):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert one_error(run_cli, "compare", "--experiment", "nope", "--uri", uri) == (
        f"error: no MLflow experiment 'nope' at {uri}; `dlkit ui` shows the experiments there (MLFLOW_TRACKING_URI "
        "or --uri chooses the store)")


def test_sync_refuses_a_run_that_is_still_running(tmp_path, run_cli):
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "status.json").write_text(json.dumps({"state": "running", "message": "training",
                                                               "pid": os.getpid()}))
    assert one_error(run_cli, "track", "sync", "live") == (
        f"error: live is still running (process {os.getpid()}); it sends itself, sync it once it ends")


@pytest.fixture
def no_mlflow(monkeypatch):
    """As if the `track` extra were not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))


MISSING = ("error: tracking needs MLflow, which is not installed: pip install 'dlkit[track]' (or run without --track "
           "/ the recipe's track section)")


@pytest.mark.parametrize("args", [["run", "digits-mlp", "--track", "mlflow"], ["ui"], ["track", "sync", "x"],
                                  ["compare", "--experiment", "x"]], ids=" ".join)
def test_without_mlflow_installed_tracking_is_one_error_line(tmp_path, run_cli, no_mlflow, args):
    assert one_error(run_cli, *args) == MISSING
    assert list(tmp_path.iterdir()) == []


def test_without_mlflow_a_tracked_run_from_python_is_marked_failed(tmp_path, no_mlflow):
    with pytest.raises(ConfigError, match="^tracking needs MLflow, which is not installed"):
        dlkit.run("digits-mlp", epochs=1, out=tmp_path / "run", fields={"track.backend": "mlflow"})
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["message"].startswith("tracking needs MLflow")
