"""Exact resume, in process: a run stopped at a chosen step (Ctrl-C: a checkpoint at that step; a kill:
the work since the last checkpoint lost) and resumed ends with the weights, optimizer state, random
generators, callbacks and metrics.jsonl of the uninterrupted run, bit for bit, across schedules,
augmentation, early stopping, staged training with cached features and bf16. And the checkpoint
file itself: one atomic unit, the newest K kept, a corrupt newest one skipped for the one before."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dlkit
from dlkit.config import TrainCfg
from dlkit.engine import outcome
from dlkit.engine.resume import (
    Checkpointer,
    StopFlag,
    TrainState,
    graceful_stop,
    latest_state,
    load_state,
    pack,
    save_state,
    state_files,
    unpack,
)
from dlkit.errors import ConfigError, RunDirError, RunInterrupted


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


# digits-mlp: 1,258 training digits in batches of 20 = 63 steps an epoch; digits-cnn: 40 steps of 32
MLP = ["train.epochs=3", "train.checkpoint_every=10"]


@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_result(monkeypatch, how):
    keep_states(monkeypatch)
    full = dlkit.run("digits-mlp", out="full", overrides=MLP).run_dir
    assert_same_run(full, interrupted_and_resumed(monkeypatch, "digits-mlp", MLP, 97, how))


@pytest.mark.parametrize("schedule", [
    "{name: step, step_size: 1, gamma: 0.5}",
    "{name: cosine, warmup_epochs: 0.5}",
    "{name: onecycle, max_lr: 0.01}",
    "{name: plateau, patience: 0, factor: 0.5, monitor: val_accuracy}",
], ids=["step", "cosine", "onecycle", "plateau"])
def test_every_schedule_resumes_exactly(monkeypatch, schedule):
    keep_states(monkeypatch)
    overrides = [*MLP, f"train.schedule={schedule}"]
    full = dlkit.run("digits-mlp", out="full", overrides=overrides).run_dir
    assert_same_run(full, interrupted_and_resumed(monkeypatch, "digits-mlp", overrides, 140, "kill"))


def test_augmentation_and_dropout_draws_resume_exactly(monkeypatch):
    keep_states(monkeypatch)
    overrides = ["train.epochs=2", "train.checkpoint_every=7", "data.augment={rotation: 10, zoom: 0.1, shift: 0.1}",
                 "model.dropout=0.3"]
    full = dlkit.run("digits-cnn", out="full", overrides=overrides).run_dir
    assert_same_run(full, interrupted_and_resumed(monkeypatch, "digits-cnn", overrides, 52, "kill"))


def test_early_stopping_keeps_counting_across_a_resume(monkeypatch):
    keep_states(monkeypatch)
    overrides = ["train.epochs=12", "train.checkpoint_every=30",
                 "train.early_stopping={monitor: val_loss, patience: 2, min_delta: 0.05}"]
    full = dlkit.run("digits-mlp", out="full", overrides=overrides)
    assert full.summary["epochs_run"] < 12  # it did stop early
    stop = 63 * (full.summary["epochs_run"] - 1) + 20  # inside the last epoch, with patience partly spent
    resumed = interrupted_and_resumed(monkeypatch, "digits-mlp", overrides, stop, "kill")
    assert_same_run(full.run_dir, resumed)
    assert json.loads((resumed / "summary.json").read_text())["tested_weights"] == full.summary["tested_weights"]


STAGES = ["train.stages=[{name: head, epochs: 2, freeze: base}, {name: all, epochs: 2, freeze: none, "
          "optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}]", "train.checkpoint_every=15", "model.weights=none"]


@pytest.mark.parametrize("step, how", [(60, "kill"), (80, "ctrl-c"), (100, "kill")],
                         ids=["in-the-cached-stage", "at-the-stage-boundary", "in-the-second-stage"])
def test_a_staged_run_with_cached_features_resumes_exactly(monkeypatch, step, how):
    keep_states(monkeypatch)
    full = dlkit.run("digits-cnn", out="full", overrides=STAGES)
    assert [s["cached_features"] for s in full.summary["stages"]] == [True, False]
    resumed = interrupted_and_resumed(monkeypatch, "digits-cnn", STAGES, step, how)
    assert_same_run(full.run_dir, resumed)
    assert [s["last_epoch"] for s in json.loads((resumed / "summary.json").read_text())["stages"]] == [2, 4]


def test_bf16_resumes_exactly(monkeypatch):
    keep_states(monkeypatch)
    overrides = ["train.epochs=2", "train.checkpoint_every=10", "train.precision=bf16"]
    full = dlkit.run("digits-mlp", out="full", overrides=overrides)
    assert full.summary["precision"] == "bf16"
    assert_same_run(full.run_dir, interrupted_and_resumed(monkeypatch, "digits-mlp", overrides, 75, "kill"))


# ---- refusals: one line each -------------------------------------------------------------------------

def test_resume_refuses_what_it_cannot_continue(monkeypatch):
    done = dlkit.run("digits-mlp", out="done", overrides=["train.epochs=1"]).run_dir
    with pytest.raises(RunDirError, match=f"^{done} is finished; there is nothing to resume"):
        dlkit.resume(done)
    with pytest.raises(RunDirError, match="^run directory nowhere not found"):
        dlkit.resume("nowhere")
    # stopped before its first checkpoint
    with monkeypatch.context() as m:
        stop_at(m, 3, "kill")
        with pytest.raises(Killed):
            dlkit.run("digits-mlp", out="early", overrides=["train.epochs=1"])
    with pytest.raises(RunDirError, match="holds no resumable checkpoint .the run stopped before its first one."):
        dlkit.resume("early")


def test_a_changed_recipe_is_refused_and_force_continues_with_a_note(monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 30, "ctrl-c")
        with pytest.raises(RunInterrupted):
            dlkit.run("digits-mlp", out="cut", overrides=["train.epochs=2"])
    recipe = Path("cut/recipe.yaml")
    recipe.write_text(recipe.read_text().replace("lr: 0.001", "lr: 0.002"))
    message = ("cannot resume cut: recipe.yaml differs from the recipe the checkpoint was written with; "
               "pass --force to continue anyway")
    with pytest.raises(RunDirError, match=f"^{message}$"):
        dlkit.resume("cut")
    result = dlkit.resume("cut", force=True)
    assert "resumed with --force although recipe.yaml differs from the recipe the checkpoint was written with" in (
        result.summary["notes"])
    assert json.loads(Path("cut/status.json").read_text())["state"] == "finished"


def test_a_run_whose_process_is_alive_is_refused(monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 30, "ctrl-c")
        with pytest.raises(RunInterrupted):
            dlkit.run("digits-mlp", out="cut", overrides=["train.epochs=2"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dlkit"])
    try:
        status = json.loads(Path("cut/status.json").read_text())
        Path("cut/status.json").write_text(json.dumps(status | {"state": "running", "pid": sleeper.pid}))
        with pytest.raises(RunDirError, match=f"^cut is still running .process {sleeper.pid}.; stop it first"):
            dlkit.resume("cut")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dlkit.resume("cut").summary["epochs_run"] == 2  # a dead process's run resumes


# ---- the checkpoint file ------------------------------------------------------------------------------

def test_pack_keeps_tensors_apart_and_int_keys_ints():
    tree = {"state": {0: {"step": torch.tensor(3.0), "buf": torch.arange(4)}}, "groups": [{"lr": 0.1, "betas": [0.9, 0.99]}],
            "none": None, "inf": float("inf")}
    tensors: dict[str, torch.Tensor] = {}
    packed = pack(tree, tensors)
    json.dumps(packed)
    assert set(tensors) == {"/state/0/step", "/state/0/buf"}
    back = unpack(json.loads(json.dumps(packed)), tensors)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["buf"], torch.arange(4))
    assert back["groups"] == tree["groups"] and back["inf"] == float("inf") and back["none"] is None


def _state(value: float) -> TrainState:
    return TrainState({"w": torch.full((64,), value), "meta": {"k": 1}}, {"position": {"epoch": 1, "step": 2}})


def test_the_newest_k_are_kept_and_a_corrupt_newest_falls_back(tmp_path):
    for step in (5, 10, 15):
        save_state(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in state_files(tmp_path)] == ["state-000000010.safetensors", "state-000000015.safetensors"]
    state, notes = latest_state(tmp_path)
    assert state.tree["w"][0] == 15 and notes == []
    newest = state_files(tmp_path)[-1]
    raw = bytearray(newest.read_bytes())
    raw[-3] ^= 0x01  # one flipped bit in the tensor bytes
    newest.write_bytes(bytes(raw))
    state, notes = latest_state(tmp_path)
    assert state.tree["w"][0] == 10
    assert notes == ["checkpoint state-000000015.safetensors is corrupt (its tensors do not match their sha256); "
                     "resumed from the checkpoint before it"]
    newest.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    state, notes = latest_state(tmp_path)
    assert state.tree["w"][0] == 10 and notes[0].startswith("checkpoint state-000000015.safetensors is unreadable (")
    state_files(tmp_path)[0].write_bytes(b"")
    with pytest.raises(RunDirError, match=f"^no checkpoint in {tmp_path} reads back whole"):
        latest_state(tmp_path)


def test_a_resumed_run_says_when_it_fell_back(monkeypatch):
    keep_states(monkeypatch)
    full = dlkit.run("digits-mlp", out="full", overrides=MLP).run_dir
    with monkeypatch.context() as m:
        stop_at(m, 97, "kill")
        with pytest.raises(Killed):
            dlkit.run("digits-mlp", out="cut", overrides=MLP)
    newest = state_files(Path("cut/checkpoints"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    result = dlkit.resume("cut")
    notes = result.summary["notes"]
    assert notes[0].startswith(f"checkpoint {newest.name} is unreadable (") and notes[0].endswith(
        "; resumed from the checkpoint before it")
    # checkpoints every 10 steps, and at the end of epoch 1 (step 63): 73, 83, 93; the kill came at 97
    assert newest.name == "state-000000093.safetensors"
    assert notes[1] == "resumed from checkpoints/state-000000083.safetensors (epoch 2, step 20)"
    assert_same_run(full, Path("cut"))


def test_kills_during_checkpoint_writes_always_leave_a_whole_one(tmp_path):
    writer = tmp_path / "writer.py"
    writer.write_text(
        "import sys, torch\nfrom pathlib import Path\nfrom dlkit.engine.resume import TrainState, save_state\n"
        "step = 0\nprint('ready', flush=True)\n"
        "while True:\n    step += 1\n"
        "    save_state(Path(sys.argv[1]), step, TrainState({'w': torch.full((400_000,), float(step))}, {}), keep=2)\n")
    folder = tmp_path / "ck"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, str(writer), str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.02 + 0.3 * torch.rand(1, generator=rng).item())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state, notes = latest_state(folder)
        assert notes == [] and torch.equal(state.tree["w"], torch.full((400_000,), state.tree["w"][0].item()))
        for leftover in folder.glob("*.tmp"):  # what a kill leaves behind is a temporary, never a checkpoint
            leftover.unlink()


def test_a_second_ctrl_c_stops_at_once():
    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoint_every_is_steps_or_a_duration():
    assert TrainCfg(checkpoint_every=5).checkpoint_every == 5 and TrainCfg().checkpoint_every == "10m"
    from dlkit.recipes import load_recipe

    with pytest.raises(ConfigError, match="train.checkpoint_every.*'soon' is not a duration; use a positive number "
                                          "with s, m or h, e.g. 10m"):
        load_recipe("digits-mlp", ["train.checkpoint_every=soon"])
