"""`dlkit resume` on real processes: a `dlkit run` SIGKILLed or Ctrl-C'd mid-epoch (held at a step the
test chooses through DLKIT_HOLD_AFTER_STEP) and resumed finishes with the uninterrupted run's weights
and metrics.jsonl, bit for bit; what cannot be resumed is one error line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# digits-cnn: 40 steps an epoch; checkpoints every 7 steps, so step 52 (epoch 2, step 12) is 5 steps
# past the last checkpoint (47): a kill there loses them, a Ctrl-C writes one at 52
ARGS = ["digits-cnn", "--epochs", "2", "--no-report", "--set", "train.checkpoint_every=7"]
HOLD = 52


def dlkit(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dlkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "NO_COLOR": "1", **(env or {})}, **kwargs)


def finished(*args: str) -> subprocess.CompletedProcess:
    proc = dlkit(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = finished("run", *ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def held(out: Path) -> subprocess.Popen:
    """A `dlkit run` waiting after step HOLD, as a process stopped mid-epoch at that moment."""
    proc = dlkit("run", *ARGS, "--out", str(out), env={"DLKIT_HOLD_AFTER_STEP": str(HOLD)})
    assert proc.stderr.readline() == f"holding after step {HOLD}\n"
    return proc


def assert_same(reference: Path, resumed: Path) -> None:
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(reference) == rows(resumed) and len(rows(resumed)) == 2


def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    out = tmp_path / "cut"
    proc = held(out)
    proc.kill()
    proc.communicate()
    assert json.loads((out / "status.json").read_text())["state"] == "running"  # nobody could mark it
    done = finished("resume", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(out)
    assert_same(reference, out)
    summary = json.loads((out / "summary.json").read_text())
    assert "resumed from checkpoints/state-000000047.safetensors (epoch 2, step 7)" in summary["notes"]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert not list((out / "checkpoints").glob("state-*"))  # a finished run keeps no resume state


@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_writes_a_checkpoint_at_the_step_and_says_how_to_resume(reference, tmp_path, sig, code, what):
    out = tmp_path / "cut"
    proc = held(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    message = f"stopped in epoch 2 of 2 (step 12); kept checkpoints/state-{HOLD:09d}.safetensors"
    assert err.splitlines() == [f"{what}: stopping after this step to write a checkpoint (Ctrl-C again stops at once)",
                                f"interrupted: {message}", f"resume with: dlkit resume {out}"]
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["message"]) == ("interrupted", message)
    done = finished("resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert_same(reference, out)


def test_what_cannot_be_resumed_is_one_error_line(reference, tmp_path):
    done = finished("resume", str(reference))
    assert (done.returncode, done.stderr) == (
        2, f"error: {reference} is finished; there is nothing to resume (`dlkit run` starts a new run)\n")
    done = finished("resume", str(tmp_path / "missing"))
    assert (done.returncode, done.stderr) == (
        2, f"error: run directory {tmp_path / 'missing'} not found; pass the folder `dlkit run` printed\n")
