"""Optimizers carry the recipe's hyper-parameters; each schedule produces the learning rates it promises."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlkit.config import OptimizerCfg, ScheduleCfg, TrainCfg
from dlkit.engine import fit
from dlkit.engine.optim import Schedule, build_optimizer
from dlkit.engine.runtime import seed_everything
from dlkit.models import build

CPU = torch.device("cpu")
BASE = 1e-2


def epoch_lrs(make_bundle, schedule: ScheduleCfg, epochs: int, lr: float = BASE) -> list[float]:
    """The learning rate at the start of each epoch of a real fit (32 rows, batch 8: 4 steps an epoch)."""
    data = make_bundle("multiclass", n=32, shape=(1, 4, 4), classes=3)
    seed_everything(0)
    model = build("mlp", num_classes=3, input_shape=(1, 4, 4), hidden=[4])
    cfg = TrainCfg(epochs=epochs, batch_size=8, optimizer=OptimizerCfg(name="sgd", lr=lr), schedule=schedule)
    history = fit(model, data, cfg, device=CPU, precision="fp32", generator=torch.Generator().manual_seed(0))
    return [e["lr"] for e in history.epochs]


def batch_lrs(schedule: ScheduleCfg, epochs: int, steps: int, lr: float = BASE) -> tuple[list[float], float]:
    """The learning rate of every step of `epochs` x `steps`, and the one left after the last step."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = Schedule(optimizer, schedule, epochs, steps)
    seen = []
    for _ in range(epochs * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.on_batch()
    return seen, optimizer.param_groups[0]["lr"]


def test_constant(make_bundle):
    assert epoch_lrs(make_bundle, ScheduleCfg(), 3) == [BASE] * 3


def test_step_halves_every_two_epochs(make_bundle):
    got = epoch_lrs(make_bundle, ScheduleCfg(name="step", step_size=2, gamma=0.5), 6)
    assert got == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3], rel=1e-12)
    # a per-epoch schedule ignores batches
    seen, _ = batch_lrs(ScheduleCfg(name="step", step_size=1, gamma=0.5), 2, 4)
    assert seen == [BASE] * 8


def test_multistep_decays_at_its_milestones(make_bundle):
    got = epoch_lrs(make_bundle, ScheduleCfg(name="multistep", milestones=[2, 5], gamma=0.1), 6)
    assert got == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-4], rel=1e-12)


def cosine_lr(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return BASE * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (BASE - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_warms_up_linearly_then_decays_to_min_lr(make_bundle):
    cfg = ScheduleCfg(name="cosine", warmup_epochs=1, min_lr=1e-4)
    seen, after = batch_lrs(cfg, epochs=5, steps=4)
    assert seen[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2], rel=1e-12)  # one epoch of linear warm-up
    assert seen == pytest.approx([cosine_lr(s, 4, 20, 1e-4) for s in range(20)], rel=1e-9)
    assert all(a > b for a, b in zip(seen[4:], seen[5:]))  # strictly falling after the warm-up
    assert after == pytest.approx(1e-4, rel=1e-9)  # the floor, reached at the very end
    # through fit: per-batch stepping, read at the start of each epoch
    got = epoch_lrs(make_bundle, cfg, 5)
    assert got == pytest.approx([cosine_lr(s, 4, 20, 1e-4) for s in (0, 4, 8, 12, 16)], rel=1e-9)


def test_linear_warms_up_then_falls_in_a_straight_line_to_min_lr():
    cfg = ScheduleCfg(name="linear", warmup_epochs=0.5, min_lr=0.0)
    seen, after = batch_lrs(cfg, epochs=3, steps=4)
    assert seen[:2] == pytest.approx([5e-3, 1e-2], rel=1e-12)  # half an epoch of warm-up
    assert seen[2:] == pytest.approx([BASE * (1 - k / 10) for k in range(10)], rel=1e-12)
    assert after == pytest.approx(0.0, abs=1e-15)


def test_cosine_without_warmup_starts_at_the_base_lr():
    seen, after = batch_lrs(ScheduleCfg(name="cosine"), epochs=2, steps=5)
    assert seen[0] == BASE
    assert seen[5] == pytest.approx(BASE / 2, rel=1e-9)  # half way down the half cosine
    assert after == pytest.approx(0.0, abs=1e-15)


def test_onecycle_peaks_at_max_lr(make_bundle):
    seen, after = batch_lrs(ScheduleCfg(name="onecycle", max_lr=0.1), epochs=5, steps=4)
    peak = max(range(20), key=seen.__getitem__)
    assert seen[0] == pytest.approx(0.1 / 25, rel=1e-9)  # PyTorch's div_factor
    assert peak == 5 and seen[peak] == pytest.approx(0.1, rel=1e-9)  # 30% of 20 steps, counted from 0
    assert all(a < b for a, b in zip(seen[:5], seen[1:6]))
    assert all(a > b for a, b in zip(seen[5:-1], seen[6:]))
    assert seen[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-6)
    got = epoch_lrs(make_bundle, ScheduleCfg(name="onecycle"), 5)  # no max_lr: the optimizer's lr is the peak
    assert got[0] == pytest.approx(BASE / 25, rel=1e-9)
    assert max(got) < BASE and got[1] == pytest.approx(max(got))


def test_plateau_decays_after_patience_epochs_without_improvement(make_bundle):
    # lr 1e-6 barely moves the weights: the train loss is flat, so the lr halves every patience + 1 epochs
    got = epoch_lrs(make_bundle, ScheduleCfg(name="plateau", patience=1, factor=0.5, monitor="train_loss"), 8,
                    lr=1e-6)
    assert got == pytest.approx([1e-6, 1e-6, 1e-6, 5e-7, 5e-7, 2.5e-7, 2.5e-7, 1.25e-7], rel=1e-12)


def plateau_lrs(cfg: ScheduleCfg, values: list[dict[str, float]]) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = Schedule(optimizer, cfg, epochs=len(values), steps_per_epoch=3)
    out = []
    for metrics in values:
        sched.on_batch()  # ignored by a per-epoch schedule
        sched.on_epoch(metrics)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_plateau_follows_its_monitor_and_mode():
    cfg = ScheduleCfg(name="plateau", patience=2, factor=0.5, min_lr=0.3, monitor="val_accuracy")
    rising = [{"val_accuracy": a} for a in (0.1, 0.2, 0.3, 0.4)]
    assert plateau_lrs(cfg, rising) == [1.0] * 4  # max mode: rising accuracy is improvement
    flat = [{"val_accuracy": 0.5}] * 8
    assert plateau_lrs(cfg, flat) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.3, 0.3]  # floored at min_lr
    # a monitor the epoch does not have falls back to train_loss (min mode)
    falling = [{"train_loss": v} for v in (1.0, 0.9, 0.8, 0.7)]
    assert plateau_lrs(ScheduleCfg(name="plateau", patience=0, monitor="val_loss"), falling) == [1.0] * 4


def params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).parameters())


@pytest.mark.parametrize(("cfg", "kind", "expected"), [
    (OptimizerCfg(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "fused": True}),
    (OptimizerCfg(name="adam", lr=2e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-5), torch.optim.Adam,
     {"lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 1e-5, "fused": True}),
    (OptimizerCfg(name="adamw", lr=3e-4, weight_decay=0.05), torch.optim.AdamW,
     {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.05, "fused": True}),
    (OptimizerCfg(name="rmsprop", lr=1e-3, alpha=0.95, momentum=0.5, eps=1e-6), torch.optim.RMSprop,
     {"lr": 1e-3, "alpha": 0.95, "momentum": 0.5, "eps": 1e-6, "weight_decay": 0.0}),
])
def test_optimizers_carry_the_configured_hyper_parameters(cfg, kind, expected):
    ps = params()
    optimizer = build_optimizer(iter(ps), cfg, CPU)
    assert type(optimizer) is kind
    (group,) = optimizer.param_groups
    assert {k: group[k] for k in expected} == expected
    assert [id(p) for p in group["params"]] == [id(p) for p in ps]


def test_default_optimizer_is_keras_adam():
    group = build_optimizer(params(), OptimizerCfg(), CPU).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-7, 0.0)


def test_sgd_momentum_and_weight_decay_act_as_configured():
    # one parameter, gradient 1: weight decay adds wd * w, momentum accumulates the buffer
    w = nn.Parameter(torch.tensor([2.0]))
    optimizer = build_optimizer([w], OptimizerCfg(name="sgd", lr=0.1, momentum=0.5, weight_decay=0.1), CPU)
    expected, buffer = 2.0, 0.0
    for _ in range(3):
        optimizer.zero_grad()
        w.sum().backward()
        grad = 1.0 + 0.1 * expected
        buffer = grad if buffer == 0.0 else 0.5 * buffer + grad
        expected -= 0.1 * buffer
        optimizer.step()
        assert w.item() == pytest.approx(expected, rel=1e-6)
