"""A multi-layer perceptron in NumPy: forward pass, hand-written backward pass, SGD with momentum.

Conventions (the ones a reader needs to compare with PyTorch):

* A batch is a matrix x of shape (n, features), one example per row.
* A Dense layer computes  out = x @ W + b  with W of shape (in, out) and b of shape (out,).
  PyTorch's nn.Linear stores its weight as (out, in) and computes x @ weight.T + bias, so
  torch_linear.weight == W.T and torch_linear.bias == b.
* MLP.parameters() lists the arrays in the order W1, b1, W2, b2, ... (first layer first), and
  MLP.loss_and_grads() returns the gradients in the same order.
* The loss is the mean softmax cross-entropy over the batch (PyTorch's F.cross_entropy).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from dlkit.scratch.data import one_hot

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

INITS = ("he", "xavier")
ACTIVATIONS = ("relu", "sigmoid", "tanh")


# ---------------------------------------------------------------- layers


class Dense:
    """A fully connected layer: out = x @ W + b."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator, init: str = "he") -> None:
        if init == "he":
            std = np.sqrt(2.0 / in_features)  # He: Var(W) = 2 / fan_in, keeps ReLU signals steady
        elif init == "xavier":
            std = np.sqrt(2.0 / (in_features + out_features))  # Glorot: Var(W) = 2 / (fan_in + fan_out)
        else:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        self.W: FloatArray = rng.normal(0.0, std, size=(in_features, out_features))
        self.b: FloatArray = np.zeros(out_features)
        self.dW: FloatArray = np.zeros_like(self.W)
        self.db: FloatArray = np.zeros_like(self.b)
        self.x: FloatArray | None = None  # the input of the last forward, needed by backward

    def forward(self, x: FloatArray) -> FloatArray:
        """out = x W + b"""
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout: FloatArray) -> FloatArray:
        """Store dL/dW = x^T dout and dL/db = sum over rows of dout; return dL/dx = dout W^T."""
        assert self.x is not None, "call forward before backward"
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


class Sigmoid:
    """s(x) = 1 / (1 + e^-x)"""

    def __init__(self) -> None:
        self.out: FloatArray | None = None

    def forward(self, x: FloatArray) -> FloatArray:
        """s(x) = 1 / (1 + e^-x), computed as (1 + tanh(x/2)) / 2, equal and never overflowing"""
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout: FloatArray) -> FloatArray:
        """ds/dx = s (1 - s)"""
        assert self.out is not None, "call forward before backward"
        return dout * self.out * (1.0 - self.out)


class ReLU:
    """r(x) = max(0, x)"""

    def __init__(self) -> None:
        self.positive: NDArray[np.bool_] | None = None

    def forward(self, x: FloatArray) -> FloatArray:
        """r(x) = max(0, x)"""
        self.positive = x > 0
        return np.where(self.positive, x, 0.0)

    def backward(self, dout: FloatArray) -> FloatArray:
        """dr/dx = 1 where x > 0, else 0"""
        assert self.positive is not None, "call forward before backward"
        return np.where(self.positive, dout, 0.0)


class Tanh:
    """t(x) = tanh(x)"""

    def __init__(self) -> None:
        self.out: FloatArray | None = None

    def forward(self, x: FloatArray) -> FloatArray:
        """t(x) = (e^x - e^-x) / (e^x + e^-x)"""
        self.out = np.tanh(x)
        return self.out

    def backward(self, dout: FloatArray) -> FloatArray:
        """dt/dx = 1 - t^2"""
        assert self.out is not None, "call forward before backward"
        return dout * (1.0 - self.out**2)


Layer = Dense | Sigmoid | ReLU | Tanh


def sigmoid(x: FloatArray) -> FloatArray:
    """s(x) = 1 / (1 + e^-x) = (1 + tanh(x/2)) / 2; the second form never overflows"""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def make_activation(name: str) -> Sigmoid | ReLU | Tanh:
    """The activation layer called `name` ("relu", "sigmoid" or "tanh")."""
    if name == "relu":
        return ReLU()
    if name == "sigmoid":
        return Sigmoid()
    if name == "tanh":
        return Tanh()
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


# ---------------------------------------------------------------- loss


def log_softmax(logits: FloatArray) -> FloatArray:
    """log p_k = z_k - log sum_j e^z_j = (z_k - m) - log sum_j e^(z_j - m),  m = max_j z_j (no overflow)"""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: FloatArray) -> FloatArray:
    """p_k = e^z_k / sum_j e^z_j, row by row"""
    return np.exp(log_softmax(logits))


def softmax_cross_entropy(logits: FloatArray, y_onehot: FloatArray) -> tuple[float, FloatArray]:
    """Return (L, dL/dlogits) for L = -1/n * sum_i sum_k y_ik log p_ik, p = softmax(logits).

    dL/dlogits = (softmax(logits) - y_onehot) / n
    """
    n = len(logits)
    log_probs = log_softmax(logits)
    loss = float(-np.sum(y_onehot * log_probs) / n)
    dlogits = (np.exp(log_probs) - y_onehot) / n
    return loss, dlogits


# ---------------------------------------------------------------- model


class MLP:
    """Dense -> activation -> Dense -> activation -> ... -> Dense (logits, no activation).

    sizes = [inputs, hidden_1, ..., classes].  init defaults to "he" for ReLU and "xavier"
    for sigmoid and tanh.  All weights come from np.random.default_rng(seed).
    """

    def __init__(self, sizes: list[int], activation: str = "relu", seed: int = 0, init: str | None = None) -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least [inputs, classes], got {sizes}")
        if init is None:
            init = "he" if activation == "relu" else "xavier"
        rng = np.random.default_rng(seed)
        self.sizes = list(sizes)
        self.activation = activation
        self.dense: list[Dense] = []
        self.layers: list[Layer] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer = Dense(fan_in, fan_out, rng, init=init)
            self.dense.append(layer)
            self.layers.append(layer)
            is_last = i == len(sizes) - 2
            if not is_last:
                self.layers.append(make_activation(activation))

    @property
    def num_classes(self) -> int:
        """The width of the last layer: one logit per class."""
        return self.sizes[-1]

    def parameters(self) -> list[FloatArray]:
        """[W1, b1, W2, b2, ...]: the arrays themselves, so changing them in place changes the model."""
        params: list[FloatArray] = []
        for layer in self.dense:
            params += [layer.W, layer.b]
        return params

    def forward(self, x: FloatArray) -> FloatArray:
        """logits = the layers applied one after another"""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x: FloatArray, y: IntArray) -> float:
        """Mean softmax cross-entropy of the batch (y: integer class labels)."""
        loss, _ = softmax_cross_entropy(self.forward(x), one_hot(y, self.num_classes))
        return loss

    def backward(self, dlogits: FloatArray) -> list[FloatArray]:
        """Backpropagation from dL/dlogits: return [dL/dW1, dL/db1, dL/dW2, dL/db2, ...]."""
        grad = dlogits
        for layer in reversed(self.layers):  # chain rule, last layer first
            grad = layer.backward(grad)
        grads: list[FloatArray] = []
        for layer in self.dense:
            grads += [layer.dW, layer.db]
        return grads

    def loss_and_grads(self, x: FloatArray, y: IntArray) -> tuple[float, list[FloatArray]]:
        """Forward, loss, backward: return (L, [dL/dW1, dL/db1, dL/dW2, dL/db2, ...])."""
        loss, dlogits = softmax_cross_entropy(self.forward(x), one_hot(y, self.num_classes))
        return loss, self.backward(dlogits)

    def predict_proba(self, x: FloatArray) -> FloatArray:
        """p = softmax(logits), one row of class probabilities per example"""
        return softmax(self.forward(x))

    def predict(self, x: FloatArray) -> IntArray:
        """The most probable class of each example: argmax_k logits_k"""
        return self.forward(x).argmax(axis=1)


# ---------------------------------------------------------------- optimiser and training


class SGD:
    """Stochastic gradient descent with classical momentum.

    v <- momentum * v - lr * g ;  p <- p + v     (momentum = 0 gives p <- p - lr * g)

    PyTorch's SGD keeps buf <- momentum * buf + g ; p <- p - lr * buf instead; with a constant
    lr the two are the same update (v = -lr * buf).
    """

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.velocities: list[FloatArray] | None = None  # one per parameter, zeros at the start

    def step(self, params: list[FloatArray], grads: list[FloatArray]) -> None:
        """Update every parameter in place."""
        if self.velocities is None:
            self.velocities = [np.zeros_like(p) for p in params]
        for p, g, v in zip(params, grads, self.velocities):
            v *= self.momentum  # v <- momentum * v
            v -= self.lr * g  # v <- v - lr * g
            p += v  # p <- p + v


def accuracy(model: MLP, x: FloatArray, y: IntArray) -> float:
    """Fraction of examples whose predicted class equals the label."""
    return float(np.mean(model.predict(x) == y))


def fit(
    model: MLP,
    x: FloatArray,
    y: IntArray,
    epochs: int,
    batch_size: int,
    optimizer: SGD,
    seed: int = 0,
    x_val: FloatArray | None = None,
    y_val: IntArray | None = None,
) -> dict[str, list[float]]:
    """Mini-batch training; return the history {"loss", "accuracy", "val_loss", "val_accuracy"}.

    Each epoch visits the rows in a fresh seeded random order, batch_size at a time.
    "loss" and "accuracy" are averaged over the epoch's batches as they were seen (before each
    batch's update, weighted by batch size); the validation pair is measured after the epoch
    and stays empty without a validation set.
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    for _ in range(epochs):
        order = rng.permutation(n)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            logits = model.forward(x[rows])  # 1. forward
            loss, dlogits = softmax_cross_entropy(logits, one_hot(y[rows], model.num_classes))  # 2. loss
            grads = model.backward(dlogits)  # 3. backward
            optimizer.step(model.parameters(), grads)  # 4. update
            loss_sum += loss * len(rows)
            correct += int(np.sum(logits.argmax(axis=1) == y[rows]))
        history["loss"].append(loss_sum / n)
        history["accuracy"].append(correct / n)
        if x_val is not None and y_val is not None:
            history["val_loss"].append(model.loss(x_val, y_val))
            history["val_accuracy"].append(accuracy(model, x_val, y_val))
    return history


def gradient_check(
    model: MLP,
    x: FloatArray,
    y: IntArray,
    eps: float = 1e-6,
    max_entries: int | None = None,
    seed: int = 0,
) -> float:
    """Compare backprop with central finite differences; return the worst relative error.

    numeric dL/dp = (L(p + eps) - L(p - eps)) / (2 eps), one entry at a time.  For each
    parameter array the error is ||analytic - numeric|| / (||analytic|| + ||numeric||) over
    the entries checked, and the largest over all arrays is returned (about 1e-9 when the
    backward pass is right).  max_entries checks a seeded random sample of that many entries
    per array instead of all of them.
    """
    rng = np.random.default_rng(seed)
    _, grads = model.loss_and_grads(x, y)
    worst = 0.0
    for param, grad in zip(model.parameters(), grads):
        grad = grad.copy()
        flat_indices = np.arange(param.size)
        if max_entries is not None and param.size > max_entries:
            flat_indices = rng.choice(param.size, size=max_entries, replace=False)
        analytic = np.empty(len(flat_indices))
        numeric = np.empty(len(flat_indices))
        for j, flat in enumerate(flat_indices):
            index = np.unravel_index(flat, param.shape)
            original = param[index]
            param[index] = original + eps
            loss_plus = model.loss(x, y)
            param[index] = original - eps
            loss_minus = model.loss(x, y)
            param[index] = original  # put it back
            numeric[j] = (loss_plus - loss_minus) / (2.0 * eps)
            analytic[j] = grad[index]
        scale = np.linalg.norm(analytic) + np.linalg.norm(numeric)
        if scale > 0.0:
            worst = max(worst, float(np.linalg.norm(analytic - numeric) / scale))
    return worst


def train_mlp(
    x_train: FloatArray,
    y_train: IntArray,
    x_test: FloatArray,
    y_test: IntArray,
    hidden: tuple[int, ...] = (64,),
    activation: str = "relu",
    epochs: int = 20,
    lr: float = 0.05,
    momentum: float = 0.9,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Train an MLP classifier on the arrays given (e.g. digits: x (n, 64) in [0, 1], y int labels).

    Returns test_accuracy, test_loss, train_accuracy, history (per epoch; the test set is the
    validation set), parameters (copies, order W1, b1, W2, b2, ...), sizes and the settings.
    """
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    sizes = [x_train.shape[1], *hidden, num_classes]
    model = MLP(sizes, activation=activation, seed=seed)
    optimizer = SGD(lr=lr, momentum=momentum)
    history = fit(
        model, x_train, y_train, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, seed=seed, x_val=x_test, y_val=y_test,
    )
    return {
        "test_accuracy": accuracy(model, x_test, y_test),
        "test_loss": model.loss(x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "history": history,
        "parameters": [p.copy() for p in model.parameters()],
        "sizes": sizes,
        "settings": {
            "hidden": list(hidden),
            "activation": activation,
            "epochs": epochs,
            "lr": lr,
            "momentum": momentum,
            "batch_size": batch_size,
            "seed": seed,
        },
    }
