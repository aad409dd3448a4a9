"""Tracking to a real MLflow tracking server (`dlkit ui` on a free loopback port, one per session): what a run
sends over HTTP, KILLED on SIGTERM, a server that is down, refuses or hangs, `dlkit track sync` afterwards,
`--seeds` with `compare --experiment`, and `mlflow models serve` answering as `dlkit predict`."""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import dlkit
from dlkit.predict import Predictor
from dlkit.rundir import RunDir
from dlkit.track import content

TRACK = {"track.backend": "mlflow"}


def tracking(run_dir: Path) -> dict:
    return json.loads((run_dir / "tracking.json").read_text())


def dlkit_process(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory) -> Path:
    """digits-mlp, 2 epochs, tracked on the server through MLFLOW_TRACKING_URI, registered as `digits-mlp`."""
    out = tmp_path_factory.mktemp("served") / "mlp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        return dlkit.run("digits-mlp", epochs=2, out=out, report=True,
                         fields=TRACK | {"track.registered_model": "digits-mlp"}).run_dir


def test_a_run_sends_params_metrics_tags_and_files_to_the_server(tools, served, mlflow_server):
    state = tracking(served)
    assert state["tracking_uri"] == mlflow_server
    run = tools.client(mlflow_server).get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded through the server
    assert run.data.params == content.flatten_params(RunDir(served).recipe().model_dump(mode="json",
                                                                                       exclude_none=True))
    epochs = [json.loads(line) for line in (served / "metrics.jsonl").read_text().splitlines()]
    assert tools.history(mlflow_server, state["run_id"], "val_loss") == [(e["epoch"], e["val_loss"]) for e in epochs]
    summary = json.loads((served / "summary.json").read_text())
    assert run.data.metrics["test_accuracy"] == summary["test_accuracy"]
    assert run.data.metrics["test_f1"] == summary["test_f1"]
    assert run.data.tags["dlkit.writeup"] == "S2.3" and run.data.tags["dlkit.status"] == "finished"
    assert tools.artifact_paths(mlflow_server, state["run_id"]) == sorted(content.artifact_files(RunDir(served)))
    version = tools.client(mlflow_server).get_model_version("digits-mlp", state["sent"]["registered"])
    assert version.run_id == state["run_id"]


def test_the_uis_run_page_query_answers(served, mlflow_server):
    """MLflow's UI draws a run's page from /graphql (graphene, which needs graphql-core 3.2: pinned)."""
    import httpx

    run_id = tracking(served)["run_id"]
    query = "query GetRun($id: String) { mlflowGetRun(input: {runId: $id}) { run { info { runId status } } } }"
    r = httpx.post(f"{mlflow_server}/graphql", json={"query": query, "variables": {"id": run_id}}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"data": {"mlflowGetRun": {"run": {"info": {"runId": run_id, "status": "FINISHED"}}}},
                        "errors": None}


def test_mlflow_models_serve_answers_as_dlkit_predict(tools, served, mlflow_server, digit_files, tmp_path):
    port = tools.free_port()
    log = tmp_path / "models-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/digits-mlp/1",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=tools.env(MLFLOW_TRACKING_URI=mlflow_server))
    try:
        base = f"http://127.0.0.1:{port}"
        tools.wait_until_ready(f"{base}/ping", proc, log)
        images = [base64.b64encode(p.read_bytes()).decode() for p in digit_files]
        answer = httpx.post(f"{base}/invocations", json={"inputs": images}, timeout=60)
        assert answer.status_code == 200, answer.text
        expected = [{k: v for k, v in r.items() if k != "input"}
                    for r in Predictor.from_run(served).predict([str(p) for p in digit_files])]
        assert answer.json() == {"predictions": expected}
        bad = httpx.post(f"{base}/invocations", json={"inputs": ["not base64!"]}, timeout=60)
        assert bad.status_code == 400 and "inputs[0]: not valid base64" in bad.json()["message"]
    finally:
        tools.stop(proc, log)


def test_sigterm_ends_the_mlflow_run_killed_with_the_runs_message(tools, mlflow_server, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dlkit", "run", "digits-cnn", "--epochs", "300", "--out", str(out),
                             "--no-report", "--track", "mlflow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=tools.env(MLFLOW_TRACKING_URI=mlflow_server))
    for line in proc.stdout:
        if line.startswith("epoch 2/300"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    status = json.loads((out / "status.json").read_text())
    assert err.splitlines() == ["SIGTERM: stopping after this step to write a checkpoint (Ctrl-C again stops at once)",
                                f"interrupted: {status['message']}", f"resume with: dlkit resume {out}"]
    state = tracking(out)
    run = tools.client(mlflow_server).get_run(state["run_id"])
    assert run.info.status == "KILLED"
    assert (run.data.tags["dlkit.status"], run.data.tags["dlkit.error"]) == ("interrupted", status["message"])
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in tools.history(mlflow_server, state["run_id"], "train_loss")] == epochs
    assert state["sent"]["epochs"] == epochs[-1] >= 2


@pytest.mark.parametrize("mode", ["down", "refuse", "hang"])
def test_a_server_that_is_down_refuses_or_hangs_costs_one_warning_and_sync_sends_the_run_later(
        tools, gate, mode, tmp_path, monkeypatch, capsys, run_cli):
    gate.set(mode)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gate.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")  # the user's own settings win over dlkit's
    out = tmp_path / "run"
    started = time.monotonic()
    result = dlkit.run("digits-mlp", epochs=2, out=out, fields=TRACK)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"warning: MLflow tracking at {gate.url} stopped (") and err.endswith(
        f"the run goes on, and `dlkit track sync {out}` sends what was not sent\n")
    assert RunDir(out).status()["state"] == "finished" and result.summary["epochs_run"] == 2
    assert took < 60, took
    state = tracking(out)
    assert state["run_id"] is None and state["sent"]["start"] is False and state["sent"]["files"] == {}

    gate.set("open")
    code, stdout, stderr = run_cli("track", "sync", out)
    assert (code, stderr) == (0, "")
    state = tracking(out)
    assert json.loads(stdout) == {"tracking_uri": gate.url, "experiment": "digits-mlp", "run_id": state["run_id"],
                                  "status": "FINISHED", "epochs": 2, "files": len(content.artifact_files(RunDir(out))),
                                  "model": state["sent"]["model"], "registered_version": None}
    run = tools.client(gate.url).get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [s for s, _ in tools.history(gate.url, state["run_id"], "val_accuracy")] == [1, 2]
    assert run.data.metrics["test_accuracy"] == result.summary["test_accuracy"]
    code, stdout, _ = run_cli("track", "sync", out)  # nothing left to send: nothing sent twice
    assert code == 0 and json.loads(stdout)["run_id"] == state["run_id"]
    assert [s for s, _ in tools.history(gate.url, state["run_id"], "val_accuracy")] == [1, 2]


def test_seeds_are_tagged_together_and_compare_reads_them_from_the_experiment(tools, mlflow_server, tmp_path):
    env = tools.env(MLFLOW_TRACKING_URI=mlflow_server)
    out = tmp_path / "seeds"
    done = dlkit_process("run", "digits-mlp", "--seeds", "2", "--epochs", "1", "--quiet", "--track", "mlflow",
                         "--set", "track.experiment=seeded", "--out", out, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    runs = [out / "seed-0", out / "seed-1"]
    states = [tracking(r) for r in runs]
    mlflow_runs = [tools.client(mlflow_server).get_run(s["run_id"]) for s in states]
    groups = {r.data.tags["dlkit.group"] for r in mlflow_runs}
    assert len(groups) == 1 and groups.pop().startswith("digits-mlp-seeds-0-1-")
    assert [r.data.tags["dlkit.seed"] for r in mlflow_runs] == ["0", "1"]
    by_dirs = dlkit_process("compare", *runs, cwd=tmp_path, env=env)
    by_experiment = dlkit_process("compare", "--experiment", "seeded", cwd=tmp_path, env=env)
    assert by_experiment.returncode == 0, by_experiment.stderr
    assert by_experiment.stdout == by_dirs.stdout
    assert "| digits-mlp | 2 |" in by_experiment.stdout
