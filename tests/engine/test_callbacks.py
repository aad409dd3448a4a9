"""Callbacks: early stopping counts patience exactly and restores the best weights; clipping clips."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dlkit.config import OptimizerCfg, TrainCfg
from dlkit.engine import Callback, Checkpoint, EarlyStopping, FitState, GradClip, MetricsLog, fit
from dlkit.engine.checkpoint import load_weights, read_meta
from dlkit.engine.optim import metric_mode
from dlkit.engine.runtime import seed_everything
from dlkit.models import build

CPU = torch.device("cpu")


def drive(callback: Callback, values: list[float], monitor: str) -> tuple[FitState, list[int]]:
    """Feed `values` of `monitor` epoch by epoch, the weights filled with the epoch number; stops like fit."""
    state = FitState(model=nn.Linear(2, 1))
    callback.on_stage_start(state)
    ran = []
    for value in values:
        state.epoch += 1
        with torch.no_grad():
            for p in state.model.parameters():
                p.fill_(state.epoch)
        callback.on_epoch_end(state, {monitor: value})
        ran.append(state.epoch)
        if state.stop_stage:
            break
    callback.on_stage_end(state)
    return state, ran


def test_early_stopping_waits_exactly_patience_epochs_and_restores_the_best():
    state, ran = drive(EarlyStopping("val_loss", patience=3), [1.0, 0.8, 0.9, 0.85, 0.81, 0.1], "val_loss")
    assert ran == [1, 2, 3, 4, 5]  # best at 2, then 3 epochs without improvement
    assert state.stop_stage
    assert state.notes == [
        "early stopping at epoch 5: val_loss has not improved for 3 epochs (best 0.8000 at epoch 2)",
        "restored the weights of epoch 2",
    ]
    assert torch.equal(state.model.weight, torch.full((1, 2), 2.0))
    assert torch.equal(state.model.bias, torch.full((1,), 2.0))


def test_an_improvement_resets_the_wait():
    _, ran = drive(EarlyStopping("val_loss", patience=2), [1.0, 1.1, 0.9, 1.0, 0.95, 0.5], "val_loss")
    assert ran == [1, 2, 3, 4, 5]  # epoch 3 improved, so the wait started again there


def test_mode_auto_maximises_accuracy_and_minimises_loss():
    assert (metric_mode("val_accuracy"), metric_mode("train_accuracy"), metric_mode("val_roc_auc")) == ("max",) * 3
    assert (metric_mode("val_loss"), metric_mode("train_loss")) == ("min", "min")
    state, ran = drive(EarlyStopping("val_accuracy", patience=2), [0.5, 0.7, 0.6, 0.65, 0.9], "val_accuracy")
    assert ran == [1, 2, 3, 4]
    assert state.notes[0] == "early stopping at epoch 4: val_accuracy has not improved for 2 epochs (best 0.7000 at epoch 2)"
    assert torch.equal(state.model.weight, torch.full((1, 2), 2.0))
    # an explicit mode wins over the name: a falling "accuracy" improves under min
    _, ran = drive(EarlyStopping("val_accuracy", mode="min", patience=2), [0.5, 0.4, 0.3, 0.2], "val_accuracy")
    assert ran == [1, 2, 3, 4]


def test_min_delta_and_no_restore():
    # 0.99 and 0.985 are not better than 1.0 by more than 0.02
    state, ran = drive(EarlyStopping("val_loss", patience=2, min_delta=0.02, restore_best=False),
                       [1.0, 0.99, 0.985, 0.5], "val_loss")
    assert ran == [1, 2, 3]
    assert state.notes == [
        "early stopping at epoch 3: val_loss has not improved for 2 epochs (best 1.0000 at epoch 1)"]
    assert torch.equal(state.model.weight, torch.full((1, 2), 3.0))  # left at the last epoch


def test_early_stopping_in_fit_restores_the_weights_of_the_best_checkpoint(make_bundle, tmp_path):
    # random labels on both sides: validation loss only gets worse as the net memorises the train set
    data = make_bundle("multiclass", n=64, shape=(1, 8, 8), n_val=64)
    seed_everything(0)
    model = build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[64])
    cfg = TrainCfg(epochs=40, batch_size=16, optimizer=OptimizerCfg(lr=1e-2))
    history = fit(model, data, cfg, device=CPU, precision="fp32", generator=torch.Generator().manual_seed(0),
                  callbacks=[Checkpoint(tmp_path / "ck", "val_loss"), EarlyStopping("val_loss", patience=3)])
    val = [e["val_loss"] for e in history.epochs]
    best = min(range(len(val)), key=val.__getitem__) + 1
    assert len(val) == best + 3 < 40
    assert history.stages == [{"index": 0, "name": "stage 1", "first_epoch": 1, "last_epoch": best + 3,
                               "freeze": "none", "trainable_params": 4810, "frozen_params": 0,
                               "cached_features": False, "cache_seconds": 0.0}]
    assert history.notes[-1] == f"restored the weights of epoch {best}"
    assert read_meta(tmp_path / "ck" / "best.safetensors")["epoch"] == best
    saved = load_weights(build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[64]),
                         tmp_path / "ck" / "best.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


def total_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_grad_clip_scales_the_global_norm_down_and_keeps_the_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    (model(torch.randn(8, 6)).sum() * 100).backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = total_grad_norm(model)
    assert norm > 10
    GradClip(0.5).on_after_backward(model)
    assert total_grad_norm(model) <= 0.5 + 1e-6
    assert total_grad_norm(model) == pytest.approx(0.5, rel=1e-4)
    for g0, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, g0 * (0.5 / norm), rtol=1e-4, atol=1e-7)
    # a norm already below the limit is left alone
    small = [p.grad.clone() for p in model.parameters()]
    GradClip(10.0).on_after_backward(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(small, model.parameters()))


class NormSpy(Callback):
    """Records the global gradient norm each time backward has run (and earlier callbacks with it)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_after_backward(self, model: nn.Module) -> None:
        self.norms.append(total_grad_norm(model))


def test_fit_calls_grad_clip_before_every_optimizer_step(make_bundle):
    data = make_bundle("multiclass", n=32, shape=(1, 8, 8))
    cfg = TrainCfg(epochs=2, batch_size=8, optimizer=OptimizerCfg(name="sgd", lr=0.1))
    norms = {}
    for clip in (None, 0.05):
        spy = NormSpy()
        seed_everything(0)
        model = build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16])
        callbacks = [spy] if clip is None else [GradClip(clip), spy]
        fit(model, data, cfg, device=CPU, precision="fp32", generator=torch.Generator().manual_seed(0),
            callbacks=callbacks)
        norms[clip] = spy.norms
    assert len(norms[None]) == len(norms[0.05]) == 8  # 4 steps x 2 epochs
    assert min(norms[None]) > 0.05  # unclipped, every step is above the limit...
    assert max(norms[0.05]) <= 0.05 + 1e-6  # ...and clipped, none is


def test_metrics_log_appends_one_json_line_per_epoch(make_bundle, tmp_path):
    data = make_bundle("binary", n=16, shape=(4,), n_val=8)
    seed_everything(0)
    model = build("mlp", num_classes=1, input_shape=(4,), hidden=[4])
    log = tmp_path / "metrics.jsonl"
    history = fit(model, data, TrainCfg(epochs=3, batch_size=8), device=CPU, precision="fp32",
                  generator=torch.Generator().manual_seed(0), callbacks=[MetricsLog(log)])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == history.epochs
    assert [line["epoch"] for line in lines] == [1, 2, 3]
