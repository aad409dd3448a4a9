"""The training loop: it learns, it is reproducible bit for bit, and its numbers are the textbook ones."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dlkit.config import OptimizerCfg, ScheduleCfg, TrainCfg
from dlkit.data.bundle import TensorSplit
from dlkit.engine import Callback, evaluate, fit, loss_for, predict_outputs, train_one_epoch
from dlkit.engine.loop import StepContext
from dlkit.engine.optim import Schedule, build_optimizer
from dlkit.engine.progress import QuietProgress
from dlkit.engine.runtime import resolve_precision, seed_everything
from dlkit.errors import TrainingError
from dlkit.models import build

CPU = torch.device("cpu")


def train(data, cfg: TrainCfg, *, model: str = "mlp", seed: int = 0, precision: str = "fp32", callbacks=(), **args):
    """Seed, build `model` for `data`, fit it; returns (model, history)."""
    generator = seed_everything(seed)
    net = build(model, num_classes=data.num_outputs, input_shape=data.input_shape, **args)
    history = fit(net, data, cfg, device=CPU, precision=precision, generator=generator, callbacks=callbacks)
    return net, history


def adam(epochs: int, lr: float = 1e-2, batch_size: int = 16, **kw) -> TrainCfg:
    return TrainCfg(epochs=epochs, batch_size=batch_size, optimizer=OptimizerCfg(name="adam", lr=lr), **kw)


# --- it learns ---------------------------------------------------------------------------------


def test_memorises_random_labels_of_64_images(make_bundle):
    data = make_bundle("multiclass", n=64, shape=(1, 8, 8), classes=10)
    _, history = train(data, adam(100), hidden=[64])
    first, last = history.epochs[0], history.epochs[-1]
    assert first["train_accuracy"] < 0.3  # random labels: chance at the start
    assert last["train_accuracy"] == 1.0
    assert last["train_loss"] < 0.05
    assert len(history.epochs) == 100 and last["epoch"] == 100


def test_memorises_a_binary_task_with_one_logit(make_bundle):
    data = make_bundle("binary", n=64, shape=(1, 8, 8))
    assert data.num_outputs == 1
    model, history = train(data, adam(100), hidden=[64])
    assert history.epochs[-1]["train_accuracy"] == 1.0
    assert history.epochs[-1]["train_loss"] < 0.05
    logits = predict_outputs(model, data.train.x, device=CPU)
    assert logits.shape == (64, 1)
    assert torch.equal((logits[:, 0] > 0).float(), data.train.y)


def test_fits_a_linear_regression_target(make_bundle):
    data = make_bundle("regression", n=64, shape=(16,))
    _, history = train(data, adam(100), hidden=[32])
    losses = [e["train_loss"] for e in history.epochs]
    assert "train_accuracy" not in history.epochs[-1]
    assert losses[0] > 0.5
    assert losses[-1] < 1e-3 * losses[0]


# --- reproducibility -----------------------------------------------------------------------------


def strip_seconds(history) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history.epochs]


@pytest.mark.parametrize(("model", "precision", "args"), [
    ("mlp", "fp32", {"hidden": [32], "dropout": 0.2}),
    ("seed_cnn", "fp32", {}),
    ("seed_cnn", resolve_precision("auto", CPU), {}),  # bf16 on a CPU with AVX512-BF16
])
def test_same_seed_gives_bit_identical_weights_and_history(make_bundle, model, precision, args):
    data = make_bundle("multiclass", n=48, shape=(1, 12, 12), n_val=16)
    cfg = adam(2, lr=1e-3)
    a, ha = train(data, cfg, model=model, precision=precision, seed=3, **args)
    b, hb = train(data, cfg, model=model, precision=precision, seed=3, **args)
    c, hc = train(data, cfg, model=model, precision=precision, seed=4, **args)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert strip_seconds(ha) == strip_seconds(hb)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert strip_seconds(ha) != strip_seconds(hc)


def test_the_generator_alone_changes_the_batch_order(make_bundle):
    data = make_bundle("multiclass", n=48, shape=(1, 8, 8))
    seed_everything(0)
    base = build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16])
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fit(a, data, adam(1), device=CPU, precision="fp32", generator=torch.Generator().manual_seed(1))
    fit(b, data, adam(1), device=CPU, precision="fp32", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.head.weight, b.head.weight)


# --- the numbers of one epoch ----------------------------------------------------------------------


def test_evaluate_equals_cross_entropy_over_the_whole_split(make_bundle):
    data = make_bundle("multiclass", n=50, shape=(1, 8, 8), classes=4)
    seed_everything(0)
    model = build("mlp", num_classes=4, input_shape=(1, 8, 8), hidden=[16], dropout=0.5)
    with torch.no_grad():
        model.eval()
        out = model(data.train.x)
        model.train()
    expected_loss = F.cross_entropy(out, data.train.y).item()
    expected_acc = (out.argmax(1) == data.train.y).sum().item() / 50
    loss_fn = loss_for("multiclass")
    for batch_size in (7, 50, 512):
        got = evaluate(model, data.train, "multiclass", loss_fn, device=CPU, batch_size=batch_size, prefix="val_")
        assert set(got) == {"val_loss", "val_accuracy"}
        assert got["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert got["val_accuracy"] == expected_acc
    assert model.training  # evaluate switched to eval mode (dropout off) and back
    regression = evaluate(model, TensorSplit(data.train.x, torch.randn(50, 4)), "regression",
                          loss_for("regression"), device=CPU, batch_size=7)
    assert set(regression) == {"loss"}


def test_train_one_epoch_matches_a_hand_written_sgd_loop(make_bundle):
    data = make_bundle("multiclass", n=45, shape=(1, 8, 8), classes=3)
    seed_everything(0)
    model = build("mlp", num_classes=3, input_shape=(1, 8, 8), hidden=[16])
    twin = copy.deepcopy(model)
    optimizer = build_optimizer(model.parameters(), OptimizerCfg(name="sgd", lr=0.1), CPU)
    ctx = StepContext(loss_for("multiclass"), optimizer, Schedule(optimizer, ScheduleCfg(), 1, 7), "multiclass",
                      CPU, "fp32", 7, torch.Generator().manual_seed(5))
    got = train_one_epoch(model, data.train, ctx, QuietProgress())

    order = torch.randperm(45, generator=torch.Generator().manual_seed(5))
    hand = torch.optim.SGD(twin.parameters(), lr=0.1)
    total, correct = 0.0, 0
    for start in range(0, 45, 7):
        idx = order[start : start + 7]
        out = twin(data.train.x[idx])
        loss = F.cross_entropy(out, data.train.y[idx])
        hand.zero_grad()
        loss.backward()
        hand.step()
        total += loss.item() * len(idx)
        correct += (out.argmax(1) == data.train.y[idx]).sum().item()
    assert got["train_loss"] == pytest.approx(total / 45, rel=1e-6)
    assert got["train_accuracy"] == correct / 45
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_loss_for_each_task_against_torch_functional():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(9, 5, generator=g), torch.randint(0, 5, (9,), generator=g)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss_for("multiclass")(logits, labels), ce)
    torch.testing.assert_close(loss_for("binary", "cross_entropy")(logits, labels), ce)

    one_logit, targets = torch.randn(9, 1, generator=g), torch.randint(0, 2, (9,), generator=g).float()
    bce = F.binary_cross_entropy_with_logits(one_logit[:, 0], targets)
    torch.testing.assert_close(loss_for("binary")(one_logit, targets), bce)
    torch.testing.assert_close(loss_for("binary")(one_logit, targets.long()), bce)  # int labels are cast
    # broadcasting (9, 1) against (9,) would average 81 pairs: a different, wrong number
    broadcast = F.binary_cross_entropy_with_logits(one_logit.expand(9, 9), targets.expand(9, 9))
    assert not math.isclose(bce.item(), broadcast.item(), rel_tol=1e-3)

    pred, target = torch.randn(9, 1, generator=g), torch.randn(9, generator=g)
    torch.testing.assert_close(loss_for("regression")(pred, target), F.mse_loss(pred[:, 0], target))
    wide, wide_target = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g)
    torch.testing.assert_close(loss_for("multiclass", "mse")(wide, wide_target), F.mse_loss(wide, wide_target))


def test_predict_outputs_are_eval_mode_logits_whatever_the_batch_size(make_bundle):
    data = make_bundle("multiclass", n=20, shape=(1, 8, 8), classes=3)
    seed_everything(0)
    model = build("mlp", num_classes=3, input_shape=(1, 8, 8), hidden=[8], dropout=0.5)
    model.eval()
    with torch.no_grad():
        expected = model(data.train.x)
    model.train()
    for batch_size in (3, 512):
        got = predict_outputs(model, data.train.x, device=CPU, batch_size=batch_size)
        assert got.dtype == torch.float32 and got.shape == (20, 3)
        torch.testing.assert_close(got, expected)
    assert model.training
    assert predict_outputs(model, data.train.x[:0], device=CPU).numel() == 0


# --- failing loudly ----------------------------------------------------------------------------


def test_an_exploding_learning_rate_stops_with_a_training_error(make_bundle):
    data = make_bundle("multiclass", n=64, shape=(1, 8, 8))
    cfg = TrainCfg(epochs=3, batch_size=16, optimizer=OptimizerCfg(name="sgd", lr=1e12))
    with pytest.raises(TrainingError) as info:
        train(data, cfg, hidden=[64])
    assert str(info.value) == (
        "the training loss became nan in epoch 1; lower train.optimizer.lr or set train.grad_clip"
    )


def test_infinite_inputs_stop_in_the_first_epoch(make_bundle):
    data = make_bundle("regression", n=16, shape=(4,))
    data.train.x[5, 2] = math.inf
    seen = []

    class Spy(Callback):
        def on_epoch_end(self, state, metrics):
            seen.append(metrics)

    with pytest.raises(TrainingError, match=r"^the training loss became (nan|inf) in epoch 1; lower train\.optimizer\.lr"):
        train(data, adam(5), hidden=[8], callbacks=[Spy()])
    assert seen == []  # no callback ever saw the broken epoch
