"""The single neuron: it learns F = 1.8 C + 32, and its hand-derived gradients are right."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dlkit.scratch
from dlkit.scratch.data import celsius_pairs, one_hot, train_test_split
from dlkit.scratch.linreg import LinearNeuron, closed_form, train_linreg

SCRATCH_DIR = Path(dlkit.scratch.__file__).parent


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def neuron_with_data(standardize: bool, seed: int = 3) -> tuple[LinearNeuron, np.ndarray, np.ndarray]:
    """A neuron at its random start, input scaling set from the data, as fit would."""
    x, y = celsius_pairs(n=50, seed=seed)
    neuron = LinearNeuron(seed=seed, standardize=standardize)
    if standardize:
        neuron.set_input_scaling(x)
    return neuron, x, y


def test_learns_fahrenheit_and_agrees_with_closed_form():
    result = train_linreg()
    assert abs(result["weight"] - 1.8) < 0.02
    assert abs(result["bias"] - 32.0) < 0.5
    assert abs(result["weight"] - result["closed_form_weight"]) < 1e-6
    assert abs(result["bias"] - result["closed_form_bias"]) < 1e-4
    # the noise has std 1 degree F, so a good line leaves an MSE near 1
    assert result["train_mse"] < 1.5 and result["test_mse"] < 2.0
    assert len(result["x_train"]) == 128 and len(result["x_test"]) == 32
    assert len(result["history"]["train_loss"]) == len(result["history"]["test_loss"]) == 100
    np.testing.assert_allclose(result["test_predictions"], 1.8 * result["x_test"] + 32.0, atol=1.0)
    assert result["line_x"].shape == result["line_y"].shape == (50,)


def test_closed_form_is_exact_without_noise():
    c, f = celsius_pairs(n=20, seed=1, noise=0.0)
    w, b = closed_form(c, f)
    assert w == pytest.approx(1.8, abs=1e-12) and b == pytest.approx(32.0, abs=1e-10)


def test_raw_input_gradient_descent_also_gets_there_slowly():
    result = train_linreg(standardize=False, lr=8e-4, epochs=10_000)
    assert abs(result["weight"] - 1.8) < 0.02 and abs(result["bias"] - 32.0) < 0.5


@pytest.mark.parametrize("standardize", [True, False])
def test_hand_gradients_equal_finite_differences(standardize):
    neuron, x, y = neuron_with_data(standardize)
    dw, db = neuron.gradients(x, y)
    eps = 1e-6

    def loss_at(weight: float, bias: float) -> float:
        probe = LinearNeuron(standardize=standardize)
        probe.weight, probe.bias = weight, bias
        probe.x_mean, probe.x_scale = neuron.x_mean, neuron.x_scale
        return probe.mse(probe.forward(x), y)

    w, b = neuron.weight, neuron.bias
    numeric_dw = (loss_at(w + eps, b) - loss_at(w - eps, b)) / (2 * eps)
    numeric_db = (loss_at(w, b + eps) - loss_at(w, b - eps)) / (2 * eps)
    assert relative_error(dw, numeric_dw) < 1e-6
    assert relative_error(db, numeric_db) < 1e-6


@pytest.mark.parametrize("standardize", [True, False])
def test_hand_gradients_equal_torch_autograd(standardize):
    neuron, x, y = neuron_with_data(standardize)
    dw, db = neuron.gradients(x, y)

    w = torch.tensor(neuron.weight, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(neuron.bias, dtype=torch.float64, requires_grad=True)
    z = (torch.from_numpy(x) - neuron.x_mean) / neuron.x_scale
    loss = torch.mean((w * z + b - torch.from_numpy(y)) ** 2)
    loss.backward()

    assert relative_error(neuron.mse(neuron.forward(x), y), loss.item()) < 1e-12
    assert relative_error(dw, w.grad.item()) < 1e-6
    assert relative_error(db, b.grad.item()) < 1e-6


def test_loss_decreases():
    history = train_linreg()["history"]
    train = np.array(history["train_loss"])
    assert np.all(np.diff(train) <= 1e-12)  # gradient descent on a bowl with a safe step never climbs
    assert train[-1] < train[0] / 1000
    assert history["test_loss"][-1] < history["test_loss"][0] / 1000


def test_same_seed_same_run_other_seed_other_run():
    a, b, c = train_linreg(seed=5), train_linreg(seed=5), train_linreg(seed=6)
    assert a["history"] == b["history"]
    assert a["weight"] == b["weight"] and a["bias"] == b["bias"]
    np.testing.assert_array_equal(a["x_test"], b["x_test"])
    assert a["history"]["train_loss"] != c["history"]["train_loss"]


def test_train_test_split_is_a_seeded_partition():
    x = np.arange(100.0)
    y = x * 2
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_fraction=0.2, seed=0)
    assert len(x_train) == 80 and len(x_test) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([x_train, x_test])), x)
    np.testing.assert_array_equal(y_train, 2 * x_train)
    again = train_test_split(x, y, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again[1], x_test)
    with pytest.raises(ValueError):
        train_test_split(x, y, test_fraction=1.5)


def test_one_hot():
    np.testing.assert_array_equal(one_hot(np.array([2, 0, 1]), 3), np.eye(3)[[2, 0, 1]])
    with pytest.raises(ValueError):
        one_hot(np.array([3]), 3)


def test_scratch_package_never_imports_torch():
    # the package's own modules name numpy (and each other) only
    for path in sorted(SCRATCH_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in {"__future__", "typing", "numpy", "dlkit"}, f"{path.name} imports {name}"
                if top == "dlkit":
                    assert name.startswith("dlkit.scratch") or name in ("dlkit.errors", "dlkit.synthetic"), (
                        f"{path.name} imports {name}")
    # and importing it for real leaves torch out of the process
    code = "import sys, dlkit.scratch; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
