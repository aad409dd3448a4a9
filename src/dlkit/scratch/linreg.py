"""A single neuron learns Fahrenheit from Celsius: linear regression by gradient descent, in NumPy.

The model is  y_hat = w * z + b  with  z = (x - mean) / scale.

Why z and not x?  Celsius spans about 100 degrees, so the loss surface in (w, b) is a long thin
valley on the raw input: the slope along w is roughly 1000 times steeper than along b, and plain
gradient descent then needs a tiny learning rate and thousands of epochs.  Standardising the
input (mean 0, standard deviation 1 on the training set) makes the valley round, and gradient
descent converges in a few dozen epochs.  The learned line is the same line; `raw_weight` and
`raw_bias` convert it back to degrees Fahrenheit per degree Celsius:

    y_hat = w * (x - mean) / scale + b = (w / scale) * x + (b - w * mean / scale)

Pass standardize=False to see plain gradient descent on the raw input (mean 0, scale 1): on the
default data it diverges at lr=1e-3 and needs lr=8e-4 and about 10,000 epochs to get as close
as the standardised neuron gets with lr=0.1 in 100.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from dlkit.scratch.data import celsius_pairs, train_test_split

FloatArray = NDArray[np.float64]


def mse(pred: FloatArray, y: FloatArray) -> float:
    """L = 1/n * sum (y_hat - y)^2"""
    return float(np.mean((pred - y) ** 2))


class LinearNeuron:
    """One weight, one bias, no activation: y_hat = weight * z + bias, z the standardised input."""

    def __init__(self, seed: int = 0, standardize: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.weight: float = float(rng.normal())  # random start, N(0, 1)
        self.bias: float = float(rng.normal())
        self.standardize = standardize
        self.x_mean: float = 0.0  # set from the training inputs by fit (when standardize)
        self.x_scale: float = 1.0
        self.dw: float = 0.0  # the last gradients, kept for step()
        self.db: float = 0.0

    def set_input_scaling(self, x: FloatArray) -> None:
        """mean = average of x, scale = standard deviation of x (training inputs only)."""
        self.x_mean = float(np.mean(x))
        self.x_scale = float(np.std(x))

    def scale_input(self, x: FloatArray) -> FloatArray:
        """z = (x - mean) / scale"""
        return (x - self.x_mean) / self.x_scale

    def forward(self, x: FloatArray) -> FloatArray:
        """y_hat = w * z + b"""
        return self.weight * self.scale_input(x) + self.bias

    def mse(self, pred: FloatArray, y: FloatArray) -> float:
        """L = 1/n * sum (y_hat - y)^2"""
        return mse(pred, y)

    def gradients(self, x: FloatArray, y: FloatArray) -> tuple[float, float]:
        """Return (dL/dw, dL/db) of the MSE at the current weights; also kept for step().

        dL/dw = 2/n * sum (y_hat - y) * z   and   dL/db = 2/n * sum (y_hat - y)
        """
        z = self.scale_input(x)
        error = self.forward(x) - y  # y_hat - y
        n = len(x)
        self.dw = float(2.0 / n * np.sum(error * z))
        self.db = float(2.0 / n * np.sum(error))
        return self.dw, self.db

    def step(self, lr: float) -> None:
        """Gradient descent: w <- w - lr * dL/dw,  b <- b - lr * dL/db"""
        self.weight -= lr * self.dw
        self.bias -= lr * self.db

    def fit(
        self,
        x: FloatArray,
        y: FloatArray,
        lr: float = 0.1,
        epochs: int = 100,
        x_test: FloatArray | None = None,
        y_test: FloatArray | None = None,
    ) -> dict[str, list[float]]:
        """Full-batch gradient descent; return {"train_loss": [...], "test_loss": [...]}.

        One epoch = one gradient step on all training rows.  Each entry is the MSE measured
        just before that epoch's step; "test_loss" stays empty when no test set is given.
        """
        if self.standardize:
            self.set_input_scaling(x)
        history: dict[str, list[float]] = {"train_loss": [], "test_loss": []}
        for _ in range(epochs):
            history["train_loss"].append(self.mse(self.forward(x), y))
            if x_test is not None and y_test is not None:
                history["test_loss"].append(self.mse(self.forward(x_test), y_test))
            self.gradients(x, y)
            self.step(lr)
        return history

    @property
    def raw_weight(self) -> float:
        """Slope on the raw input: w_raw = w / scale"""
        return self.weight / self.x_scale

    @property
    def raw_bias(self) -> float:
        """Intercept on the raw input: b_raw = b - w * mean / scale"""
        return self.bias - self.weight * self.x_mean / self.x_scale


def closed_form(x: FloatArray, y: FloatArray) -> tuple[float, float]:
    """Least squares in one go: solve [x 1] [w b]^T = y (the normal equations) with lstsq."""
    design = np.stack([x, np.ones_like(x)], axis=1)  # one row [x_i, 1] per example
    (w, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(w), float(b)


def train_linreg(
    n: int = 160,
    seed: int = 0,
    lr: float = 0.1,
    epochs: int = 100,
    test_fraction: float = 0.2,
    noise: float = 1.0,
    standardize: bool = True,
) -> dict[str, Any]:
    """Make Celsius/Fahrenheit pairs, split them, fit a LinearNeuron, and return all a report needs.

    Keys: weight, bias (raw scale: deg F per deg C, deg F), closed_form_weight, closed_form_bias,
    train_mse, test_mse, history ({"train_loss", "test_loss"} per epoch), x_train, y_train,
    x_test, y_test, test_predictions, line_x, line_y (the fitted line over the data's range),
    and the settings used.
    """
    celsius, fahrenheit = celsius_pairs(n=n, seed=seed, noise=noise)
    x_train, x_test, y_train, y_test = train_test_split(
        celsius, fahrenheit, test_fraction=test_fraction, seed=seed
    )
    model = LinearNeuron(seed=seed, standardize=standardize)
    history = model.fit(x_train, y_train, lr=lr, epochs=epochs, x_test=x_test, y_test=y_test)
    cf_weight, cf_bias = closed_form(x_train, y_train)
    line_x = np.linspace(celsius.min(), celsius.max(), 50)
    return {
        "weight": model.raw_weight,
        "bias": model.raw_bias,
        "closed_form_weight": cf_weight,
        "closed_form_bias": cf_bias,
        "train_mse": model.mse(model.forward(x_train), y_train),
        "test_mse": model.mse(model.forward(x_test), y_test),
        "history": history,
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "test_predictions": model.forward(x_test),
        "line_x": line_x,
        "line_y": model.forward(line_x),
        "settings": {
            "n": n,
            "seed": seed,
            "lr": lr,
            "epochs": epochs,
            "test_fraction": test_fraction,
            "noise": noise,
            "standardize": standardize,
            "x_mean": model.x_mean,
            "x_scale": model.x_scale,
        },
    }
