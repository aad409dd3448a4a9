"""Checks for exact resume, shared by the engine, text and transfer tests (loaded by path through the
`resume_check` fixture: tests run under --import-mode=importlib)."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dlkit
from dlkit.engine import outcome
from dlkit.engine.resume import Checkpointer, StopFlag, load_state, state_files
from dlkit.errors import RunInterrupted


class Killed(BaseException):
    """Stands for SIGKILL in process: nothing after it runs, no checkpoint is written for it."""


def stop_at(monkeypatch, step: int, how: str) -> None:
    """Make training stop after global step `step`: as Ctrl-C does (`ctrl-c`: a checkpoint at that step,
    then stop) or as a kill does (`kill`: stop at once; the steps since the last checkpoint are lost)."""
    def hold(self: Checkpointer, global_step: int, stop: StopFlag) -> None:
        if global_step != step:
            return
        if how == "kill":
            raise Killed()
        stop.signum = signal.SIGINT

    monkeypatch.setattr(Checkpointer, "hold", hold)


def wait_until_held(proc: subprocess.Popen, step: int) -> list[str]:
    """What a `dlkit` process started with DLKIT_HOLD_AFTER_STEP=step printed to stderr (text mode) up to
    the line saying it holds there; it ending first fails with what it printed."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"holding after step {step}"):
            return seen
    raise AssertionError("".join(seen))


def keep_states(monkeypatch) -> None:
    """Keep the resumable checkpoints of finished runs, to compare their optimizer and generator states."""
    monkeypatch.setattr(outcome, "state_files", lambda directory: [])


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock `seconds` of each epoch (it differs between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_tree(a, b, at: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), at
    elif isinstance(a, dict):
        assert set(a) == set(b), at
        for k in a:
            if k != "seconds":
                assert_same_tree(a[k], b[k], f"{at}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), at
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{at}/{i}")
    else:
        assert a == b, (at, a, b)


def assert_same_run(full: Path, resumed: Path) -> None:
    """Final weights, metrics, and the last checkpoint's optimizer, schedule, generators and callbacks."""
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(full) == metrics(resumed)
    last_a, last_b = (load_state(state_files(r / "checkpoints")[-1]) for r in (full, resumed))
    assert_same_tree(last_a.tree, last_b.tree)
    assert last_a.meta["position"] == last_b.meta["position"]


def interrupted_and_resumed(monkeypatch, recipe: str, overrides: list[str], step: int, how: str) -> Path:
    """Run `recipe` stopped after `step`, then resume it; the resumed run's folder."""
    with monkeypatch.context() as m:
        stop_at(m, step, how)
        with pytest.raises(Killed if how == "kill" else RunInterrupted):
            dlkit.run(recipe, out="cut", overrides=overrides)
    status = json.loads(Path("cut/status.json").read_text())
    assert status["state"] == ("failed" if how == "kill" else "interrupted")
    assert not Path("cut/model.safetensors").exists()
    result = dlkit.resume("cut")
    assert any(n.startswith("resumed from checkpoints/state-") for n in result.summary["notes"])
    return Path("cut")


def same_after_resume(monkeypatch, recipe: str, overrides: list[str], step: int, how: str):
    """Run `recipe` uninterrupted into `full`, then stopped after `step` and resumed into `cut`; assert
    that both end the same. Returns the uninterrupted run's result."""
    keep_states(monkeypatch)
    full = dlkit.run(recipe, out="full", overrides=overrides)
    assert_same_run(full.run_dir, interrupted_and_resumed(monkeypatch, recipe, overrides, step, how))
    return full
