"""Stages: unset fields come from the train section; each stage runs with its own optimizer."""
from __future__ import annotations

import torch

from dlkit.config import OptimizerCfg, ScheduleCfg, StageCfg, TrainCfg
from dlkit.engine import Callback, FitState, fit
from dlkit.engine.loop import resolve_stages
from dlkit.engine.runtime import seed_everything
from dlkit.models import build

CPU = torch.device("cpu")


def train(data, cfg: TrainCfg, callbacks=()):
    """Seed, build a small mlp for `data`, fit it; returns the history."""
    generator = seed_everything(0)
    net = build("mlp", num_classes=data.num_outputs, input_shape=data.input_shape, hidden=[8])
    return fit(net, data, cfg, device=CPU, precision="fp32", generator=generator, callbacks=callbacks)


def test_resolve_stages_fills_unset_fields_from_the_train_section():
    cfg = TrainCfg(epochs=4, optimizer=OptimizerCfg(name="adamw", lr=3e-3), schedule=ScheduleCfg(name="step"),
                   stages=[StageCfg(name="head", epochs=1),
                           StageCfg(optimizer=OptimizerCfg(name="sgd", lr=0.05), schedule=ScheduleCfg(name="cosine"))])
    head, second = resolve_stages(cfg)
    assert (head.name, head.epochs, head.optimizer, head.schedule) == ("head", 1, cfg.optimizer, cfg.schedule)
    assert (second.name, second.epochs) == ("stage 2", 4)
    assert (second.optimizer.name, second.optimizer.lr, second.schedule.name) == ("sgd", 0.05, "cosine")
    (only,) = resolve_stages(TrainCfg(epochs=7))
    assert (only.name, only.epochs, only.optimizer.name, only.schedule.name) == ("stage 1", 7, "adam", "constant")


def test_fit_runs_stages_in_order_with_their_own_optimizer(make_bundle):
    data = make_bundle("multiclass", n=32, shape=(1, 8, 8), n_val=16)
    cfg = TrainCfg(epochs=3, batch_size=16, optimizer=OptimizerCfg(lr=1e-3),
                   stages=[StageCfg(name="warm", epochs=2), StageCfg(optimizer=OptimizerCfg(name="sgd", lr=0.05))])
    history = train(data, cfg)
    assert [{k: s[k] for k in ("index", "name", "first_epoch", "last_epoch")} for s in history.stages] == [
        {"index": 0, "name": "warm", "first_epoch": 1, "last_epoch": 2},
        {"index": 1, "name": "stage 2", "first_epoch": 3, "last_epoch": 5},
    ]
    assert [(e["epoch"], e["stage"], e["lr"]) for e in history.epochs] == [
        (1, 0, 1e-3), (2, 0, 1e-3), (3, 1, 0.05), (4, 1, 0.05), (5, 1, 0.05)]
    assert set(history.epochs[0]) == {"epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                      "lr", "seconds"}


def test_stop_stage_ends_only_the_current_stage(make_bundle):
    data = make_bundle("multiclass", n=16, shape=(1, 8, 8))

    class StopAfterOne(Callback):
        def __init__(self):
            self.starts: list[int] = []

        def on_stage_start(self, state: FitState) -> None:
            self.starts.append(state.epoch)

        def on_epoch_end(self, state: FitState, metrics) -> None:
            state.stop_stage = True

    stopper = StopAfterOne()
    cfg = TrainCfg(epochs=5, stages=[StageCfg(name="a"), StageCfg(name="b")])
    history = train(data, cfg, callbacks=[stopper])
    assert [(s["first_epoch"], s["last_epoch"]) for s in history.stages] == [(1, 1), (2, 2)]
    assert stopper.starts == [0, 1]




def test_stop_run_ends_the_whole_fit_after_that_epoch(make_bundle):
    data = make_bundle("multiclass", n=16, shape=(1, 8, 8))

    class StopAtEpoch(Callback):
        def __init__(self, epoch: int):
            self.epoch, self.ends = epoch, []

        def on_epoch_end(self, state: FitState, metrics) -> None:
            state.stop_run = state.epoch == self.epoch

        def on_stage_end(self, state: FitState) -> None:
            self.ends.append(state.epoch)

    stopper = StopAtEpoch(4)
    history = train(data, TrainCfg(epochs=3, stages=[StageCfg(name="a"), StageCfg(name="b"), StageCfg(name="c")]),
                    callbacks=[stopper])
    # stage b ends after its first epoch (4) and stage c never starts
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert [(s["name"], s["first_epoch"], s["last_epoch"]) for s in history.stages] == [("a", 1, 3), ("b", 4, 4)]
    assert stopper.ends == [3, 4]
