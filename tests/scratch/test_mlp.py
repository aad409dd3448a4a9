"""The NumPy neural network: backprop equals finite differences and torch autograd, and it learns.

Weight layout: NumPy Dense computes x @ W + b with W of shape (in, out); torch's nn.Linear
computes x @ weight.T + bias with weight of shape (out, in).  So weight = W.T, and the torch
weight gradient is the transpose of ours.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from dlkit.scratch.data import one_hot, train_test_split, two_moons, xor
from dlkit.scratch.mlp import MLP, SGD, accuracy, fit, gradient_check, softmax, softmax_cross_entropy, train_mlp

TORCH_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def torch_copy(model: MLP) -> nn.Sequential:
    """The same network in torch (float64), weights copied from model.parameters() = [W1, b1, W2, b2, ...]."""
    modules: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(model.sizes[:-1], model.sizes[1:])):
        modules.append(nn.Linear(fan_in, fan_out, dtype=torch.float64))
        if i < len(model.sizes) - 2:
            modules.append(TORCH_ACTIVATIONS[model.activation]())
    net = nn.Sequential(*modules)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    params = model.parameters()
    with torch.no_grad():
        for linear, W, b in zip(linears, params[0::2], params[1::2]):
            linear.weight.copy_(torch.from_numpy(W.T))  # torch (out, in) = our (in, out) transposed
            linear.bias.copy_(torch.from_numpy(b))
    return net


def torch_parameters_as_numpy(net: nn.Sequential, grads: bool = False) -> list[np.ndarray]:
    """[W1, b1, W2, b2, ...] (or their gradients) in our layout."""
    out = []
    for linear in (m for m in net if isinstance(m, nn.Linear)):
        w, b = (linear.weight.grad, linear.bias.grad) if grads else (linear.weight, linear.bias)
        out += [w.detach().numpy().T, b.detach().numpy()]
    return out


def small_batch(seed: int = 0, n: int = 7, features: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), rng.integers(0, classes, size=n)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_backprop_equals_finite_differences(activation):
    x, y = small_batch()
    model = MLP([4, 5, 4, 3], activation=activation, seed=1)
    assert gradient_check(model, x, y, eps=1e-6) < 1e-6


def test_gradient_check_on_a_sample_of_entries_and_catches_a_wrong_gradient():
    x, y = small_batch(n=5, features=30, classes=10)
    model = MLP([30, 40, 10], seed=2)
    assert gradient_check(model, x, y, max_entries=50, seed=0) < 1e-6

    class Broken(MLP):
        def backward(self, dlogits):
            grads = super().backward(dlogits)
            return [g * 1.01 for g in grads]

    broken = Broken([4, 5, 3], seed=0)
    x, y = small_batch()
    assert gradient_check(broken, x, y) > 1e-3


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_loss_and_every_gradient_equal_torch_autograd(activation):
    x, y = small_batch(seed=4, n=9, features=6, classes=4)
    model = MLP([6, 8, 5, 4], activation=activation, seed=3)
    loss, grads = model.loss_and_grads(x, y)

    net = torch_copy(model)
    torch_loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()

    assert relative_error(loss, torch_loss.item()) < 1e-6
    torch_grads = torch_parameters_as_numpy(net, grads=True)
    assert len(grads) == len(torch_grads) == 6
    for ours, theirs in zip(grads, torch_grads):
        assert ours.shape == theirs.shape
        assert relative_error(ours, theirs) < 1e-6


def test_softmax_cross_entropy_survives_huge_logits():
    # e^1000 alone is inf in float64; the max-shift keeps every exponent <= 0
    logits = np.array([[1000.0, -1000.0, 0.0], [-1e4, 1e4, 5.0], [1e300, 0.0, -1e300]])
    targets = np.array([0, 0, 1])
    # no overflow, nan or log(0) anywhere on the way; underflow to 0 is harmless
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dlogits = softmax_cross_entropy(logits, one_hot(targets, 3))
        probs = softmax(logits)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    expected = F.cross_entropy(torch.from_numpy(logits[:2]), torch.from_numpy(targets[:2])).item()
    assert loss_of(logits[:2], targets[:2]) == pytest.approx(expected, rel=1e-12)  # (0 + 2e4) / 2


def loss_of(logits: np.ndarray, targets: np.ndarray) -> float:
    return softmax_cross_entropy(logits, one_hot(targets, logits.shape[1]))[0]


@pytest.mark.parametrize("make_data", [two_moons, xor], ids=["two_moons", "xor"])
def test_learns_two_moons_and_xor(make_data):
    x, y = make_data(n=300, noise=0.1, seed=0)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_fraction=0.2, seed=0)
    model = MLP([2, 16, 2], activation="tanh", seed=0)
    fit(model, x_train, y_train, epochs=100, batch_size=16, optimizer=SGD(lr=0.1, momentum=0.9), seed=0)
    assert accuracy(model, x_test, y_test) >= 0.95


def test_digits_reach_ninety_percent():
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_fraction=0.2, seed=0)
    result = train_mlp(x_train, y_train, x_test, y_test, seed=0)
    assert result["test_accuracy"] >= 0.9
    history = result["history"]
    assert len(history["loss"]) == len(history["val_accuracy"]) == result["settings"]["epochs"]
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] == result["test_accuracy"]
    assert [p.shape for p in result["parameters"]] == [(64, 64), (64,), (64, 10), (10,)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch_sgd_for_five_steps(momentum):
    x, y = small_batch(seed=7, n=40, features=5, classes=3)
    model = MLP([5, 6, 3], activation="tanh", seed=5)
    net = torch_copy(model)
    ours = SGD(lr=0.1, momentum=momentum)
    theirs = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum)
    for step in range(5):
        rows = slice(8 * step, 8 * step + 8)  # a different batch each step
        _, grads = model.loss_and_grads(x[rows], y[rows])
        ours.step(model.parameters(), grads)
        theirs.zero_grad()
        F.cross_entropy(net(torch.from_numpy(x[rows])), torch.from_numpy(y[rows])).backward()
        theirs.step()
    for a, b in zip(model.parameters(), torch_parameters_as_numpy(net)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert not np.allclose(model.parameters()[0], MLP([5, 6, 3], activation="tanh", seed=5).parameters()[0])


def test_fit_is_seeded():
    x, y = two_moons(n=100, noise=0.2, seed=1)

    def run(seed: int) -> dict:
        model = MLP([2, 8, 2], seed=seed)
        return fit(model, x, y, epochs=5, batch_size=10, optimizer=SGD(0.1, 0.9), seed=seed, x_val=x, y_val=y)

    assert run(0) == run(0)
    assert run(0) != run(1)
