"""A tracked `dlkit tune`: one MLflow parent run per study in the local SQLite store, every trial's run nested
under it, the best trial and the study's files on the parent, the same parent continued by a second command
and shared by processes that race to open it; Ctrl-C ends it KILLED."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

import dlkit
from dlkit.space import shown
from dlkit.tune import tune
from dlkit.tune.settings import resolve
from dlkit.tune.study import open_study
from dlkit.tune.tracking import ATTR, StudyRun, claim

COMMON = {"epochs": 1, "pruner": "none", "study": "s", "track": "mlflow",
          "space": ["train.optimizer.lr=loguniform(1e-4, 1e-2)"]}


def store() -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{Path('runs/mlflow.db').resolve()}")


def runs_of(client: MlflowClient, experiment: str = "digits-mlp") -> list:
    found = client.get_experiment_by_name(experiment)
    return list(client.search_runs([found.experiment_id], max_results=1000))


def stored_study(name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path('runs', name, 'study.db').resolve()}")


def test_a_study_is_one_parent_run_with_its_trials_nested_and_a_second_command_continues_it():
    first = tune("digits-mlp", trials=2, **COMMON)
    client = store()
    runs = runs_of(client)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    tags, pid = parent.data.tags, parent.info.run_id
    assert (parent.info.run_name, parent.info.status) == ("s", "FINISHED")
    assert {k: tags[k] for k in ("dlkit.version", "dlkit.recipe", "dlkit.study", "dlkit.direction", "dlkit.metric",
                                 "dlkit.pruner", "dlkit.writeup", "dlkit.status", "dlkit.budget")} == {
        "dlkit.version": dlkit.__version__, "dlkit.recipe": "digits-mlp", "dlkit.study": "s",
        "dlkit.direction": "maximize", "dlkit.metric": "val_accuracy", "dlkit.pruner": "none",
        "dlkit.writeup": "S2.3", "dlkit.status": "finished", "dlkit.budget": "2"}
    assert tags["dlkit.sampler"] == "TPE seeded by seed 0 and the trial's number, 3 random trials first"
    # the recipe's own space with --space's lr range: the params say what was searched
    assert parent.data.params == {"space.train.optimizer.lr": "loguniform(0.0001, 0.01)",
                                  "space.train.batch_size": "choice(20, 32, 64, 128)",
                                  "space.model.dropout": "uniform(0.0, 0.5)"}
    study = stored_study()
    assert study.user_attrs[ATTR] == {"tracking_uri": client.tracking_uri, "experiment_id": parent.info.experiment_id,
                                      "run_id": pid}
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid),
                      key=lambda r: int(r.data.tags["dlkit.trial"]))
    assert len(runs) == 3 and [r.info.run_name for r in children] == ["trial-0", "trial-1"]
    for child, trial in zip(children, sorted(study.trials, key=lambda t: t.number)):
        assert child.info.status == "FINISHED" and child.data.tags["dlkit.study"] == "s"
        assert child.data.params["train.optimizer.lr"] == repr(trial.params["train.optimizer.lr"])
        assert child.data.params["train.batch_size"] == str(trial.params["train.batch_size"])
        assert child.data.metrics["val_accuracy"] == trial.value
    best = study.best_trial
    assert first.best["trial"] == best.number
    assert parent.data.metrics == {"best_val_accuracy": best.value, "best_trial": best.number}
    assert {k: v for k, v in tags.items() if k.startswith("best.")} == {
        "best.train.optimizer.lr": shown(best.params["train.optimizer.lr"]),
        "best.train.batch_size": shown(int(best.params["train.batch_size"])),
        "best.model.dropout": shown(best.params["model.dropout"])}
    assert sorted(a.path for a in client.list_artifacts(pid)) == ["best.yaml", "study.html", "study.json"]

    more = tune("digits-mlp", trials=4, **COMMON)  # the same study, two trials more: the same parent
    assert more.ran == [2, 3]
    runs = runs_of(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [pid] and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["dlkit.trial"]) for r in runs if r.data.tags.get("mlflow.parentRunId") == pid) == [
        0, 1, 2, 3]
    study = stored_study()
    assert parents[0].data.tags["dlkit.budget"] == "4"
    assert client.get_metric_history(pid, "best_val_accuracy")[-1].value == study.best_value
    assert [m.step for m in client.get_metric_history(pid, "best_val_accuracy")] == [2, 4]


def test_processes_that_open_the_parent_at_once_share_one(tmp_path):
    # what two `dlkit tune` commands on one storage do at their start, at the same moment: each creates a run,
    # one claims the study, the other deletes its own and takes that one
    settings = resolve("digits-mlp", epochs=1, study="race", fields={"track.backend": "mlflow"})
    settings.folder.mkdir(parents=True)
    study = open_study(settings, 2)
    barrier = threading.Barrier(2)
    openers: list[StudyRun] = []

    def start() -> None:
        barrier.wait()
        openers.append(StudyRun(study, settings, 2))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {o.parent_id() for o in openers}
    assert len(ids) == 1 and None not in ids and all(o.failure is None for o in openers)
    active = [r.info.run_id for r in runs_of(store())]
    assert active == list(ids)  # the loser's run is deleted
    assert claim(settings, ATTR, {"run_id": "another"})["run_id"] == ids.pop()  # claimed once: a later claim reads it


def test_ctrl_c_ends_the_parent_killed_and_the_stopped_trial_cannot_be_resumed(tmp_path, run_cli, resume_check):
    env = {**os.environ, "NO_COLOR": "1", "DLKIT_HOLD_AFTER_STEP": "5", "PYTHONPATH": str(Path(dlkit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "dlkit", "tune", "digits-mlp", "--trials", "2", "--epochs", "2",
                             "--track", "mlflow"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    resume_check.wait_until_held(proc, 5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "warning" not in err
    runs = runs_of(store())
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (parent.info.status, parent.data.tags["dlkit.status"]) == ("KILLED", "interrupted")
    assert parent.data.tags["dlkit.error"] == err.splitlines()[-1].removeprefix("interrupted: ")
    assert (child.info.status, child.info.run_name, child.data.tags["dlkit.trial"]) == ("KILLED", "trial-0", "0")
    trial = tmp_path / "runs" / "digits-mlp" / "trial-0"
    assert not (trial / "checkpoints").exists()  # a trial is never resumed: its checkpoints are gone

    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*")}
    code, out, err = run_cli("resume", "runs/digits-mlp/trial-0")
    assert (code, out) == (2, "")
    assert err == ("error: runs/digits-mlp/trial-0 is a trial of study 'digits-mlp', which a resumed run would not "
                   "count; run `dlkit tune` again with the same options to continue the study (a new trial takes this "
                   "one's place)\n")
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*")} == before


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the local store beside the runs
