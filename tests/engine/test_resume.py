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

import dlkit
from dlkit.config import TrainCfg
from dlkit.engine.resume import (
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

# digits-mlp: 1,258 training digits in batches of 20 = 63 steps an epoch; digits-cnn: 40 steps of 32
MLP = ["train.epochs=3", "train.checkpoint_every=10"]


@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_result(resume_check, monkeypatch, how):
    resume_check.same_after_resume(monkeypatch, "digits-mlp", MLP, 97, how)


@pytest.mark.parametrize("schedule", [
    "{name: step, step_size: 1, gamma: 0.5}",
    "{name: cosine, warmup_epochs: 0.5}",
    "{name: onecycle, max_lr: 0.01}",
    "{name: plateau, patience: 0, factor: 0.5, monitor: val_accuracy}",
], ids=["step", "cosine", "onecycle", "plateau"])
def test_every_schedule_resumes_exactly(resume_check, monkeypatch, schedule):
    resume_check.same_after_resume(monkeypatch, "digits-mlp", [*MLP, f"train.schedule={schedule}"], 140, "kill")


def test_augmentation_and_dropout_draws_resume_exactly(resume_check, monkeypatch):
    overrides = ["train.epochs=2", "train.checkpoint_every=7", "data.augment={rotation: 10, zoom: 0.1, shift: 0.1}",
                 "model.dropout=0.3"]
    resume_check.same_after_resume(monkeypatch, "digits-cnn", overrides, 52, "kill")


def test_early_stopping_keeps_counting_across_a_resume(resume_check, monkeypatch):
    overrides = ["train.epochs=12", "train.checkpoint_every=30",
                 "train.early_stopping={monitor: val_loss, patience: 2, min_delta: 0.05}"]
    # stopped inside epoch 7, one epoch of patience spent (the uninterrupted run stops early, after 7)
    full = resume_check.same_after_resume(monkeypatch, "digits-mlp", overrides, 63 * 6 + 20, "kill")
    assert full.summary["epochs_run"] == 7
    assert json.loads(Path("cut/summary.json").read_text())["tested_weights"] == full.summary["tested_weights"]


STAGES = ["train.stages=[{name: head, epochs: 2, freeze: base}, {name: all, epochs: 2, freeze: none, "
          "optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}]", "train.checkpoint_every=15", "model.weights=none"]


@pytest.mark.parametrize("step, how", [(60, "kill"), (80, "ctrl-c"), (100, "kill")],
                         ids=["in-the-cached-stage", "at-the-stage-boundary", "in-the-second-stage"])
def test_a_staged_run_with_cached_features_resumes_exactly(resume_check, monkeypatch, step, how):
    full = resume_check.same_after_resume(monkeypatch, "digits-cnn", STAGES, step, how)
    assert [s["cached_features"] for s in full.summary["stages"]] == [True, False]
    assert [s["last_epoch"] for s in json.loads(Path("cut/summary.json").read_text())["stages"]] == [2, 4]


def test_bf16_resumes_exactly(resume_check, monkeypatch):
    overrides = ["train.epochs=2", "train.checkpoint_every=10", "train.precision=bf16"]
    full = resume_check.same_after_resume(monkeypatch, "digits-mlp", overrides, 75, "kill")
    assert full.summary["precision"] == "bf16"


# ---- refusals: one line each -------------------------------------------------------------------------

def test_resume_refuses_what_it_cannot_continue(resume_check, monkeypatch):
    done = dlkit.run("digits-mlp", out="done", overrides=["train.epochs=1"]).run_dir
    with pytest.raises(RunDirError, match=f"^{done} is finished; there is nothing to resume"):
        dlkit.resume(done)
    with pytest.raises(RunDirError, match="^run directory nowhere not found"):
        dlkit.resume("nowhere")
    # stopped before its first checkpoint
    with monkeypatch.context() as m:
        resume_check.stop_at(m, 3, "kill")
        with pytest.raises(resume_check.Killed):
            dlkit.run("digits-mlp", out="early", overrides=["train.epochs=1"])
    with pytest.raises(RunDirError, match="holds no resumable checkpoint .the run stopped before its first one."):
        dlkit.resume("early")


def test_a_changed_recipe_is_refused_and_force_continues_with_a_note(resume_check, monkeypatch):
    with monkeypatch.context() as m:
        resume_check.stop_at(m, 30, "ctrl-c")
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


def test_a_run_whose_process_is_alive_is_refused(resume_check, monkeypatch):
    with monkeypatch.context() as m:
        resume_check.stop_at(m, 30, "ctrl-c")
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


def test_a_resumed_run_says_when_it_fell_back(resume_check, monkeypatch):
    resume_check.keep_states(monkeypatch)
    full = dlkit.run("digits-mlp", out="full", overrides=MLP).run_dir
    with monkeypatch.context() as m:
        resume_check.stop_at(m, 97, "kill")
        with pytest.raises(resume_check.Killed):
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
    resume_check.assert_same_run(full, Path("cut"))


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


def test_changed_data_or_library_versions_are_refused(resume_check, monkeypatch):
    rows = ["a,b,c,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2},{'yes' if i % 3 else 'no'}" for i in range(120)]
    Path("table.csv").write_text("\n".join(rows) + "\n")
    fields = {"data.path": "table.csv"}
    with monkeypatch.context() as m:
        resume_check.stop_at(m, 5, "ctrl-c")
        with pytest.raises(RunInterrupted):
            dlkit.run("breast-cancer-lstm", out="cut", fields={"data.name": "csv_table", **fields},
                      overrides=["train.epochs=3", "train.batch_size=8"])
    Path("table.csv").write_text("\n".join(rows[:-1] + ["6,4,1,no"]) + "\n")
    with pytest.raises(RunDirError, match="^cannot resume cut: the data differ from the data the checkpoint was "
                                          r"trained on \(fingerprint [0-9a-f]{12} here, [0-9a-f]{12} in the checkpoint\); "
                                          "pass --force to continue anyway$"):
        dlkit.resume("cut")
    Path("table.csv").write_text("\n".join(rows) + "\n")
    newest = state_files(Path("cut/checkpoints"))[-1]
    state = load_state(newest)
    state.meta["versions"]["torch"] = "2.12.0"
    save_state(newest.parent, int(newest.stem.split("-")[1]), state, keep=2)
    with pytest.raises(RunDirError) as refused:
        dlkit.resume("cut")
    assert str(refused.value) == (f"cannot resume cut: torch is {torch.__version__} here but 2.12.0 in the checkpoint; "
                                  "pass --force to continue anyway")
    assert "resumed with --force although torch is" in " ".join(dlkit.resume("cut", force=True).summary["notes"])
