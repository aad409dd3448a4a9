"""Deep learning from scratch, in NumPy alone: a single neuron and a small neural network.

Nothing here imports PyTorch; the tests check the hand-written gradients against torch autograd.

* `linreg`: a LinearNeuron learns Fahrenheit from Celsius by gradient descent (`train_linreg`).
* `mlp`: Dense layers, activations, softmax cross-entropy, backpropagation, SGD with momentum,
  mini-batch `fit`, `gradient_check` and `train_mlp`.
* `data`: Celsius pairs, two moons, XOR, a seeded train/test split and one-hot encoding.
"""
from __future__ import annotations

from dlkit.scratch.data import celsius_pairs, one_hot, train_test_split, two_moons, xor
from dlkit.scratch.linreg import LinearNeuron, closed_form, train_linreg
from dlkit.scratch.mlp import (
    MLP,
    SGD,
    Dense,
    ReLU,
    Sigmoid,
    Tanh,
    accuracy,
    fit,
    gradient_check,
    softmax_cross_entropy,
    train_mlp,
)

__all__ = [
    "MLP",
    "SGD",
    "Dense",
    "LinearNeuron",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "accuracy",
    "celsius_pairs",
    "closed_form",
    "fit",
    "gradient_check",
    "one_hot",
    "softmax_cross_entropy",
    "train_linreg",
    "train_mlp",
    "train_test_split",
    "two_moons",
    "xor",
]
