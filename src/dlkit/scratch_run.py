"""Recipes with `train.engine: numpy`: `dlkit.scratch` trains by hand-written backpropagation, and the
run directory is the same as every recipe's, so evaluate, predict and compare work on it.

The trained NumPy weights are written as dlkit's torch `mlp` with the same maths (a Linear stores
W transposed), so the bundle serves predictions like any other. For classification the same
network is also trained in PyTorch from the same initial weights over the same batches, and both
test accuracies are reported side by side.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlkit.config import Recipe
from dlkit.data import DataBundle, load_data
from dlkit.data.bundle import TensorSplit
from dlkit.engine.loop import History, predict_split
from dlkit.engine.outcome import RunResult, complete_run, guarded
from dlkit.errors import ConfigError, RunInterrupted
from dlkit.evaluate.metrics import classification_metrics
from dlkit.evaluate.predictions import evaluation_notes, measure_test
from dlkit.models import MODELS, build, build_model
from dlkit.rundir import RunDir
from dlkit.scratch import linreg, mlp


def execute_numpy(recipe: Recipe, *, out: str | Path | None = None, runs_root: str | Path = "runs",
                  report: bool = True) -> RunResult:
    """Train a recipe's mlp with dlkit.scratch (a single neuron for regression without hidden layers).
    Training and testing take seconds and happen before the run directory exists: Ctrl-C meanwhile
    leaves nothing behind."""
    try:
        return _execute_numpy(recipe, out, runs_root, report)
    except KeyboardInterrupt as exc:
        raise RunInterrupted("stopped before the NumPy run was saved; nothing was written", exc) from None


def _execute_numpy(recipe: Recipe, out: str | Path | None, runs_root: str | Path, report: bool) -> RunResult:
    cfg = recipe.train
    if recipe.model.name != "mlp" or cfg.optimizer.name != "sgd" or cfg.stages or cfg.freeze != "none":
        raise ConfigError("train.engine=numpy trains model.name=mlp with train.optimizer.name=sgd (momentum "
                          "allowed), one stage, nothing frozen")
    args = {k: p.default for k, p in inspect.signature(MODELS.get("mlp")).parameters.items()} | recipe.model.args()
    hidden, activation = list(args["hidden"]), args["activation"]
    if args.get("dropout"):
        raise ConfigError("train.engine=numpy has no dropout: remove model.dropout")
    data = load_data(recipe.data, recipe.seed)
    x_train, y_train = _arrays(data.train)
    x_val, y_val = _arrays(data.val) if data.val is not None and len(data.val) else (None, None)
    started = time.perf_counter()
    if data.task == "regression":
        if hidden:
            raise ConfigError("train.engine=numpy fits regression with a single neuron: set model.hidden=[]")
        model, epochs, extra = _linreg(recipe, data, x_train, y_train, x_val, y_val)
    else:
        model, epochs, extra = _mlp(recipe, data, hidden, activation, x_train, y_train, x_val, y_val)
    history = History(epochs=epochs, train_seconds=time.perf_counter() - started,
                      stages=[{"index": 0, "name": "stage 1", "first_epoch": 1, "last_epoch": len(epochs),
                               "freeze": "none"}])
    test, predictions = measure_test(model, data, recipe.train.eval_batch_size)
    test |= extra
    history.notes += evaluation_notes(predictions, data.classes)

    run = RunDir.create(recipe, out, runs_root)
    with guarded(run, len(epochs)):
        run.write_epochs(epochs)
        summary = complete_run(run, recipe, data, model, history, test, torch.device("cpu"), "fp64 (numpy)")
    if report:
        from dlkit.evaluate.report import report_after_run  # matplotlib loads only when a report is written

        report_after_run(run.path, model, data, predictions)
    return RunResult(run.path, summary, epochs)


def _arrays(split: TensorSplit) -> tuple[np.ndarray, np.ndarray]:
    """float64 rows (N, features) and labels as NumPy arrays."""
    return split.inputs().flatten(1).double().numpy(), split.y.numpy()


def _linreg(recipe: Recipe, data: DataBundle, x: np.ndarray, y: np.ndarray, x_val, y_val):
    """S2.1: a single neuron by gradient descent (full batch), with the least-squares answer beside it."""
    neuron = linreg.LinearNeuron(seed=recipe.seed)
    lr, n_epochs = recipe.train.optimizer.lr, recipe.train.epochs
    history = neuron.fit(x[:, 0], y, lr=lr, epochs=n_epochs,
                         x_test=None if x_val is None else x_val[:, 0], y_test=y_val)
    cf_weight, cf_bias = linreg.closed_form(x[:, 0], y)
    epochs = [{"epoch": i + 1, "stage": 0, "train_loss": loss, "lr": lr}
              | ({"val_loss": history["test_loss"][i]} if history["test_loss"] else {})
              for i, loss in enumerate(history["train_loss"])]
    model = build_model(recipe, 1, data.input_shape)
    with torch.no_grad():
        model.head.weight.fill_(neuron.raw_weight)
        model.head.bias.fill_(neuron.raw_bias)
    extra = {"weight": float(neuron.raw_weight), "bias": float(neuron.raw_bias),
             "closed_form_weight": float(cf_weight), "closed_form_bias": float(cf_bias)}
    return model, epochs, extra


def _mlp(recipe: Recipe, data: DataBundle, hidden: list[int], activation: str, x: np.ndarray, y: np.ndarray,
         x_val, y_val):
    """S2.2: the NumPy network, then the same network in PyTorch from the same start over the same batches.

    The NumPy network always ends in a softmax; with two classes its two logits (z0, z1) give
    sigmoid(z1 - z0), so the saved model is dlkit's one-logit binary model with W1 - W0, b1 - b0."""
    opt, cfg = recipe.train.optimizer, recipe.train
    sizes = [x.shape[1], *hidden, len(data.classes)]
    net = mlp.MLP(sizes, activation=activation, seed=recipe.seed)
    start = [p.copy() for p in net.parameters()]
    labels = y.astype(np.int64)
    history = mlp.fit(net, x, labels, cfg.epochs, cfg.batch_size, mlp.SGD(opt.lr, opt.momentum),
                      seed=recipe.seed, x_val=x_val, y_val=None if y_val is None else y_val.astype(np.int64))
    epochs = []
    for i in range(cfg.epochs):
        row = {"epoch": i + 1, "stage": 0, "train_loss": history["loss"][i], "train_accuracy": history["accuracy"][i]}
        if history["val_loss"]:
            row |= {"val_loss": history["val_loss"][i], "val_accuracy": history["val_accuracy"][i]}
        epochs.append(row | {"lr": opt.lr})
    model = build_model(recipe, data.num_outputs, data.input_shape)
    load_numpy(model, as_outputs(net.parameters(), data.num_outputs))
    twin = build(recipe.model.name, num_classes=len(data.classes), input_shape=data.input_shape,
                 **recipe.model.args()).double()
    load_numpy(twin, start)
    twin_losses = _torch_fit(twin, x, labels, recipe)
    for row, loss in zip(epochs, twin_losses, strict=True):
        row["torch_train_loss"] = loss
    diff = max_weight_diff(net.parameters(), twin)
    twin_params = [t.detach().numpy() for layer in _linears(twin) for t in (layer.weight.T, layer.bias)]
    twin_model = build_model(recipe, data.num_outputs, data.input_shape)
    load_numpy(twin_model, as_outputs(twin_params, data.num_outputs))
    twin_logits = predict_split(twin_model, data.test, device=torch.device("cpu"))
    twin_test = classification_metrics(twin_logits, data.test.y, data.task, prefix="torch_test_")
    return model, epochs, {"torch_test_accuracy": twin_test["torch_test_accuracy"],
                           "numpy_vs_torch_max_weight_diff": diff}


def as_outputs(params: list[np.ndarray], outputs: int) -> list[np.ndarray]:
    """The parameters with a two-class softmax layer turned into one logit (z1 - z0) when `outputs` is 1."""
    if outputs != 1:
        return params
    w, b = params[-2], params[-1]
    return [*params[:-2], w[:, 1:] - w[:, :1], b[1:] - b[:1]]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def load_numpy(model: nn.Module, params: list[np.ndarray]) -> None:
    """Copy [W1, b1, W2, b2, ...] (W: in x out) into the mlp's Linear layers (weight: out x in)."""
    linears = _linears(model)
    with torch.no_grad():
        for layer, w, b in zip(linears, params[::2], params[1::2], strict=True):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))


def _torch_fit(model: nn.Module, x: np.ndarray, y: np.ndarray, recipe: Recipe) -> list[float]:
    """The same training in PyTorch (autograd, torch.optim.SGD) in float64, batch order from the same seed;
    the training loss of each epoch, averaged over its batches before their updates as the NumPy fit does."""
    cfg, opt = recipe.train, recipe.train.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum)
    rng = np.random.default_rng(recipe.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model.train()
    losses = []
    for _ in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(x), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xt[rows]), yt[rows])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(x))
    return losses


def max_weight_diff(params: list[np.ndarray], model: nn.Module) -> float:
    """Largest absolute difference between NumPy weights [W1, b1, ...] and the mlp's (float64)."""
    linears = _linears(model)
    pairs = [(w.T, layer.weight) for w, layer in zip(params[::2], linears)] + [
        (b, layer.bias) for b, layer in zip(params[1::2], linears)]
    return max(float(np.abs(a - t.detach().double().numpy()).max()) for a, t in pairs)
