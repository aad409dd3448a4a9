"""dlkit tune as users run it, in processes: two commands (one with a --jobs helper) sharing one SQLite study,
as on two machines, and Ctrl-C in the middle of a trial, then the same command continuing the study."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna

from dlkit.rundir import RunDir
from dlkit.tune import tune
from dlkit.tune.trials import counted


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m dlkit ARGS` in `cwd`, its output piped."""
    return subprocess.Popen([sys.executable, "-m", "dlkit", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1", **(env or {})})


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"dlkit tune did not finish in {timeout} s\n{out}\n{err}") from None
    return proc.returncode, out, err


def trial_numbers(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("trial-")) for p in folder.glob("trial-*"))


def table_trials(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\| (\d+)(?: \(as given\))? \|", stdout, re.MULTILINE)]


def test_two_commands_on_one_storage_share_the_budget_and_never_run_a_trial_twice(tmp_path):
    # two "machines": folders of their own, one storage; the first also runs a helper process (--jobs 2)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ("tune", "digits-mlp", "--trials", "6", "--epochs", "2", "--storage", url, "--study", "shared")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    procs = [start(*args, "--jobs", "2", cwd=first), start(*args, cwd=second)]
    outputs = [finish(p) for p in procs]
    for code, out, err in outputs:
        assert code == 0, err
        assert "Traceback" not in err and out.splitlines()[-1] == "runs/shared"
    here, there = trial_numbers(first / "runs" / "shared"), trial_numbers(second / "runs" / "shared")
    print(f"\nfirst command (and its helper) ran trials {here}, the second {there}")
    assert here and there and not set(here) & set(there)
    assert sorted(here + there) == list(range(6))
    study = optuna.load_study(study_name="shared", storage=url)
    taken = sorted(t.number for t in study.trials if counted(t))
    assert taken == list(range(6))
    for trial in study.trials:
        if trial.number < 6:
            assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            owner = first if trial.number in here else second
            assert trial.user_attrs["run_dir"] == f"runs/shared/trial-{trial.number}"
            RunDir.open(owner / trial.user_attrs["run_dir"])  # finished there, and only there
        else:  # taken by two processes at once beyond the budget: dropped before it ran
            assert trial.user_attrs.get("surplus") and trial.state == optuna.trial.TrialState.FAIL
    for _, out, _ in outputs:
        assert table_trials(out) == list(range(6))


def test_ctrl_c_stops_cleanly_after_saving_the_study_and_the_same_command_continues(tmp_path, resume_check):
    # the run holds after its 5th optimizer step (dlkit's test hook) until the signal comes
    proc = start("tune", "digits-mlp", "--trials", "2", "--epochs", "2", cwd=tmp_path,
                 env={"DLKIT_HOLD_AFTER_STEP": "5"})
    resume_check.wait_until_held(proc, 5)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, 120)
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == ("interrupted: study 'digits-mlp' stopped with 0 of 2 trials finished; the trial under "
                                    "way does not count, and the same command continues the study (runs/digits-mlp)")
    trial = RunDir(tmp_path / "runs" / "digits-mlp" / "trial-0")
    assert trial.status()["state"] == "interrupted"
    assert trial.status()["message"] == ("trial 0 of study 'digits-mlp', stopped by Ctrl-C or SIGTERM: the study does "
                                         "not count it, and `dlkit tune` with the same options runs another trial in "
                                         "its place")
    # a trial is never resumed: its folder stays as a record, without the checkpoints `dlkit resume` would suggest
    assert not trial.checkpoints.exists() and len(trial.history()) == 0
    assert (tmp_path / "runs" / "digits-mlp" / "trial-0" / "recipe.yaml").is_file()
    study = optuna.load_study(study_name="digits-mlp",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'digits-mlp' / 'study.db'}")
    (stopped,) = study.trials
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    # the same command again (here as the function it calls) runs two trials in the place of the stopped one
    result = tune("digits-mlp", trials=2, epochs=2)
    assert result.ran == [1, 2]
    assert [(r["trial"], r["state"]) for r in result.rows] == [(0, "interrupted"), (1, "complete"), (2, "complete")]
